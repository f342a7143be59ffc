"""Testing helpers: LocalCloud (an AWS account on loopback), local S3 servers, a proxy."""

from .localcloud import LocalCloud, LocalInstance
from .servers import MotoServer, SeaweedFS, ServerError, free_port

__all__ = ["LocalCloud", "LocalInstance", "MotoServer", "SeaweedFS", "ServerError",
           "free_port"]
