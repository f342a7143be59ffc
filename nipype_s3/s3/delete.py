"""Delete keys in batches of 1,000 (one request per batch)."""

from __future__ import annotations

import logging

from ..exceptions import S3Error
from .errors import s3_errors
from .session import endpoint_of

__all__ = ["delete_keys"]

logger = logging.getLogger(__name__)

_BATCH = 1000


def delete_keys(client, bucket: str, keys) -> int:
    """Delete ``keys`` from ``bucket``; return how many were deleted.

    Raises
    ------
    S3Error
        S3 refused some deletions; the message names the first key and the reason.
    """
    keys = sorted(set(keys))
    deleted = 0
    for start in range(0, len(keys), _BATCH):
        batch = keys[start:start + _BATCH]
        with s3_errors(bucket=bucket, key=batch[0], action="delete",
                       endpoint=endpoint_of(client)):
            resp = client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise S3Error(
                f"S3 refused to delete {len(errors)} of {len(batch)} keys in s3://{bucket}; "
                f"first: {first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}",
                bucket=bucket, key=first.get("Key"), code=first.get("Code"))
        deleted += len(batch)
        for key in batch:
            logger.debug("deleted s3://%s/%s", bucket, key)
    return deleted
