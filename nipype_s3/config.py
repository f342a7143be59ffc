"""Defaults and environment variable names (pure: no boto3, no network)."""

from __future__ import annotations

import os

__all__ = [
    "MiB",
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_MAX_ATTEMPTS",
    "SECRET_ENV_VARS",
    "METADATA_MD5_KEY",
    "env_endpoint_url",
    "max_attempts",
    "read_timeout",
]

MiB = 1024 * 1024

#: Files transferred at once (and parts of one large file in flight).
DEFAULT_MAX_CONCURRENCY = 16
#: Files at least this large are sent in parts.
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
#: Size of each part; also the part size used to compute multipart ETags.
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB

#: Seconds to open a connection, and to wait for any byte of an answer. Every network
#: wait is bounded: a stalled connection ends in a retry, never a hang.
DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_READ_TIMEOUT = 60
#: Attempts per request (botocore's adaptive retry mode, with backoff). Override with
#: the environment variable ``NIPYPE_S3_MAX_ATTEMPTS``.
DEFAULT_MAX_ATTEMPTS = 8

#: Variables whose values must never be recorded in a node's result or report.
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)

#: User metadata key holding the hex MD5 of an uploaded file. It lets skip-unchanged
#: compare files whose ETag is not an MD5 (SSE-KMS, or another tool's part size).
METADATA_MD5_KEY = "nipype-s3-md5"


def read_timeout() -> float:
    """Seconds to wait for a byte of an answer: ``NIPYPE_S3_READ_TIMEOUT`` or the default."""
    value = os.environ.get("NIPYPE_S3_READ_TIMEOUT", "")
    try:
        return float(value) if value.strip() else float(DEFAULT_READ_TIMEOUT)
    except ValueError:
        from .exceptions import ConfigurationError

        raise ConfigurationError(
            f"NIPYPE_S3_READ_TIMEOUT={value!r} is not a number of seconds; set it (e.g. 60) "
            "or unset it.") from None


def max_attempts() -> int:
    """Attempts per request: ``NIPYPE_S3_MAX_ATTEMPTS`` or :data:`DEFAULT_MAX_ATTEMPTS`."""
    value = os.environ.get("NIPYPE_S3_MAX_ATTEMPTS", "")
    try:
        return max(1, int(value)) if value.strip() else DEFAULT_MAX_ATTEMPTS
    except ValueError:
        from .exceptions import ConfigurationError

        raise ConfigurationError(
            f"NIPYPE_S3_MAX_ATTEMPTS={value!r} is not a whole number; set it to the attempts "
            "per request (e.g. 8) or unset it.") from None


def env_endpoint_url() -> str | None:
    """The S3 endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, if set."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
