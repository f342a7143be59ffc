"""Upload many local files to S3: concurrent, skip-unchanged, encrypted, nothing half-done.

One LIST of the destination prefix tells which keys already hold the same bytes
(compared by ETag, multipart ETags included), so an unchanged re-run sends no object
data and makes no HEAD request. A failed multipart upload is aborted by s3transfer, so
no incomplete upload is left behind.

An item that says its SHA-256 goes up with it as the object's checksum: a single PUT
carries ``ChecksumSHA256``, so S3 refuses bytes that differ from it (``BadDigest``);
a multipart upload carries a SHA-256 per part (S3 then keeps the checksum of those, a
"composite" one: it cannot carry the whole file's, which the caller checks otherwise).
"""

from __future__ import annotations

import base64
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions

from .. import config as cfg
from ..config import METADATA_MD5_KEY
from ..exceptions import ConfigurationError, InputFileNotFound, NipypeS3Error, TransferFailed
from .digests import cached_digest
from .errors import s3_errors, translate
from .hashing import b64_sha256, etag_matches, file_md5, remember_etag
from .listing import ObjectInfo, common_prefix, list_objects, observed_rtt
from .native import native_engine
from .session import endpoint_of
from .transfer import (
    Progress,
    Timer,
    TransferSettings,
    TransferSummary,
    fit_concurrency,
    run_transfers,
)

