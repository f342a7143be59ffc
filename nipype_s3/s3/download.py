"""Download many objects: concurrent, skip-unchanged, never a partial file at a destination.

s3transfer writes each object to a temporary name beside the destination and renames
it only when complete (and removes it on failure), so a destination path either holds
the whole object or nothing new. Sizes known from a LIST are handed to s3transfer, so
no HEAD request is made per object.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import os
import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import botocore.exceptions
from s3transfer.subscribers import BaseSubscriber

from .. import config as cfg
from ..exceptions import ConfigurationError, NipypeS3Error, TransferFailed
from ..localfs import make_folder
from . import ranged
from .errors import translate
from .hashing import etag_matches
from .listing import observed_rtt
from .native import engine_choice, native_engine, open_empty, remove_if_there
from .session import endpoint_of
from .transfer import (
    Progress,
    Timer,
    TransferSettings,
    TransferSummary,
    fit_concurrency,
    run_transfers,
)

__all__ = ["DownloadItem", "download_files", "is_partial"]

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


def _get_to_temp(client, bucket: str, item: DownloadItem, extra: dict) -> None:
    """GET one object into a temporary file beside ``item.dest``, renamed when complete.

    botocore retries a request that fails; a body cut off while it streams is retried
    here. On failure nothing is left at the destination path, nor a temporary file.
    """
    tmp = f"{item.dest}.nipype-s3-{os.getpid()}-{threading.get_ident()}.part"
    for attempt in range(1, ranged.ATTEMPTS + 1):
        try:
            resp = client.get_object(Bucket=bucket, Key=item.key, **extra)
            read = functools.partial(resp["Body"].read, 1024 * 1024)
            with open(tmp, "wb") as fobj:
                for chunk in iter(read, b""):
                    fobj.write(chunk)
            if item.size is not None and os.path.getsize(tmp) != item.size:
                raise botocore.exceptions.IncompleteReadError(
                    actual_bytes=os.path.getsize(tmp), expected_bytes=item.size)
            os.replace(tmp, item.dest)
            return
        except ranged.STREAM_ERRORS:
            if attempt == ranged.ATTEMPTS:
                _remove(tmp)
                raise
        except BaseException:
            _remove(tmp)
            raise


_remove = remove_if_there


def _quick_check(item: DownloadItem) -> bool | None:
    """From ``stat`` alone: ``False`` to download, ``True`` unchanged, ``None`` to hash."""
    if item.size is None:
        return False
    try:
        st = os.stat(item.dest)
    except OSError:
        return False
    if st.st_size != item.size or not stat.S_ISREG(st.st_mode):
        return False
    if item.mtime is not None and abs(st.st_mtime - item.mtime) < 0.001:
        # size and time as we left them (to the millisecond S3 gives): no need to read
        # the file. A same-size rewrite in the same second still has another time.
        return True
    return None if item.etag is not None else False


def _same_content(item: DownloadItem, settings: TransferSettings) -> bool:
    if not etag_matches(item.dest, item.etag, part_size=settings.multipart_chunksize):
        return False
    _set_mtime(item)
    return True


def _set_mtime(item: DownloadItem) -> None:
    if item.mtime is not None:
        try:
            os.utime(item.dest, (item.mtime, item.mtime))
        except OSError:  # pragma: no cover - a file system without utime
            pass


#: Temporary files opened ahead of the requests, at most (each holds a descriptor).
_OPEN_AHEAD = 64


#: the least part size given to the native engine (see :func:`_part_size`)
_MIN_PART = 1024 * 1024


def _part_size(items, settings: TransferSettings) -> int:
    """The native engine's part size for ``items``: 1 MiB when every object is known to
    be no larger, else the multipart chunk size (two sizes, not one per batch: each is
    an engine of its own, with its connections, for as long as the client lives).

    The CRT sets a part's worth of memory aside for every GET in flight, however small
    the object, and keeps those within its memory limit: with 8 MiB parts no more than
    16 GETs ran at once whatever the concurrency asked for (measured at 50 ms a round
    trip: 60 objects of 256 KiB took 0.31 s on 16 connections, 0.18 s on 60 with 1 MiB
    parts; 500 took 1.89 s and 0.62 s).
    """
    sizes = [item.size for item in items]
    if sizes and all(size is not None for size in sizes) and max(sizes) <= _MIN_PART:
        return min(_MIN_PART, settings.multipart_chunksize)
    return settings.multipart_chunksize


def _native_first(client, bucket, settings, items, request_payer, progress):
    """Download what the native engine can; hand back ``(outcomes, small, large)``.

    ``outcomes`` are the items done; ``small`` and ``large`` are those left for botocore
    (all of them when there is no engine).

    Creating a file costs a few hundred microseconds on a journalling file system (0.26 ms
    measured here), as much as starting the request, and each system call in the thread
    starting requests makes it wait for the GIL again. So two threads create and open
    the temporary files (up to :data:`_OPEN_AHEAD` ahead of the requests) and hand the
    descriptors over, and one thread puts finished files in place: the thread starting
    requests makes no system call of its own.
    """
    engine = native_engine(client, bucket, max_concurrency=settings.max_concurrency,
                           part_size=_part_size(items, settings)) if items else None
    left = items
    outcomes = []
    if engine is not None:
        temps = [f"{item.dest}.nipype-s3-{os.getpid()}-n.part" for item in items]
        placed: dict[int, object] = {}
        stopped: list[BaseException] = []  # an interrupt met while putting files in place

        def put_in_place(index):
            if stopped:
                return
            try:
                _put_in_place(items[index], temps[index])
            except Exception:
                raise
            except BaseException as exc:
                stopped.append(exc)
                raise

        def place(index):
            if stopped:  # raised here, in the thread running the requests
                raise stopped[0]
            placed[index] = placer.submit(put_in_place, index)

        opener = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nipype-s3-open")
        placer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nipype-s3-place")
        opened: dict[int, object] = {}  # index -> future of its descriptor, not handed over

        def jobs():
            ahead = 0
            for index, (item, tmp) in enumerate(zip(items, temps, strict=True)):
                while ahead < min(len(items), index + _OPEN_AHEAD):
                    opened[ahead] = opener.submit(open_empty, temps[ahead],
                                                  items[ahead].size)
                    ahead += 1
                try:
                    fd = opened.pop(index).result()
                except OSError:
                    fd = None  # the engine's own open fails too, and says why
                yield item.key, tmp, fd

        try:
            failed = engine.download(
                jobs(), request_payer=request_payer, on_bytes=progress.update,
                on_done=place, stall_seconds=cfg.read_timeout())
            for index, future in placed.items():
                exc = future.exception()
                if exc is not None and index not in failed:
                    failed[index] = exc  # e.g. a wrong size: botocore again
            if stopped:
                raise stopped[0]
        except BaseException:
            for future in list(opened.values()) + list(placed.values()):
                future.cancel()
            opener.shutdown(wait=True)
            placer.shutdown(wait=True)
            _close_opened(opened)
            for tmp in temps:  # interrupted: what is not in place yet is not left behind
                _remove(tmp)
            raise
        finally:
            opener.shutdown(wait=False)
            placer.shutdown(wait=False)
        left = []
        for index, item in enumerate(items):
            if index not in failed:
                outcomes.append((item, None))
                continue
            _remove(temps[index])
            logger.debug("native download of %s did not complete (%s); retrying with "
                         "botocore", item.key, failed[index])
            left.append(item)
    small, large = [], []
    for item in left:  # one pass: sizes known from a LIST and under the part size
        fits = item.size is not None and item.size < settings.multipart_threshold
        (small if fits else large).append(item)
    return outcomes, small, large


def _put_in_place(item: DownloadItem, tmp: str) -> None:
    """Rename the complete temporary file ``tmp`` to ``item.dest``, if it has the size
    listed, and give it the object's time."""
    size = _size(tmp)
    if item.size is not None and size != item.size:
        raise botocore.exceptions.IncompleteReadError(actual_bytes=size,
                                                      expected_bytes=item.size)
    os.replace(tmp, item.dest)
    _set_mtime(item)


