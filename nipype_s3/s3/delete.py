"""Delete keys in batches of 1,000 (one request per batch); abort multipart uploads that
were begun and never completed (their parts are billed, and no listing of objects shows
them)."""

from __future__ import annotations

import logging

from ..exceptions import S3Error, S3ObjectNotFound
from .errors import s3_errors
from .session import endpoint_of

__all__ = ["delete_keys", "abort_incomplete_uploads", "incomplete_uploads"]

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


def incomplete_uploads(client, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """The multipart uploads begun below ``prefix`` and not completed: (key, upload id).

    Raises
    ------
    S3Error
        S3 refused to list them (the subclass says why, e.g. ``S3AccessDenied``).
    """
    with s3_errors(bucket=bucket, key=prefix or None, endpoint=endpoint_of(client),
                   action="list the incomplete multipart uploads below"):
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=prefix)
        return [(u["Key"], u["UploadId"]) for page in pages
                for u in page.get("Uploads", [])]


def abort_incomplete_uploads(client, bucket: str, prefix: str) -> list[str]:
    """Abort every multipart upload begun below ``prefix`` and not completed; return the
    keys of those aborted.

    A process that dies in the middle of a large upload (a lost instance, a killed
    controller) leaves its parts in the bucket, billed as storage, until the upload is
    completed or aborted. An upload that ends meanwhile is left alone.

    Raises
    ------
    S3Error
        S3 refused to list or abort (the subclass says why, e.g. ``S3AccessDenied``).
    """
    aborted = []
    for key, upload_id in incomplete_uploads(client, bucket, prefix):
        try:
            with s3_errors(bucket=bucket, key=key, endpoint=endpoint_of(client),
                           action="abort the multipart upload of"):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except S3ObjectNotFound:  # NoSuchUpload: completed or aborted meanwhile
            continue
        aborted.append(key)
        logger.debug("aborted the multipart upload of s3://%s/%s", bucket, key)
    return aborted
