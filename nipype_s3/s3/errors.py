"""Turn botocore errors into nipype_s3 exceptions, once, with a message a user can act on.

The table maps AWS error codes to exception classes Python users already catch
(``NoSuchKey`` → :class:`~nipype_s3.exceptions.S3ObjectNotFound`, a ``FileNotFoundError``;
``AccessDenied`` → :class:`~nipype_s3.exceptions.S3AccessDenied`, a ``PermissionError``).
The botocore exception is kept as ``__cause__``. Messages never contain a key or token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import botocore.exceptions

from ..exceptions import (
    CredentialsError,
    NipypeS3Error,
    S3AccessDenied,
    S3BucketNotFound,
    S3Error,
    S3ObjectNotFound,
    S3WrongRegion,
)

__all__ = ["translate", "s3_errors", "error_code", "what_to_do"]

_NOT_FOUND_BUCKET = {"NoSuchBucket"}
_NOT_FOUND_KEY = {"NoSuchKey", "NotFound", "404", "NoSuchUpload"}
#: an If-Match that no longer holds: the object was written again since it was listed
_CHANGED = {"PreconditionFailed", "412"}
_DENIED = {"AccessDenied", "403", "AllAccessDisabled", "Forbidden", "AccountProblem",
           "RequestTimeTooSkewed", "InvalidToken"}
_BAD_KEY_ID = {"InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException"}
_BAD_SECRET = {"SignatureDoesNotMatch", "IncompleteSignature"}
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}
_REGION = {"PermanentRedirect", "301", "AuthorizationHeaderMalformed",
           "IllegalLocationConstraintException", "InvalidRegion"}


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _where(bucket: str | None, key: str | None) -> str:
    if bucket and key:
        return f"s3://{bucket}/{key}"
    if bucket:
        return f"s3://{bucket}"
    return "S3"


def _endpoint_text(endpoint: str | None) -> str:
    return f" at {endpoint}" if endpoint else ""


def translate(exc: BaseException, *, bucket: str | None = None, key: str | None = None,
              action: str = "access", endpoint: str | None = None) -> NipypeS3Error:
    """Return the nipype_s3 exception for a botocore exception (not raised).

    Parameters
    ----------
    exc : Exception
        A ``botocore.exceptions.ClientError`` or another botocore exception.
    bucket, key : str, optional
        What the request was about; named in the message.
    action : str
        What was being done, in words ("upload", "list", ...).
    endpoint : str, optional
        A custom endpoint URL in use, named in the message.
    """
    where = _where(bucket, key)
    at = _endpoint_text(endpoint)
    if isinstance(exc, NipypeS3Error):
        return exc
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return CredentialsError(
            f"No AWS credentials found to {action} {where}. Give creds_path or profile, set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), run on an instance "
            "with a role, or use anon=True for a public bucket.")
    if isinstance(exc, botocore.exceptions.PartialCredentialsError):
        return CredentialsError(
            f"Incomplete AWS credentials ({exc}). Set both the access key id and the secret "
            "key (and the session token for temporary credentials).")
    if isinstance(exc, botocore.exceptions.SSLError):
        return S3Error(
            f"TLS failed with the S3 endpoint{at} while trying to {action} {where}: {exc}. "
            "If the server speaks plain HTTP, use an http:// endpoint_url; if its "
            "certificate comes from an authority of its own, point AWS_CA_BUNDLE at that "
            "authority's certificate.", bucket=bucket, key=key, code="SSLError")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError)):
        return S3Error(
            f"Could not connect to the S3 endpoint{at or ''} to {action} {where}: {exc}. "
            "Check endpoint_url / AWS_ENDPOINT_URL and the network.", bucket=bucket, key=key,
            code="ConnectionError")
    if isinstance(exc, (botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectTimeoutError)):
        return S3Error(
            f"Timed out to {action} {where}{at} after all retries: {exc}. The server is "
            "unreachable or stalled; check the endpoint and try again.", bucket=bucket,
            key=key, code="Timeout")
    if not isinstance(exc, botocore.exceptions.ClientError):
        return S3Error(f"Failed to {action} {where}{at}: {exc}", bucket=bucket, key=key)

    code = error_code(exc)
    response = exc.response
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    err_bucket = response.get("Error", {}).get("BucketName") or bucket
    where = _where(err_bucket, key)
    kw = {"bucket": err_bucket, "key": key, "code": code}

    if code in _NOT_FOUND_BUCKET or (code in ("404", "NotFound") and err_bucket and not key):
        # HeadBucket answers a bare 404 for a missing bucket
        return S3BucketNotFound(
            f"Bucket {err_bucket!r} does not exist{at} (while trying to {action} {where}). "
            "Check the bucket name, the endpoint, and the account you use.", **kw)
    if code in _REGION or status == 301:
        region = headers.get("x-amz-bucket-region") or response.get("Error", {}).get("Region")
        hint = (f"it is in {region!r}; pass region={region!r} or leave region unset so it is "
                "found from the bucket") if region else \
            "pass the bucket's region, or leave region unset so it is found from the bucket"
        return S3WrongRegion(
            f"Bucket {err_bucket!r} is in another region than the request was sent to "
            f"(while trying to {action} {where}): {hint}.", region=region, **kw)
    if code in _BAD_KEY_ID:
        return S3AccessDenied(
            f"The access key id in use is not known{at} (InvalidAccessKeyId, while trying to "
            f"{action} {where}). Check creds_path, profile or AWS_ACCESS_KEY_ID, and that "
            "the keys belong to this endpoint's account.", **kw)
    if code in _BAD_SECRET:
        return S3AccessDenied(
            f"The secret key does not match the access key id (SignatureDoesNotMatch, while "
            f"trying to {action} {where}{at}). Check the secret in creds_path, profile or "
            "AWS_SECRET_ACCESS_KEY.", **kw)
    if code in _EXPIRED:
        return S3AccessDenied(
            f"The session token has expired ({code}, while trying to {action} {where}). "
            "Refresh the temporary credentials (aws sso login, or a new STS session) and "
            "run again.", **kw)
    if code in _DENIED:
        return S3AccessDenied(
            f"Access denied to {action} {where}{at} ({code}). Check the IAM or bucket policy "
            "for this operation; for a public bucket use anon=True.", **kw)
    if code in _CHANGED:
        return S3Error(
            f"{where} changed after it was listed ({code}, while trying to {action} it): "
            "it was written again while this run read it. Run again once it is no longer "
            "being written.", **kw)
    if code in _NOT_FOUND_KEY:
        return S3ObjectNotFound(f"{where} does not exist{at} (while trying to {action} it).",
                                **kw)
    message = response.get("Error", {}).get("Message") or str(exc)
    return S3Error(f"S3 refused to {action} {where}{at}: {code or status}: {message}", **kw)


@contextlib.contextmanager
def s3_errors(*, bucket: str | None = None, key: str | None = None, action: str = "access",
              endpoint: str | None = None) -> Iterator[None]:
    """Translate botocore errors raised in the block (``raise … from exc``)."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise translate(exc, bucket=bucket, key=key, action=action, endpoint=endpoint) from exc


def what_to_do(exc: BaseException) -> str | None:
    """What to do about an error of botocore's that no request can fix (credentials,
    region, network); ``None`` for a refusal or another answer of AWS's."""
    b = botocore.exceptions
    if isinstance(exc, (b.NoCredentialsError, b.PartialCredentialsError)):
        return ("no AWS credentials found. Set AWS_PROFILE (or run 'aws configure'), or "
                "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.")
    if isinstance(exc, b.NoRegionError):
        return "no AWS region is configured. Give --region, or set AWS_DEFAULT_REGION."
    if isinstance(exc, (b.EndpointConnectionError, b.ConnectTimeoutError,
                        b.ReadTimeoutError, b.ConnectionClosedError)):
        return (f"could not reach AWS ({exc}). Check the network, the region, and "
                "AWS_ENDPOINT_URL if you set one.")
    return None