#: what a ranged download hands to s3transfer: bodies cut off or stalled past retries,
#: and a file that came out short
_CUT_OFF = ranged.STREAM_ERRORS + (botocore.exceptions.EndpointConnectionError,)


def _ranged_first(client, bucket, settings, items, extra, progress, rtt):
    """Stream the objects of ``multipart_threshold`` bytes or more whose size is known
    (:mod:`.ranged`); hand back ``(outcomes, rest, again)``.

    ``outcomes`` are the items done, or refused by the server (with its error: an object
    written again since its LIST, say), ``rest`` those not tried here, and ``again``
    those cut off or stalled past the retries, for s3transfer to try.
    ``NIPYPE_S3_ENGINE=botocore`` keeps large objects on s3transfer, as before.
    """
    big = [item for item in items
           if item.size is not None and item.size >= settings.multipart_threshold]
    if not big or not ranged.AVAILABLE or engine_choice() == "botocore":
        return [], items, []
    chosen = {id(item) for item in big}
    rest = [item for item in items if id(item) not in chosen]
    temps = [f"{item.dest}.nipype-s3-{os.getpid()}-r.part" for item in big]
    unplaced: dict[int, BaseException] = {}

    def place(index):
        try:
            _put_in_place(big[index], temps[index])
        except Exception as exc:  # noqa: BLE001 - reported below
            unplaced[index] = exc
            _remove(temps[index])

    # every range in flight is one thread reading a megabyte at a time, whatever the
    # range's size: at a distance more of them wait out the round trips, within the
    # client's connection pool
    ranges = sum(ranged.range_count(item.size) for item in big)
    threads = min(fit_concurrency(settings, rtt, ranges).max_concurrency,
                  client.meta.config.max_pool_connections)
    failed = ranged.ranged_download(
        client, bucket, [(item.key, tmp, item.size, item.etag)
                         for item, tmp in zip(big, temps, strict=True)],
        threads=threads, extra=extra, on_bytes=progress.update, on_done=place)
    failed.update(unplaced)
    outcomes, again = [], []
    for index, item in enumerate(big):
        exc = failed.get(index)
        if exc is not None and not isinstance(exc, _CUT_OFF):
            # the server's answer (a refusal, another object than listed) or this
            # machine's (a folder where the file goes): s3transfer would meet it too
            outcomes.append((item, exc))
        elif exc is not None:
            logger.debug("ranged download of %s did not complete (%s); retrying with "
                         "s3transfer", item.key, exc)
            again.append(item)
        else:
            outcomes.append((item, None))
    return outcomes, rest, again


