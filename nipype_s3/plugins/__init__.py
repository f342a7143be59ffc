"""Nipype execution plugins: EC2Plugin."""

from .ec2 import EC2Plugin, EC2Settings

__all__ = ["EC2Plugin", "EC2Settings"]