__all__ = ["UploadItem", "upload_files", "sse_args", "checksum_args"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadItem:
    """One local file and the key it goes to.

    ``sha256`` (hex), when given, is what the file's bytes must hash to: it is sent as
    the object's checksum (see the module's docstring).
    """

    source: str
    key: str
    sha256: str | None = None


def checksum_args(sha256: str | None, *, multipart: bool) -> dict:
    """The checksum arguments of the request(s) sending bytes of SHA-256 ``sha256``
    (hex; ``None``: none): the whole object's checksum for one PUT, the algorithm alone
    (a SHA-256 per part) for a multipart upload."""
    if not sha256:
        return {}
    if multipart:
        # not ChecksumSHA256: s3transfer would ask for a FULL_OBJECT checksum, which S3
        # has for CRCs only
        return {"ChecksumAlgorithm": "SHA256"}
    # with the algorithm named, servers that only record checksums (moto) keep it too
    return {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": b64_sha256(sha256)}


def sse_args(sse: str | None = None, kms_key_id: str | None = None) -> dict:
    """``ExtraArgs`` for server-side encryption.

    ``sse`` is ``None``, ``"AES256"`` or ``"aws:kms"``; a ``kms_key_id`` implies
    ``aws:kms``.
    """
    if kms_key_id:
        if sse not in (None, "aws:kms"):
            raise ConfigurationError(
                f"kms_key_id is set but the encryption asked for is {sse!r}; a KMS key needs "
                "'aws:kms' (leave the encryption unset, or drop kms_key_id for AES256).")
        return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id}
    if sse in (None, ""):
        return {}
    if sse not in ("AES256", "aws:kms"):
        raise ConfigurationError(
            f"Unknown server-side encryption {sse!r}: use 'AES256' or 'aws:kms'.")
    return {"ServerSideEncryption": sse}


def _md5(path: str) -> str:
    return cached_digest(path, "md5", file_md5)


def _check_sources(items) -> list[int]:
    sizes = []
    for item in items:
        try:
            st = os.stat(item.source)
        except FileNotFoundError:
            raise InputFileNotFound(
                f"Cannot upload {item.source!r} to key {item.key!r}: the file does not exist. "
                "Check the path connected to this input.") from None
        except PermissionError as exc:
            raise InputFileNotFound(
                f"Cannot upload {item.source!r}: it is not readable by this user.") from exc
        if not os.path.isfile(item.source):
            raise InputFileNotFound(
                f"Cannot upload {item.source!r} as key {item.key!r}: it is not a regular file.")
        sizes.append(st.st_size)
    return sizes


def _version(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def _remember_etags(client, bucket: str, items, done: list[str], versions: dict,
                    settings: TransferSettings, answered: dict[str, str]) -> None:
    """Each uploaded file's ETag kept for the version of it that was sent (best effort:
    without it the next run reads the files).

    ``answered`` holds the ETags the PUTs' answers gave (``{key: etag}``); one LIST of
    what was written brings the others (multipart uploads, whose ETag s3transfer does
    not hand back). A LIST costs a round trip: 50 ms at a distance, a tenth of sending
    60 small files.
    """
    sent = set(done)
    missing = [key for key in done if key not in answered]
    listed: dict[str, tuple[int | None, str]] = {}
    if missing:
        try:
            listed = {key: (info.size, info.etag) for key, info in
                      list_objects(client, bucket, common_prefix(missing)).items()}
        except (NipypeS3Error, botocore.exceptions.BotoCoreError,
                botocore.exceptions.ClientError) as exc:
            logger.debug("the ETags of the uploads are not kept: %s", exc)
    for item in items:
        version = versions.get(item.source)
        if item.key not in sent or version is None:
            continue
        size, etag = (None, answered[item.key]) if item.key in answered else \
            listed.get(item.key, (-1, ""))
        if size is not None and etag.rpartition("-")[2] != str(
                -(-version.st_size // settings.multipart_chunksize)):
            continue  # not the parts this upload sent: written by someone else since
        if etag and size in (None, version.st_size):
            remember_etag(item.source, etag, version, part_size=settings.multipart_chunksize)


def _unchanged(client, bucket: str, item: UploadItem, size: int, remote: ObjectInfo | None,
               settings: TransferSettings, kms: bool) -> bool:
    if remote is None or remote.size != size:
        return False
    if etag_matches(item.source, remote.etag, part_size=settings.multipart_chunksize):
        return True
    if kms or "-" in remote.etag:
        # ETag is not the MD5 of the bytes (SSE-KMS, or parts of another size):
        # compare the MD5 kept in the object's metadata.
        with s3_errors(bucket=bucket, key=item.key, action="read the metadata of",
                       endpoint=endpoint_of(client)):
            head = client.head_object(Bucket=bucket, Key=item.key)
        stored = head.get("Metadata", {}).get(METADATA_MD5_KEY)
        return bool(stored) and stored == _md5(item.source)
    return False


def _native_first(client, bucket, settings, small, args, kms, progress, etags):
    """PUT the small files the native engine can; hand back ``(outcomes, left)``.

    ``left`` are the ``(item, size)`` pairs for botocore: all of them when there is no
    engine or ``args`` hold something the engine does not send. ``etags`` gets the
    ETags the answers gave (``{key: etag}``).
    """
    engine = native_engine(client, bucket, max_concurrency=settings.max_concurrency,
                           part_size=settings.multipart_chunksize) if small else None
    if engine is None:
        return [], small

    def job(pair):
        item = pair[0]
        try:
            digest = _md5(item.source) if kms or engine.signs_bodies else None
        except OSError:  # gone since it was checked: the PUT fails and botocore reports it
            return item.key, item.source, None, None, None
        meta = {METADATA_MD5_KEY: digest} if kms else None
        # over plain HTTP the CRT cannot hash bodies into the signature as botocore does;
        # a Content-MD5 has the server check each body instead (and the digest is kept,
        # so the next run's skip-unchanged comparison reads nothing)
        content_md5 = base64.b64encode(bytes.fromhex(digest)).decode() \
            if engine.signs_bodies else None
        return item.key, item.source, meta, content_md5, \
            b64_sha256(item.sha256) if item.sha256 else None

    try:
        # digests are computed ahead, in two threads, while the first requests go out
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nipype-s3-md5")
        try:
            failed = engine.upload(pool.map(job, small), extra=args, etags=etags,
                                   on_bytes=progress.update, stall_seconds=cfg.read_timeout())
        finally:
            pool.shutdown(cancel_futures=True)
    except ValueError as exc:  # arguments the engine does not send
        logger.debug("botocore uploads: %s", exc)
        return [], small
    outcomes, left = [], []
    for index, pair in enumerate(small):
        if index in failed:
            logger.debug("native upload of %s did not complete (%s); retrying with botocore",
                         pair[0].source, failed[index])
            left.append(pair)
        else:
            outcomes.append((pair, None))
    return outcomes, left


def upload_files(client, bucket: str, items, *, settings: TransferSettings | None = None,
                 sse: str | None = None, kms_key_id: str | None = None,
                 skip_unchanged: bool = True, existing: dict[str, ObjectInfo] | None = None,
                 extra_args: dict | None = None, target: str | None = None) -> TransferSummary:
    """Upload ``items`` (:class:`UploadItem`) to ``bucket``.

    Parameters
    ----------
    client
        A boto3 S3 client.
    bucket : str
        The destination bucket.
    items : iterable of UploadItem
        Local files and their keys. Every source is checked before anything is sent.
    settings : TransferSettings
        Concurrency, part sizes, progress bar.
    sse, kms_key_id : str, optional
        Server-side encryption (see :func:`sse_args`).
    skip_unchanged : bool
        Skip files whose key already holds the same bytes (one LIST, no HEAD).
    existing : dict, optional
        A listing already made (``{key: ObjectInfo}``); saves the LIST.
    extra_args : dict, optional
        More ``ExtraArgs`` for every object (e.g. ``ContentType``).
    target : str, optional
        How to name the destination in the summary line.

    Returns
    -------
    TransferSummary
        Files and bytes sent, files skipped; ``done`` lists the keys written.

    Raises
    ------
    InputFileNotFound
        A source is missing (nothing is sent).
    TransferFailed
        Some files did not upload after retries; the others did. ``failures`` lists them.
    """
    settings = settings or TransferSettings()
    items = list(items)
    sizes = _check_sources(items)
    args = dict(extra_args or {})
    args.update(sse_args(sse, kms_key_id))
    kms = args.get("ServerSideEncryption") == "aws:kms"
    endpoint = endpoint_of(client)
    summary = TransferSummary(verb="Uploaded", target=target or f"to s3://{bucket}")

    with Timer() as timer:
        todo = list(zip(items, sizes, strict=True))
        if skip_unchanged and items:
            if existing is None:
                existing = list_objects(client, bucket, common_prefix(i.key for i in items))
            with ThreadPoolExecutor(max_workers=min(8, max(1, settings.max_concurrency))) as ex:
                same = list(ex.map(
                    lambda pair: _unchanged(client, bucket, pair[0], pair[1],
                                            existing.get(pair[0].key), settings, kms), todo))
            keep = []
            for (item, size), unchanged in zip(todo, same, strict=True):
                if unchanged:
                    summary.skipped += 1
                    summary.skipped_bytes += size
                    logger.debug("unchanged, skipped: s3://%s/%s", bucket, item.key)
                else:
                    keep.append((item, size))
            todo = keep

        failures = []
        # each file's version as it is sent: once S3 holds it, its ETag is kept for that
        # version, so the next unchanged run compares it without reading the file
        versions = {item.source: _version(item.source) for item, _ in todo} \
            if skip_unchanged and not kms else {}
        etags: dict[str, str] = {}  # {key: ETag} as the PUTs' answers gave them
        if todo:
            progress = Progress(sum(s for _, s in todo), "upload", settings.progress)

            def object_args(item):
                obj_args = dict(args)
                if kms:
                    obj_args["Metadata"] = {METADATA_MD5_KEY: _md5(item.source)}
                return obj_args

            def put_small(pair):
                item, size = pair
                with open(item.source, "rb") as body:
                    answer = client.put_object(Bucket=bucket, Key=item.key, Body=body,
                                               **object_args(item),
                                               **checksum_args(item.sha256, multipart=False))
                if answer.get("ETag") and answer.get("ServerSideEncryption") in (
                        None, "AES256") and not answer.get("SSECustomerAlgorithm"):
                    # (under SSE-KMS, the bucket's default say, an ETag is no MD5)
                    etags[item.key] = str(answer["ETag"]).strip('"')
                progress.update(size)

            def submit_large(manager, pair):
                item, _ = pair
                return manager.upload(item.source, bucket, item.key,
                                      extra_args={**object_args(item),
                                                  **checksum_args(item.sha256, multipart=True)},
                                      subscribers=[progress])

            small = [p for p in todo if p[1] < settings.multipart_threshold]
            large = [p for p in todo if p[1] >= settings.multipart_threshold]
            # at a distance, more small files in flight
            fitted = fit_concurrency(settings, observed_rtt(client), len(small))
            try:
                outcomes, small = _native_first(client, bucket, fitted, small, args, kms,
                                                progress, etags if versions else None)
                outcomes += run_transfers(client, settings, small, put_small, large,
                                          submit_large, small_settings=fitted)
            finally:
                progress.close()
            for (item, size), exc in outcomes:
                if exc is None:
                    summary.files += 1
                    summary.bytes += size
                    summary.done.append(item.key)
                    logger.debug("uploaded %s -> s3://%s/%s", item.source, bucket, item.key)
                    continue
                if isinstance(exc, (botocore.exceptions.BotoCoreError,
                                    botocore.exceptions.ClientError)):
                    exc = translate(exc, bucket=bucket, key=item.key, action="upload",
                                    endpoint=endpoint)
                failures.append((item.source, exc))
                logger.debug("upload failed: %s -> s3://%s/%s: %s", item.source, bucket,
                             item.key, exc)
        if versions and summary.done:
            _remember_etags(client, bucket, items, summary.done, versions, settings, etags)
    summary.seconds = timer.seconds
    if failures:
        first_src, first_err = failures[0]
        raise TransferFailed(
            f"{len(failures)} of {len(items)} files failed to upload to s3://{bucket} "
            f"({summary.files} uploaded, {summary.skipped} unchanged). First failure, "
            f"{first_src!r}: {first_err}", failures=failures, bucket=bucket) from first_err
    logger.debug("%s", summary.line())
    return summary
