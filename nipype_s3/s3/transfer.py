"""Shared transfer machinery: settings, the s3transfer manager, progress and summaries.

The operations themselves live in :mod:`.upload`, :mod:`.download` and :mod:`.delete`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from s3transfer.manager import TransferConfig as _S3TConfig
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from .. import config as cfg

__all__ = ["TransferSettings", "TransferSummary", "make_manager", "Progress", "format_bytes",
           "run_transfers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferSettings:
    """How transfers run. Tuning only: none of it changes what ends up where.

    Parameters
    ----------
    max_concurrency : int
        Requests in flight at once (files, and parts of large files).
    multipart_threshold, multipart_chunksize : int
        Files at least ``multipart_threshold`` bytes go in parts of ``multipart_chunksize``.
    progress : bool
        Show a tqdm progress bar (bytes) on stderr.
    """

    max_concurrency: int = cfg.DEFAULT_MAX_CONCURRENCY
    multipart_threshold: int = cfg.DEFAULT_MULTIPART_THRESHOLD
    multipart_chunksize: int = cfg.DEFAULT_MULTIPART_CHUNKSIZE
    progress: bool = False


def make_manager(client, settings: TransferSettings) -> TransferManager:
    """An s3transfer ``TransferManager`` around ``client`` for ``settings``."""
    conf = _S3TConfig(
        multipart_threshold=settings.multipart_threshold,
        multipart_chunksize=settings.multipart_chunksize,
        max_request_concurrency=max(1, settings.max_concurrency),
        max_submission_concurrency=max(2, min(8, settings.max_concurrency)),
        # at most 100 x 256 KiB chunks wait to be written: memory stays bounded,
        # whatever the size of the files
        max_io_queue_size=100,
        # each attempt already has botocore's retries; these cover a body cut mid-stream
        num_download_attempts=3,
    )
    return TransferManager(client, conf)


#: requests in flight for small objects at a distance, at most (each holds one small
#: body: 128 x 256 KiB is 32 MiB)
MAX_SMALL_CONCURRENCY = 128
#: a request taking at least this long (seconds) is a server at a distance
_DISTANT = 0.015


def fit_concurrency(settings: TransferSettings, rtt: float | None,
                    small: int) -> TransferSettings:
    """The settings for ``small`` single-request objects when a request costs ``rtt``
    seconds: with the default concurrency, more requests in flight at a distance (each
    waits a round trip, the CPU does not: 16 at 20 ms made small files half as fast as
    s5cmd's 256 workers), up to :data:`MAX_SMALL_CONCURRENCY`. A concurrency the user
    chose is kept."""
    base = settings.max_concurrency
    if base != cfg.DEFAULT_MAX_CONCURRENCY or rtt is None or rtt < _DISTANT or small <= base:
        return settings
    wanted = min(MAX_SMALL_CONCURRENCY, base * max(1, round(rtt / 0.005)))
    # no more than the files, rounded up to a power of two: engines are kept per
    # concurrency, so one per batch size would pile up in a process sinking many batches
    wanted = min(wanted, 1 << (small - 1).bit_length())
    return replace(settings, max_concurrency=max(base, wanted))


def run_transfers(client, settings: TransferSettings, small: list, do_small, large: list,
                  submit_large, *,
                  small_settings: TransferSettings | None = None
                  ) -> list[tuple[object, BaseException | None]]:
    """Transfer ``small`` items with a plain thread pool and ``large`` ones with s3transfer.

    Small objects are one request each: a direct ``PutObject``/``GetObject`` from a thread
    pool costs less CPU per file than s3transfer's task machinery (measured: about 15% more
    files/s on two cores); large ones go in parts through s3transfer. Returns
    ``(item, error or None)`` for every item, in order. On an interruption, pending work is
    cancelled (and s3transfer aborts its multipart uploads) before re-raising.
    """
    from concurrent.futures import ThreadPoolExecutor

    manager = make_manager(client, settings) if large else None
    workers = (small_settings or settings).max_concurrency
    pool = ThreadPoolExecutor(max_workers=max(1, workers),
                              thread_name_prefix="nipype-s3") if small else None
    outcomes: list[tuple[object, BaseException | None]] = []
    try:
        futures = [(item, submit_large(manager, item)) for item in large]
        futures += [(item, pool.submit(do_small, item)) for item in small]
        for item, future in futures:
            try:
                future.result()
                outcomes.append((item, None))
            except Exception as exc:  # reported per item by the caller
                outcomes.append((item, exc))
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if manager is not None:
            manager.shutdown(cancel=True)
        raise
    if pool is not None:
        pool.shutdown(wait=True)
    if manager is not None:
        manager.shutdown()
    return outcomes


def format_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


@dataclass
class TransferSummary:
    """What a batch of transfers did: counted, never guessed."""

    verb: str = "Transferred"
    target: str = ""
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    deleted: int = 0
    seconds: float = 0.0
    done: list = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Bytes per second moved (0 when nothing moved)."""
        return self.bytes / self.seconds if self.seconds > 0 and self.bytes else 0.0

    def line(self) -> str:
        """One log line: files, bytes, skipped, speed."""
        text = (f"{self.verb} {self.files} file{'s' if self.files != 1 else ''} "
                f"({format_bytes(self.bytes)}) {self.target} in {self.seconds:.2f} s")
        if self.bytes and self.seconds > 0:
            text += f" ({format_bytes(self.rate)}/s)"
        if self.skipped:
            text += f"; {self.skipped} unchanged skipped ({format_bytes(self.skipped_bytes)})"
        if self.deleted:
            text += f"; {self.deleted} stale deleted"
        return text


class Progress(BaseSubscriber):
    """Feeds a tqdm bar from s3transfer's progress callbacks (one bar per batch)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, leave=False)

    def on_progress(self, future, bytes_transferred, **kwargs):  # noqa: D401 - s3transfer API
        if self._bar is not None:
            self._bar.update(bytes_transferred)

    def update(self, nbytes: int) -> None:
        """Progress made outside s3transfer (small objects)."""
        if self._bar is not None:
            self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start
        return False
