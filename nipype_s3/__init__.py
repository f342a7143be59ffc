"""nipype_s3: Nipype pipelines in AWS.

Read inputs from S3, write results to S3, run containers next to the data on EC2, and
scale a workflow out to EC2 instances with no shared file system.
"""

import logging

__version__ = "0.1.0"

from .exceptions import (  # noqa: E402
    BatchError,
    ConfigurationError,
    CredentialsError,
    EC2Error,
    InputFileNotFound,
    InstanceLaunchError,
    InstanceTimeout,
    NipypeS3Error,
    RemoteNodeError,
    S3AccessDenied,
    S3BucketNotFound,
    S3Error,
    S3ObjectNotFound,
    S3WrongRegion,
    TransferFailed,
    UnsafePath,
)
from .interfaces import EC2ContainerRun, S3DataGrabber, S3DataSink  # noqa: E402
from .plugins import BatchPlugin, EC2Plugin  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_plugin_names() -> None:
    """``wf.run(plugin="EC2")``, as users write ``"MultiProc"``: nipype looks a plugin
    named by a string up as ``<name>Plugin`` in :mod:`nipype.pipeline.plugins`."""
    import nipype.pipeline.plugins as plugins

    for name, cls in (("EC2Plugin", EC2Plugin), ("BatchPlugin", BatchPlugin)):
        if getattr(plugins, name, None) is not cls:
            setattr(plugins, name, cls)


_register_plugin_names()

__all__ = [
    "__version__",
    "S3DataSink",
    "S3DataGrabber",
    "EC2Plugin",
    "BatchPlugin",
    "EC2ContainerRun",
    "NipypeS3Error",
    "ConfigurationError",
    "CredentialsError",
    "InputFileNotFound",
    "S3Error",
    "S3BucketNotFound",
    "S3ObjectNotFound",
    "S3AccessDenied",
    "S3WrongRegion",
    "TransferFailed",
    "EC2Error",
    "BatchError",
    "InstanceLaunchError",
    "InstanceTimeout",
    "RemoteNodeError",
    "UnsafePath",
]
