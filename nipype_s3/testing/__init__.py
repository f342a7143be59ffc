"""Testing helpers: local S3 servers (and LocalCloud, an AWS account on loopback)."""

from .servers import MotoServer, SeaweedFS, ServerError, free_port

__all__ = ["MotoServer", "SeaweedFS", "ServerError", "free_port"]