def _close_opened(opened: dict) -> None:
    """Close the descriptors opened ahead and never handed to the engine."""
    for future in opened.values():
        if future.done() and not future.cancelled() and future.exception() is None:
            try:
                os.close(future.result())
            except OSError:  # pragma: no cover - closed already
                pass


_TEMP_NAME = re.compile(r".\.nipype-s3-(\d+)-[0-9a-z]+\.part(\.[0-9a-fA-F]{8})?$")


def is_partial(path: str) -> bool:
    """Whether ``path`` is the temporary name of a download under way (or killed)."""
    return _TEMP_NAME.search(os.path.basename(path)) is not None


def _sweep_dead_temps(folder: str) -> None:
    """Remove our temporary files in ``folder`` left by processes that no longer run.

    A download killed with SIGKILL cannot clean up after itself; its
    ``<dest>.nipype-s3-<pid>-<tag>.part`` (or s3transfer's ``….part.<8 hex digits>``)
    stays beside the destination (never at it).
    The next download into the same folder removes those whose process is gone.
    """
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP_NAME.search(name)
        if match is None or int(match.group(1)) == os.getpid() \
                or _alive(int(match.group(1))):
            continue
        _remove(os.path.join(folder, name))
        logger.debug("removed %s, left by a download that was killed", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


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
            # stat in this thread (a few microseconds each); hash in threads only what
            # has the right size but another time
            same = [_quick_check(item) for item in items]
            unsure = [i for i, verdict in enumerate(same) if verdict is None]
            if unsure:
                with ThreadPoolExecutor(
                        max_workers=min(8, len(unsure), max(1, settings.max_concurrency))) as ex:
                    for i, verdict in zip(unsure, ex.map(
                            lambda i: _same_content(items[i], settings), unsure), strict=True):
                        same[i] = verdict
            todo = []
            for item, unchanged in zip(items, same, strict=True):
                if unchanged:
                    summary.skipped += 1
                    summary.skipped_bytes += item.size or 0
                else:
                    todo.append(item)
        failures = []
        if todo:
            folders = {os.path.dirname(os.path.abspath(item.dest)) or "." for item in todo}
            for folder in sorted(folders):
                make_folder(folder, purpose="download into",
                            instead="download somewhere else (local_directory)")
                _sweep_dead_temps(folder)
            total = sum(i.size or 0 for i in todo)
            progress = Progress(total, "download", settings.progress)

            def get_small(item):
                _get_to_temp(client, bucket, item, extra)
                _set_mtime(item)
                progress.update(item.size or 0)

            # s3transfer writes to "<its target>.<8 hex digits>" and renames that to its
            # target when done: its target is a temporary name of ours, put in place
            # below, so a killed run leaves names the next run can sweep
            large_temps: dict[str, str] = {}

            def submit_large(manager, item):
                subs = [progress]
                if item.size is not None:
                    subs.insert(0, _ProvideSize(item.size, item.etag))
                tmp = large_temps[item.dest] = \
                    f"{item.dest}.nipype-s3-{os.getpid()}-l{len(large_temps)}.part"
                return manager.download(bucket, item.key, tmp, extra_args=extra,
                                        subscribers=subs)

            rtt = observed_rtt(client)
            try:
                outcomes, rest, again = _ranged_first(client, bucket, settings, todo, extra,
                                                      progress, rtt)
                # at a distance, more small files in flight (a large one's parts stay
                # as many as they were: in the CRT each holds a part's memory)
                fitted = settings if any(
                    (item.size or 0) >= settings.multipart_threshold for item in rest) \
                    else fit_concurrency(settings, rtt, len(rest))
                done, small, large = _native_first(client, bucket, fitted, rest,
                                                   request_payer, progress)
                outcomes += done
                outcomes += run_transfers(client, settings, small, get_small,
                                          large + again, submit_large,
                                          small_settings=fitted)
            except BaseException:
                for tmp in large_temps.values():
                    _remove(tmp)
                raise
            finally:
                progress.close()
            for item, exc in outcomes:
                tmp = large_temps.get(item.dest)
                if tmp is not None:
                    if exc is None:
                        try:  # s3transfer's file too must have the size listed
                            _put_in_place(item, tmp)
                        except (OSError, botocore.exceptions.IncompleteReadError) as err:
                            exc = err
                    _remove(tmp)
                if exc is None:
                    summary.files += 1
                    summary.bytes += item.size if item.size is not None else \
                        os.path.getsize(item.dest)
                    summary.done.append(item.dest)
                    logger.debug("downloaded s3://%s/%s -> %s", bucket, item.key, item.dest)
                    continue
                if isinstance(exc, (botocore.exceptions.BotoCoreError,
                                    botocore.exceptions.ClientError, NipypeS3Error)):
                    exc = translate(exc, bucket=bucket, key=item.key, action="download",
                                    endpoint=endpoint)
                failures.append((item.key, exc))
    summary.seconds = timer.seconds
    if failures:
        first_key, first_err = failures[0]
        raise TransferFailed(
            f"{len(failures)} of {len(items)} objects failed to download from s3://{bucket} "
            f"({summary.files} downloaded). First failure, {first_key!r}: {first_err}",
            failures=failures, bucket=bucket) from first_err
    logger.debug("%s", summary.line())
    return summary
