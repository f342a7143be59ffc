"""EC2Plugin: agents on EC2 instances, fed by SQS."""

from .plugin import EC2Plugin
from .settings import EC2Settings

__all__ = ["EC2Plugin", "EC2Settings"]
