"""Nipype execution plugins: EC2Plugin, BatchPlugin."""

from .batch import BatchPlugin, BatchSettings
from .ec2 import EC2Plugin, EC2Settings

__all__ = ["EC2Plugin", "EC2Settings", "BatchPlugin", "BatchSettings"]
