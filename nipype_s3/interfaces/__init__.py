"""Nipype interfaces: S3DataSink, S3DataGrabber (and, as it lands, EC2ContainerRun)."""

from .container import EC2ContainerRun
from .grabber import S3DataGrabber
from .sink import S3DataSink

__all__ = ["S3DataSink", "S3DataGrabber", "EC2ContainerRun"]
