"""The exceptions nipype_s3 raises.

Every error the library raises on purpose is a :class:`NipypeS3Error`; the ones a
Python user would already catch also derive from the matching built-in::

    NipypeS3Error
     ├── ConfigurationError (ValueError)        a value given to us is wrong
     │    └── CredentialsError                  creds_path / profile / keys unusable
     ├── InputFileNotFound (FileNotFoundError)  a local file to upload is missing
     ├── UnsafePath (ValueError)                a key or report entry would land outside
     │                                          its folder (``..``, absolute, via a link)
     ├── S3Error                                S3 refused or failed a request
     │    ├── S3BucketNotFound (FileNotFoundError)
     │    ├── S3ObjectNotFound (FileNotFoundError)
     │    ├── S3AccessDenied (PermissionError)
     │    ├── S3WrongRegion
     │    └── TransferFailed                    one or more files did not transfer
     └── EC2Error
          ├── InstanceLaunchError
          ├── InstanceTimeout (TimeoutError)
          └── RemoteNodeError                   a node failed on an instance

botocore's ``ClientError`` is translated once, in :mod:`nipype_s3.s3.errors`, and kept
as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "NipypeS3Error",
    "ConfigurationError",
    "CredentialsError",
    "InputFileNotFound",
    "UnsafePath",
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
]


class NipypeS3Error(Exception):
    """Base class of every error raised by nipype_s3."""


class ConfigurationError(NipypeS3Error, ValueError):
    """A value given to nipype_s3 (an input, an argument, a file) is not usable."""


class CredentialsError(ConfigurationError):
    """Credentials could not be read or were refused."""


class InputFileNotFound(NipypeS3Error, FileNotFoundError):
    """A local file or directory named as an input does not exist."""


class UnsafePath(NipypeS3Error, ValueError):
    """A key or report entry that would become a path outside the folder it belongs in.

    Raised by :func:`nipype_s3.localfs.confine`, the one rule every place that turns an
    S3 key or a remote report's entry into a local path goes through.
    """


class S3Error(NipypeS3Error):
    """S3 refused or failed a request.

    Attributes
    ----------
    bucket, key : str or None
        What the request was about, when known.
    code : str or None
        The AWS error code (``NoSuchBucket``, ``AccessDenied``...).
    """

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.bucket = bucket
        self.key = key
        self.code = code


class S3BucketNotFound(S3Error, FileNotFoundError):
    """The bucket does not exist (or the endpoint does not know it)."""


class S3ObjectNotFound(S3Error, FileNotFoundError):
    """The object (key) does not exist."""


class S3AccessDenied(S3Error, PermissionError):
    """The credentials in use may not do this (or are not valid at all)."""


class S3WrongRegion(S3Error):
    """The bucket lives in another region than the client was made for."""

    def __init__(self, message: str, *, region: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.region = region


class TransferFailed(S3Error):
    """One or more files could not be transferred.

    Attributes
    ----------
    failures : list of (str, BaseException)
        The source of each file that failed, with its error.
    """

    def __init__(self, message: str, *, failures=None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.failures = list(failures or [])


class EC2Error(NipypeS3Error):
    """An EC2 request or an instance failed."""


class BatchError(EC2Error):
    """AWS Batch refused a call, or a run's Batch jobs failed (an :class:`EC2Error` too,
    as what both backends raise)."""


class InstanceLaunchError(EC2Error):
    """An instance could not be launched; whatever was created has been terminated."""


class InstanceTimeout(EC2Error, TimeoutError):
    """An instance or a job on it did not finish in the time allowed."""


class RemoteNodeError(EC2Error):
    """A node raised on a remote instance.

    Attributes
    ----------
    node : str
        The node's full name.
    instance_id : str or None
        Where it ran.
    log_uri : str or None
        ``s3://`` URI of the agent's log for the job.
    remote_traceback : str
        The traceback as printed on the instance.
    """

    def __init__(self, message: str, *, node: str = "", instance_id: str | None = None,
                 log_uri: str | None = None, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.node = node
        self.instance_id = instance_id
        self.log_uri = log_uri
        self.remote_traceback = remote_traceback
