"""Large objects down: ranged GETs through botocore, each streamed straight into its file.

Each thread here asks botocore for one range of one object and writes the body at its
offset in the file as it arrives, a megabyte at a time: a part is never held in memory
whole. Measured on the 2-core benchmark VM, against SeaweedFS on loopback
(``docs/benchmarks.rst``): 4 x 200 MiB came down in 0.51-0.66 s this way, against
0.85-0.97 s through the CRT, which keeps every part whole until it is delivered (256 MB
resident, each page of it new to a new process) and copies it again into Python for
the write, and 0.73-0.94 s for s5cmd, which streams as we do.

botocore signs and sends every request, so the endpoint, region, credentials, proxies,
TLS settings, request-payer header and error messages are exactly those of every other
request; a body cut off while it streams is asked for again here. Every range of an
object carries ``If-Match`` with the ETag of the LIST, so the parts are all of the one
object listed, or the download fails with the server's answer.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions

from .native import open_empty

__all__ = ["AVAILABLE", "STREAM_ERRORS", "ranged_download", "ranges"]

logger = logging.getLogger(__name__)

#: writes at an offset (not on Windows, where s3transfer downloads large objects)
AVAILABLE = hasattr(os, "pwrite")

#: a body that ended or stalled while it streamed: the same request is worth making again
STREAM_ERRORS = (botocore.exceptions.ReadTimeoutError,
                 botocore.exceptions.ResponseStreamingError,
                 botocore.exceptions.IncompleteReadError,
                 botocore.exceptions.ConnectionClosedError, ConnectionError)
#: attempts of one range, each with botocore's own retries of the request
ATTEMPTS = 3

#: the largest range asked for at once: large enough that a round trip per range costs
#: little at a distance, small enough that a few files keep every thread busy
RANGE_SIZE = 32 * 1024 * 1024
#: bytes read from the socket at a time
_READ = 1024 * 1024
#: bytes written at a time (measured on this VM: a write of a megabyte or more into the
#: page cache cost several times the kernel time of the same bytes in 64 KiB writes)
_WRITE_SLICE = 64 * 1024


class _Stopped(Exception):
    """The download as a whole is being abandoned (an interrupt in the caller)."""


class _WrongAnswer(Exception):
    """The server answered a range with another length than the one asked for."""


def ranges(size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each range of an object of ``size`` bytes, all of about
    the same length and none above :data:`RANGE_SIZE` (one range, of the whole object,
    when it fits; an empty object is one range of nothing)."""
    count = max(1, -(-size // RANGE_SIZE))
    step = -(-size // count) if size else 0
    return [(offset, min(step, size - offset)) for offset in range(0, size, step)] \
        if size else [(0, 0)]


def ranged_download(client, bucket: str, jobs, *, threads: int, extra: dict,
                    on_bytes=None, on_done=None) -> dict[int, BaseException]:
    """GET each ``(key, temp_path, size, etag)`` of ``jobs`` into its temporary path.

    ``size`` is the object's, from a LIST; ``etag`` (or ``None``) is asked for with
    ``If-Match``. Ranges are taken in order of ``jobs``, so files complete in about that
    order; ``on_done(index)`` is called (from a worker thread) as each one completes,
    its file closed. Returns the indexes that did not complete, with why; their
    temporary files are removed. On an interruption every thread stops after its
    current read, every temporary file is removed, and the interruption is raised.
    """
    jobs = list(jobs)
    work = [(index, offset, length) for index, job in enumerate(jobs)
            for offset, length in ranges(job[2])]
    left = [len(ranges(job[2])) for job in jobs]  # ranges of each file not yet finished
    fds: dict[int, int] = {}
    failed: dict[int, BaseException] = {}
    lock = threading.Lock()
    stop = threading.Event()
    position = iter(work)

    def finish(index: int, exc: BaseException | None) -> None:
        with lock:
            if exc is not None and index not in failed:
                failed[index] = exc
            left[index] -= 1
            if left[index]:
                return
            fd = fds.pop(index, None)
            gone = index in failed or stop.is_set()
        if fd is not None:
            os.close(fd)
        if gone:
            _remove(jobs[index][1])
        elif on_done is not None:
            on_done(index)

    def descriptor(index: int) -> int:
        with lock:
            fd = fds.get(index)
            if fd is None:
                fd = fds[index] = open_empty(jobs[index][1], jobs[index][2])
            return fd

    def worker() -> None:
        while not stop.is_set():
            with lock:
                index, offset, length = next(position, (None, 0, 0))
            if index is None:
                return
            if index in failed:  # another range of it failed: nothing more to fetch
                finish(index, None)
                continue
            key, _tmp, size, etag = jobs[index]
            try:
                _get_range(client, bucket, key, etag, descriptor(index), offset, length,
                           whole=length == size, extra=extra, on_bytes=on_bytes,
                           stop=stop)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                finish(index, exc)
            else:
                finish(index, None)

    count = max(1, min(threads, len(work)))
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="nipype-s3-range")
    try:
        futures = [pool.submit(worker) for _ in range(count)]
        for future in futures:
            future.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True)
        with lock:
            opened = list(fds.values())
            fds.clear()
        for fd in opened:
            os.close(fd)
        for _key, tmp, _size, _etag in jobs:
            _remove(tmp)
        raise
    pool.shutdown(wait=True)
    return failed


def _get_range(client, bucket: str, key: str, etag: str | None, fd: int, offset: int,
               length: int, *, whole: bool, extra: dict, on_bytes,
               stop: threading.Event) -> None:
    """Write bytes ``offset`` to ``offset + length`` of the object at the same offset of
    ``fd``, as they arrive; asked again (from its start) if the body is cut off."""
    args = {"Bucket": bucket, "Key": key, **extra}
    if not whole:
        args["Range"] = f"bytes={offset}-{offset + length - 1}"
    if etag:
        args["IfMatch"] = f'"{etag.strip(chr(34))}"'
    counted = 0  # bytes reported to on_bytes: a range asked again is not counted twice
    for attempt in range(1, ATTEMPTS + 1):
        response = client.get_object(**args)
        body = response["Body"]
        try:
            if response.get("ContentLength") != length:
                # a server that ignores Range sends the whole object: not what was asked
                raise _WrongAnswer(
                    f"asked for {length} bytes of s3://{bucket}/{key} at {offset}, the "
                    f"answer has {response.get('ContentLength')}")
            done = 0
            while done < length:
                if stop.is_set():
                    raise _Stopped()
                chunk = body.read(min(_READ, length - done))
                if not chunk:
                    break
                _write_at(fd, chunk, offset + done)
                done += len(chunk)
                if on_bytes is not None and done > counted:
                    on_bytes(done - counted)
                    counted = done
            if done != length:
                raise botocore.exceptions.IncompleteReadError(actual_bytes=done,
                                                              expected_bytes=length)
            return
        except STREAM_ERRORS:
            if attempt == ATTEMPTS:
                raise
            logger.debug("range %d-%d of s3://%s/%s was cut off; asking again", offset,
                         offset + length - 1, bucket, key)
        finally:
            body.close()


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    end = len(view)
    pos = 0
    while pos < end:
        pos += os.pwrite(fd, view[pos:pos + _WRITE_SLICE], offset + pos)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
