"""Nipype interfaces: S3DataSink (and, as they land, S3DataGrabber, EC2ContainerRun)."""

from .sink import S3DataSink

__all__ = ["S3DataSink"]
