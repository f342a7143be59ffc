"""Download many objects: concurrent, skip-unchanged, never a partial file at a destination.

s3transfer writes each object to a temporary name beside the destination and renames
it only when complete (and removes it on failure), so a destination path either holds
the whole object or nothing new. Sizes known from a LIST are handed to s3transfer, so
no HEAD request is made per object.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions
from s3transfer.subscribers import BaseSubscriber

from ..exceptions import ConfigurationError, NipypeS3Error, TransferFailed
from .errors import translate
from .hashing import etag_matches
from .session import endpoint_of
from .transfer import Progress, Timer, TransferSettings, TransferSummary, make_manager

__all__ = ["DownloadItem", "download_files"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownloadItem:
    """One object and the local path it goes to; the rest from a LIST, if known.

    With ``last_modified`` known, the downloaded file's modification time is set to it.
    A later run then recognises the file by size and time alone, without reading it,
    and nipype's size-and-mtime hashing sees the same file after a re-download.
    """

    key: str
    dest: str
    size: int | None = None
    etag: str | None = None
    last_modified: _dt.datetime | None = None

    @property
    def mtime(self) -> float | None:
        """``last_modified`` as seconds since the epoch."""
        return self.last_modified.timestamp() if self.last_modified else None


class _ProvideSize(BaseSubscriber):
    """Hands s3transfer what a LIST already said, so it sends no HEAD request."""

    def __init__(self, size: int, etag: str | None) -> None:
        self._size = size
        self._etag = etag

    def on_queued(self, future, **kwargs):
        future.meta.provide_transfer_size(self._size)
        if self._etag and hasattr(future.meta, "provide_object_etag"):
            future.meta.provide_object_etag(f'"{self._etag.strip(chr(34))}"')


def _unchanged(item: DownloadItem, settings: TransferSettings) -> bool:
    if item.size is None:
        return False
    try:
        st = os.stat(item.dest)
    except OSError:
        return False
    if st.st_size != item.size or not os.path.isfile(item.dest):
        return False
    if item.mtime is not None and int(st.st_mtime) == int(item.mtime):
        return True  # size and time as we left them: no need to read the file
    if item.etag is None or not etag_matches(item.dest, item.etag,
                                             part_size=settings.multipart_chunksize):
        return False
    _set_mtime(item)
    return True


def _set_mtime(item: DownloadItem) -> None:
    if item.mtime is not None:
        try:
            os.utime(item.dest, (item.mtime, item.mtime))
        except OSError:  # pragma: no cover - a file system without utime
            pass


def download_files(client, bucket: str, items, *, settings: TransferSettings | None = None,
                   skip_unchanged: bool = True, request_payer: bool = False,
                   target: str | None = None) -> TransferSummary:
    """Download ``items`` (:class:`DownloadItem`) from ``bucket``.

    Returns
    -------
    TransferSummary
        ``done`` lists the destination paths written.

    Raises
    ------
    TransferFailed
        Some objects did not download after retries; no partial file is left at their
        destination paths.
    """
    settings = settings or TransferSettings()
    items = list(items)
    dests = [os.path.abspath(i.dest) for i in items]
    if len(set(dests)) != len(dests):
        dup = next(d for d in dests if dests.count(d) > 1)
        raise ConfigurationError(
            f"Two objects would be downloaded to the same path {dup!r}; give them distinct "
            "destinations.")
    endpoint = endpoint_of(client)
    summary = TransferSummary(verb="Downloaded", target=target or f"from s3://{bucket}")
    extra = {"RequestPayer": "requester"} if request_payer else {}

    with Timer() as timer:
        todo = items
        if skip_unchanged and items:
            with ThreadPoolExecutor(max_workers=min(8, max(1, settings.max_concurrency))) as ex:
                same = list(ex.map(lambda it: _unchanged(it, settings), items))
            todo = []
            for item, unchanged in zip(items, same, strict=True):
                if unchanged:
                    summary.skipped += 1
                    summary.skipped_bytes += item.size or 0
                else:
                    todo.append(item)
        failures = []
        if todo:
            for item in todo:
                os.makedirs(os.path.dirname(os.path.abspath(item.dest)) or ".", exist_ok=True)
            total = sum(i.size or 0 for i in todo)
            progress = Progress(total, "download", settings.progress)
            manager = make_manager(client, settings)
            try:
                futures = []
                for item in todo:
                    subs = [progress]
                    if item.size is not None:
                        subs.insert(0, _ProvideSize(item.size, item.etag))
                    futures.append((item, manager.download(
                        bucket, item.key, item.dest, extra_args=extra, subscribers=subs)))
                for item, future in futures:
                    try:
                        future.result()
                    except (botocore.exceptions.BotoCoreError,
                            botocore.exceptions.ClientError, NipypeS3Error) as exc:
                        failures.append((item.key, translate(
                            exc, bucket=bucket, key=item.key, action="download",
                            endpoint=endpoint)))
                    except OSError as exc:
                        failures.append((item.key, exc))
                    else:
                        _set_mtime(item)
                        summary.files += 1
                        summary.bytes += item.size if item.size is not None else \
                            os.path.getsize(item.dest)
                        summary.done.append(item.dest)
                        logger.debug("downloaded s3://%s/%s -> %s", bucket, item.key,
                                     item.dest)
            except BaseException:
                manager.shutdown(cancel=True)
                raise
            else:
                manager.shutdown()
            finally:
                progress.close()
    summary.seconds = timer.seconds
    if failures:
        first_key, first_err = failures[0]
        raise TransferFailed(
            f"{len(failures)} of {len(items)} objects failed to download from s3://{bucket} "
            f"({summary.files} downloaded). First failure, {first_key!r}: {first_err}",
            failures=failures, bucket=bucket) from first_err
    logger.debug("%s", summary.line())
    return summary
