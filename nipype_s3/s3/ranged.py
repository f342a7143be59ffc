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

from ..exceptions import S3Error
from .native import (
    _O_CLOEXEC,
    _PREALLOCATE_FROM,
    _preallocate,
    remove_if_there,
    write_at,
)

__all__ = ["AVAILABLE", "STREAM_ERRORS", "WrongAnswer", "range_at", "range_count",
           "ranged_download", "ranges"]

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
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


#: the largest object S3 stores (5 TiB): a listed size above it is not believed
MAX_OBJECT_SIZE = 5 * 1024 ** 4


class _Stopped(Exception):
    """The download as a whole is being abandoned (an interrupt in the caller), or this
    object is (another of its ranges failed)."""


class WrongAnswer(S3Error):
    """The server answered a range with other bytes than those asked for: another
    length, another range, or another object than the one listed. Final: asking again,
    here or through s3transfer, would not mend it."""


def range_count(size: int) -> int:
    """How many ranges :func:`ranges` cuts an object of ``size`` bytes into."""
    return max(1, -(-size // RANGE_SIZE))


def range_at(size: int, number: int) -> tuple[int, int]:
    """``(offset, length)`` of range ``number`` of an object of ``size`` bytes: ranges of
    about the same length, none above :data:`RANGE_SIZE` (one range, of the whole
    object, when it fits; an empty object is one range of nothing)."""
    step = -(-size // range_count(size))
    offset = number * step
    return offset, max(0, min(step, size - offset))


def ranges(size: int):
    """Every :func:`range_at` of an object of ``size`` bytes, in order. An iterator: a
    listed size is not believed enough to make a list of it."""
    for number in range(range_count(size)):
        yield range_at(size, number)


def ranged_download(client, bucket: str, jobs, *, threads: int, extra: dict,
                    on_bytes=None, on_done=None) -> dict[int, BaseException]:
    """GET each ``(key, temp_path, size, etag)`` of ``jobs`` into its temporary path.

    ``size`` is the object's, from a LIST; ``etag`` (or ``None``) is asked for with
    ``If-Match``. Without one, the ETag of the first answer is, for the other ranges.
    Every answer must be the range asked for (``Content-Range``) of an object of that
    size with that ETag, or the object fails with :class:`WrongAnswer`.

    Ranges are taken in order of ``jobs``, so files complete in about that order;
    ``on_done(index)`` is called (from a worker thread) as each one completes, its file
    closed. Returns the indexes that did not complete, with why; their temporary files
    are removed. A temporary path that exists already is not written through (nor a
    link there followed): that object fails. On an interruption every thread stops at
    its next read (bodies being read are closed), every temporary file is removed, and
    the interruption is raised.
    """
    batch = _Batch(client, bucket, list(jobs), extra, on_bytes, on_done)
    count = max(1, min(threads, sum(range_count(job[2]) for job in batch.jobs)))
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="nipype-s3-range")
    try:
        futures = [pool.submit(batch.worker) for _ in range(count)]
        for future in futures:
            future.result()
    except BaseException:
        batch.stop_all()
        try:
            pool.shutdown(wait=True)
        finally:
            batch.clean_up()
        raise
    pool.shutdown(wait=True)
    return batch.failed


class _Batch:
    """The state the worker threads of one :func:`ranged_download` share."""

    def __init__(self, client, bucket, jobs, extra, on_bytes, on_done) -> None:
        self.client, self.bucket, self.jobs, self.extra = client, bucket, jobs, extra
        self.on_bytes, self.on_done = on_bytes, on_done
        self.left = [range_count(job[2]) for job in jobs]  # ranges not yet finished
        self.etags = [_bare(job[3]) for job in jobs]
        self.fds: dict[int, int] = {}
        self.created: set[int] = set()  # whose temporary file this batch made
        self.failed: dict[int, BaseException] = {}
        self.bodies: set = set()  # being read now: closed to stop at once
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.cursor = [0, 0]  # the next range to fetch: object, range of it

    def take(self):
        """The next ``(index, offset, length)`` to fetch, or ``None``. The ranges of an
        object that failed are skipped (and no longer waited for), as is an object whose
        listed size cannot be."""
        settled = []
        try:
            with self.lock:
                while self.cursor[0] < len(self.jobs):
                    index, number = self.cursor
                    key, _tmp, size, _etag = self.jobs[index]
                    count = range_count(size)
                    if number == 0 and size > MAX_OBJECT_SIZE:
                        self.failed.setdefault(index, WrongAnswer(
                            f"The listing gives s3://{self.bucket}/{key} {size} bytes, "
                            "more than S3 stores in one object: the server's listing is "
                            "not to be believed.", bucket=self.bucket, key=key))
                    if index in self.failed or number >= count:
                        self.left[index] -= count - number  # never to be fetched
                        if number < count and not self.left[index]:
                            settled.append(index)
                        self.cursor[:] = [index + 1, 0]
                        continue
                    self.cursor[1] = number + 1
                    return (index, *range_at(size, number))
                return None
        finally:
            for index in settled:
                self.settle(index)

    def worker(self) -> None:
        while not self.stop.is_set():
            taken = self.take()
            if taken is None:
                return
            index, offset, length = taken
            try:
                self.get_range(index, offset, length)
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                self.finish(index, exc)
            else:
                self.finish(index, None)

    def finish(self, index: int, exc: BaseException | None) -> None:
        with self.lock:
            if exc is not None:
                self.failed.setdefault(index, exc)
            self.left[index] -= 1
            if self.left[index]:
                return
        self.settle(index)

    def settle(self, index: int) -> None:
        """Close the file of ``index``, whose ranges are all finished, and put it in
        place (``on_done``) or remove it."""
        with self.lock:
            fd = self.fds.pop(index, None)
            gone = index in self.failed or self.stop.is_set()
            ours = index in self.created
        try:
            if fd is not None:
                os.close(fd)
            if gone:
                if ours:
                    remove_if_there(self.jobs[index][1])
            elif self.on_done is not None:
                self.on_done(index)
        except Exception as err:  # noqa: BLE001 - that object fails, not the batch
            with self.lock:
                self.failed.setdefault(index, err)
            if ours:
                remove_if_there(self.jobs[index][1])

    def descriptor(self, index: int) -> int:
        with self.lock:
            fd = self.fds.get(index)
            if fd is None:
                fd = self.fds[index] = open_new(self.jobs[index][1], self.jobs[index][2])
                self.created.add(index)
            return fd

    def stop_all(self) -> None:
        self.stop.set()
        with self.lock:
            bodies = list(self.bodies)
        for body in bodies:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - closing only to stop its reader
                pass

    def clean_up(self) -> None:
        with self.lock:
            opened = list(self.fds.values())
            self.fds.clear()
        for fd in opened:
            os.close(fd)
        with self.lock:
            made = [self.jobs[index][1] for index in self.created]
        for tmp in made:  # what is there and not ours (a link, say) is left alone
            remove_if_there(tmp)

    def stopped(self, index: int) -> bool:
        return self.stop.is_set() or index in self.failed

    def get_range(self, index: int, offset: int, length: int) -> None:
        """Write bytes ``offset`` to ``offset + length`` of the object at the same offset
        of its file, as they arrive; asked again (from its start) if the body is cut
        off."""
        key, _tmp, size, _etag = self.jobs[index]
        bucket = self.bucket
        args = {"Bucket": bucket, "Key": key, **self.extra}
        whole = length == size
        if not whole:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        fd = self.descriptor(index)
        counted = 0  # bytes reported to on_bytes: a range asked again is not counted twice
        for attempt in range(1, ATTEMPTS + 1):
            if self.stopped(index):
                raise _Stopped()
            with self.lock:
                etag = self.etags[index]
            if etag:
                args["IfMatch"] = f'"{etag}"'
            response = self.client.get_object(**args)
            body = response["Body"]
            with self.lock:
                self.bodies.add(body)
            try:
                self.check(index, response, offset, length, whole)
                done = 0
                while done < length:
                    if self.stopped(index):
                        raise _Stopped()
                    chunk = body.read(min(_READ, length - done))
                    if not chunk:
                        break
                    write_at(fd, chunk, offset + done)
                    done += len(chunk)
                    if self.on_bytes is not None and done > counted:
                        self.on_bytes(done - counted)
                        counted = done
                if done != length:
                    raise botocore.exceptions.IncompleteReadError(actual_bytes=done,
                                                                  expected_bytes=length)
                return
            except STREAM_ERRORS:
                if attempt == ATTEMPTS or self.stopped(index):
                    raise
                logger.debug("range %d-%d of s3://%s/%s was cut off; asking again", offset,
                             offset + length - 1, bucket, key)
            finally:
                with self.lock:
                    self.bodies.discard(body)
                body.close()

    def check(self, index: int, response: dict, offset: int, length: int,
              whole: bool) -> None:
        """That ``response`` is the range asked for of the object listed."""
        key, _tmp, size, _etag = self.jobs[index]
        where = f"s3://{self.bucket}/{key}"
        got = _bare(response.get("ETag"))
        with self.lock:
            if self.etags[index] is None:
                self.etags[index] = got  # the first answer's: the other ranges ask for it
            expected = self.etags[index]
        if got != expected:
            raise WrongAnswer(
                f"{where} changed while it was downloaded (ETag {got!r} where {expected!r} "
                "was asked for): it was written again during this run. Run again once it "
                "is no longer being written.", bucket=self.bucket, key=key,
                code="PreconditionFailed")
        wanted = None if whole else f"bytes {offset}-{offset + length - 1}/{size}"
        answered = response.get("ContentRange")
        if response.get("ContentLength") != length or (wanted and answered != wanted):
            # a server that ignores Range sends the whole object; an object that grew
            # since its LIST has another size after the '/'
            raise WrongAnswer(
                f"Asked for {length} bytes of {where} at {offset} (of {size}, as listed), "
                f"the server answered {response.get('ContentLength')} bytes"
                f"{f' ({answered})' if answered else ''}. Either the object changed since "
                "it was listed (run again), or the server does not honour Range requests "
                "(set multipart_threshold above the largest object to fetch each in one "
                "request).", bucket=self.bucket, key=key)


def _bare(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def open_new(path: str, size: int) -> int:
    """``path`` created for writing, with ``size`` bytes reserved; an error if anything
    is there already (a file, a link, a pipe), rather than writing through it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                 0o644)
    try:
        if size >= _PREALLOCATE_FROM:
            _preallocate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
