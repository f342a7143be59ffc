"""Native transfers through the AWS Common Runtime (``awscrt``), when it is installed.

botocore spends about 2.5 ms of Python CPU on each request (building, signing, parsing),
which caps a two-core machine at a few hundred small objects a second. The CRT's S3
client does the HTTP, the signing and the file IO in C: the same 500 small files come
down two to four times faster and go up almost twice as fast (``docs/benchmarks.rst``).

The engine is a fast path, not a second S3 client. botocore still decides *where* a
request goes (region, addressing style, custom endpoint: the engine reuses the URL
botocore would use) and *what goes wrong*: any object the engine does not finish, for
whatever reason (an error answer, a dropped connection, a stall), is handed back and
transferred again through botocore, which retries and reports errors in the usual way.

Used for plain GETs (any size), PUTs below the multipart threshold and LIST pages;
large uploads stay on s3transfer, whose part size the skip-unchanged ETag comparison
relies on. Set
``NIPYPE_S3_ENGINE=botocore`` to switch the engine off.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections import deque
from urllib.parse import quote, urlsplit

from .. import config as cfg
from .session import signs_payloads

__all__ = ["NativeEngine", "native_engine", "engine_choice", "listing_engine",
           "open_empty", "parse_list_page"]

logger = logging.getLogger(__name__)

#: ``ExtraArgs`` the engine knows how to send as headers; anything else goes to botocore.
_PUT_HEADERS = {
    "ServerSideEncryption": "x-amz-server-side-encryption",
    "SSEKMSKeyId": "x-amz-server-side-encryption-aws-kms-key-id",
    "ContentType": "Content-Type",
}

#: the largest part of a ranged GET (measured: 16 MiB parts were no faster than 8)
_MAX_GET_PART = 8 * 1024 * 1024

#: Gbps asked of the CRT per connection wanted: it sizes its pool from the throughput
#: target at 0.4 Gbps a connection (aws-c-s3), so a little more than that lets the pool
#: reach the concurrency asked for, which then caps it
_GBPS_PER_CONNECTION = 0.5

#: Bytes of parts the CRT may hold in memory (received, not yet written, or read ahead);
#: 256 MiB is the least it accepts.
_MEMORY_LIMIT = 256 * 1024 * 1024

_engines: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()

#: the process's event-loop threads, shared by every engine: ``{pid: ClientBootstrap}``
_bootstraps: dict[int, object] = {}
_bootstraps_lock = threading.Lock()  # not _engines_lock: held while an engine is made


def _shared_bootstrap():
    """The event-loop threads (and DNS cache) every engine of this process uses.

    One group per process rather than one per engine: a process talking to several
    buckets, or with several sets of credentials, keeps 1-4 threads rather than that
    many per engine, and :func:`_keep_thread_state` then keeps a handful of thread
    states, for as long as the process lives.
    """
    from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup

    pid = os.getpid()
    with _bootstraps_lock:
        bootstrap = _bootstraps.get(pid)
        if bootstrap is None:
            loops = EventLoopGroup(max(1, min(4, os.cpu_count() or 1)))
            bootstrap = _bootstraps[pid] = ClientBootstrap(loops, DefaultHostResolver(loops))
        return bootstrap


def engine_choice() -> str:
    """``NIPYPE_S3_ENGINE``: ``'auto'`` (the default: the native engine when it can run),
    ``'native'`` (the same, but a failure to start it is an error) or ``'botocore'``."""
    value = os.environ.get("NIPYPE_S3_ENGINE", "").strip().lower() or "auto"
    if value not in ("auto", "botocore", "native"):
        from ..exceptions import ConfigurationError

        raise ConfigurationError(
            f"NIPYPE_S3_ENGINE={value!r} is not an engine: use 'auto' (the default), "
            "'native' or 'botocore'.")
    return value


def native_engine(client, bucket: str, *, max_concurrency: int, part_size: int):
    """The :class:`NativeEngine` for ``client`` and ``bucket``, or ``None`` to use botocore.

    ``None`` when awscrt is not installed, ``NIPYPE_S3_ENGINE=botocore``, the client sends
    unsigned requests, or the engine cannot be set up (logged at debug level).
    """
    choice = engine_choice()
    if choice == "botocore":
        return None
    if _crt_state["inherited"]:
        # forked from a process whose CRT threads were running: the CRT is not fork-safe
        # (a lock held by one of those threads at the fork stays held here), so this
        # process keeps to botocore. nipype's MultiProc forks on Linux before Python 3.14.
        logger.debug("native transfers not used: forked from a process that used them")
        return None
    part_size = min(part_size, _MAX_GET_PART)  # what the engine uses: one engine for all
    key = (bucket, max_concurrency, part_size, os.getpid())
    try:
        foreign = _foreign_handlers(client)
        if foreign:
            raise _Unsupported(f"the client has event handlers of its own: {foreign[:2]}")
        with _engines_lock:
            per_client = _engines.setdefault(client, {})
            engine = per_client.get(key)
            if engine is None:
                _crt_state["started"] = True
                engine = NativeEngine(client, bucket, max_concurrency=max_concurrency,
                                      part_size=part_size)
                per_client[key] = engine
            return engine
    except Exception as exc:  # an optional speed-up: never a reason to fail
        if choice == "native":
            raise
        if isinstance(exc, (_Unsupported, ImportError)):
            logger.debug("native transfers not used (%s); using botocore", exc)
        elif not _warned:
            _warned.append(exc)
            logger.warning("native transfers could not start (%s); using botocore, which "
                           "is slower for many small files. Set NIPYPE_S3_ENGINE=botocore "
                           "to silence this.", exc)
        return None


_warned: list = []

#: whether this process started the CRT, or was forked from one that had
_crt_state = {"started": False, "inherited": False}


def _after_fork_in_child() -> None:
    if _crt_state["started"]:  # the engines inherited are left alone: never used here
        _crt_state["inherited"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Unsupported(Exception):
    pass


_HOOKED_EVENTS = ("before-parameter-build", "before-call", "request-created", "before-sign",
                  "before-send", "needs-retry", "after-call")


def _foreign_handlers(client) -> list[str]:
    """Event handlers on ``client`` that are neither botocore's nor ours.

    A client with such handlers (moto's in-process mock, botocore's Stubber, a user's
    own hooks) keeps every request in botocore, so that they all apply.
    """
    foreign = []
    emitter = getattr(client.meta.events, "_emitter", None)
    handlers = getattr(emitter, "_handlers", None)
    if handlers is None:
        return ["(cannot inspect the client's event handlers)"]
    for op in ("GetObject", "PutObject"):
        for event in _HOOKED_EVENTS:
            for handler in handlers.prefix_search(f"{event}.s3.{op}"):
                if getattr(handler, "enabled", True) is False:
                    continue  # switched off (moto's stubber outside a mock_aws block)
                module = getattr(handler, "__module__", None) or type(handler).__module__
                ours = module.startswith(("botocore.", "boto3.", "s3transfer.", "nipype_s3."))
                if not ours or module == "botocore.stub":
                    foreign.append(f"{module}.{getattr(handler, '__qualname__', handler)}")
    return foreign


def _proxied(client, url) -> bool:
    """Whether botocore would send requests for ``url`` through a proxy."""
    import urllib.request

    if client.meta.config.proxies:
        return True
    proxies = urllib.request.getproxies_environment()
    if not proxies.get(url.scheme) and not proxies.get("all"):
        return False
    return not urllib.request.proxy_bypass_environment(url.hostname or "", proxies)


def _tls_options(client, url):
    """TLS for the CRT as botocore has it: the same CA bundle, or no verification."""
    if url.scheme != "https":
        return None
    from awscrt.io import ClientTlsContext, TlsContextOptions

    verify = getattr(getattr(getattr(client, "_endpoint", None), "http_session", None),
                     "_verify", True)
    options = TlsContextOptions()
    if verify is False:
        options.verify_peer = False
    else:
        bundle = verify if isinstance(verify, str) else os.environ.get("AWS_CA_BUNDLE")
        if bundle:
            options.override_default_trust_store_from_path(ca_filepath=bundle)
    connection = ClientTlsContext(options).new_connection_options()
    connection.set_server_name(url.hostname)
    return connection


def _retry_options() -> dict:
    """The CRT's retries, kept short: what it does not finish, botocore does again.

    Left at its defaults (5 retries, backoff from 0.5 s up to 20 s) the CRT spent about
    10 s on a request that cannot succeed (a server that is down, TLS spoken to a
    plain-HTTP port) before botocore, with retries of its own, even began. Quick
    retries still ride out a dropped connection; longer trouble is botocore's to wait
    out, with its adaptive backoff.
    """
    import inspect

    try:
        from awscrt.s3 import S3Client, S3RetryConfig
    except ImportError:  # pragma: no cover - an awscrt older than its retry settings
        return {}
    if "retry_config" not in inspect.signature(S3Client.__init__).parameters:
        return {}  # pragma: no cover
    return {"retry_config": S3RetryConfig(max_retries=3, backoff_scale_factor_ms=50,
                                          max_backoff_secs=1)}


class NativeEngine:
    """Concurrent whole-object GETs and single PUTs of files through awscrt's S3 client.

    Each method returns ``{index: exception}`` for the items it did not finish; the
    caller transfers those through botocore.
    """

    def __init__(self, client, bucket: str, *, max_concurrency: int, part_size: int) -> None:
        from awscrt.auth import (
            AwsCredentials,
            AwsCredentialsProvider,
            AwsSignedBodyHeaderType,
            AwsSignedBodyValue,
            AwsSigningAlgorithm,
            AwsSigningConfig,
        )
        from awscrt.s3 import S3Client, S3RequestTlsMode
        from botocore import UNSIGNED

        if client.meta.config.signature_version is UNSIGNED:
            raise _Unsupported("unsigned (anonymous) requests")

        credentials = client._get_credentials()
        if credentials is None:
            raise _Unsupported("no credentials")

        def current():
            frozen = credentials.get_frozen_credentials()
            return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token)

        # where botocore would send a request for this bucket (region, addressing
        # style, custom endpoint all decided by botocore); the key is appended
        url = urlsplit(client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=60))
        if not url.path.endswith("/k"):
            raise _Unsupported(f"unexpected request URL {url.path!r}")
        if _proxied(client, url):
            # the CRT would not go through botocore's proxy: keep such setups on botocore
            # rather than fail every object once first
            raise _Unsupported(f"requests to {url.hostname} go through a proxy")
        self.host = url.netloc
        self.base_path = url.path[:-1]
        self.bucket = bucket
        self.pid = os.getpid()
        region = client.meta.region_name or "us-east-1"
        self.signs_bodies = signs_payloads(url.geturl())
        signing = AwsSigningConfig(
            algorithm=AwsSigningAlgorithm.V4, region=region, service="s3",
            credentials_provider=AwsCredentialsProvider.new_delegate(current),
            # bodies are hashed into the signature only where nothing else protects them:
            # over TLS the hash costs CPU and adds nothing (see session.signs_payloads)
            signed_body_value=None if self.signs_bodies else
            AwsSignedBodyValue.UNSIGNED_PAYLOAD,
            signed_body_header_type=AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
        self._client = S3Client(
            bootstrap=_shared_bootstrap(), region=region,
            signing_config=signing, tls_connection_options=_tls_options(client, url),
            tls_mode=S3RequestTlsMode.ENABLED if url.scheme == "https" else
            S3RequestTlsMode.DISABLED,
            # ranged GETs of large objects in 8 MiB parts (measured: 16 MiB parts were no
            # faster)
            part_size=min(part_size, _MAX_GET_PART),
            # PUTs here are single requests: files from the multipart threshold up go
            # through s3transfer
            multipart_upload_threshold=max(part_size, 5 * 1024 * 1024 * 1024),
            max_active_connections_override=max(1, max_concurrency),
            # the CRT opens at most the target's worth of connections (0.4 Gbps each),
            # whatever the override: at its default of 10 Gbps, 25 (measured at 50 ms a
            # round trip: 60 small PUTs went on 25 connections in 0.30 s, on 60 in 0.23)
            throughput_target_gbps=max(10.0, _GBPS_PER_CONNECTION * max(1, max_concurrency)),
            # parts held in memory (received, not yet written): bounded whatever the file
            # sizes. Left to its default the CRT takes gigabytes when the disk is slower
            # than the network (measured: 520 MB resident for 4 x 200 MiB; 270 MB with
            # this)
            memory_limit=_MEMORY_LIMIT,
            connect_timeout_ms=int(cfg.DEFAULT_CONNECT_TIMEOUT * 1000),
            **_retry_options())
        self.window = max(4, 4 * max_concurrency)

    # -- requests -----------------------------------------------------------------------
    def _path(self, key: str) -> str:
        return self.base_path + quote(key, safe="/~")

    def _request(self, method: str, key: str, headers: list):
        from awscrt.http import HttpHeaders, HttpRequest

        return HttpRequest(method, self._path(key),
                           HttpHeaders([("Host", self.host)] + headers))

    def list_page(self, prefix: str, token: str | None = None, *,
                  request_payer: bool = False, timeout: float = 60.0,
                  max_keys: int | None = None) -> dict:
        """One page (up to 1,000 keys) of a ``ListObjectsV2`` of ``prefix``.

        Returns ``{"objects": [(key, size, etag, last_modified), ...], "truncated": bool,
        "token": str or None}``, ``token`` being where the next page starts (up to
        ``max_keys`` keys a page, or the server's default of 1,000). Raises on anything but a
        well-formed answer (an error status, no answer within ``timeout``); the caller
        then asks botocore, which retries and reports in its own words.
        """
        from awscrt.s3 import S3RequestType

        query = [("list-type", "2"), ("encoding-type", "url"), ("prefix", prefix)]
        if token:
            query.append(("continuation-token", token))
        if max_keys:
            query.append(("max-keys", str(int(max_keys))))
        headers = [("x-amz-request-payer", "requester")] if request_payer else []
        body: list[bytes] = []
        request = self._client.make_request(
            type=S3RequestType.DEFAULT, operation_name="ListObjectsV2",
            request=self._bucket_request("GET", query, headers),
            on_body=lambda chunk, **_kw: body.append(bytes(chunk)))
        try:
            request.finished_future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            request.cancel()
            raise
        return parse_list_page(b"".join(body))

    def _bucket_request(self, method: str, query: list, headers: list):
        from awscrt.http import HttpHeaders, HttpRequest

        # the bucket itself: "/bucket" (path style) or "/" (virtual host); query values
        # URI-encoded as SigV4 has them in the canonical request
        path = self.base_path.rstrip("/") or "/"
        encoded = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                           for k, v in sorted(query))
        return HttpRequest(method, f"{path}?{encoded}",
                           HttpHeaders([("Host", self.host)] + headers))

    def download(self, jobs, *, request_payer: bool = False, on_bytes=None, on_done=None,
                 stall_seconds: float = 60.0) -> dict[int, BaseException]:
        """GET each ``(key, temp_path)`` of ``jobs`` into its temporary path.

        A job may be ``(key, temp_path, fd)``: ``fd`` (from :func:`open_empty`, or
        ``None``) is that path opened already, and the engine closes it. Opening files
        in other threads keeps the thread starting requests from waiting for the GIL
        after each ``open``.

        ``on_done(index)`` is called as each one completes (in order of ``jobs``), so a
        finished file can be put in place at once. Returns the indexes that did not
        complete, with why; their temporary files are removed.

        The body is written here, in slices of :data:`_WRITE_SLICE`, rather than by the
        CRT, which writes each 8 MiB part in one call: on the 2-core Linux VM measured, one
        ``write`` of a megabyte or more into the page cache cost four to six times the
        kernel time of the same bytes in 64 KiB writes (``docs/benchmarks.rst``).
        """
        from awscrt.s3 import S3RequestType

        headers = [("x-amz-request-payer", "requester")] if request_payer else []

        def start(key, path, fd=None, *, progress):
            if not _HAS_PWRITE:  # Windows: the CRT writes the file itself
                if fd is not None:
                    os.close(fd)
                return self._client.make_request(
                    type=S3RequestType.GET_OBJECT, request=self._request("GET", key, headers),
                    recv_filepath=path, on_progress=progress)
            if fd is None:
                fd = open_empty(path)
            try:
                request = self._client.make_request(
                    type=S3RequestType.GET_OBJECT, request=self._request("GET", key, headers),
                    on_body=functools.partial(_write_at, fd), on_progress=progress)
            except BaseException:
                os.close(fd)
                raise
            request.finished_future.add_done_callback(lambda _f: _close(fd))
            return request

        return self._run(jobs, start, on_bytes, stall_seconds, cleanup=True, on_done=on_done)

    def upload(self, jobs, *, extra: dict, on_bytes=None, etags: dict | None = None,
               stall_seconds: float = 60.0) -> dict[int, BaseException]:
        """PUT each ``(key, source_path)`` of ``jobs`` as one request.

        ``extra`` is the ``ExtraArgs`` botocore would get, plus ``Metadata`` per job when
        the job is ``(key, path, metadata)``, a ``Content-MD5`` (base64) when it is
        ``(key, path, metadata, content_md5)`` and a SHA-256 checksum (base64) when it
        is ``(key, path, metadata, content_md5, sha256)``: the server refuses a body that
        does not match them. Raises ``ValueError`` for arguments the engine cannot send
        (use botocore then). ``etags``, when given, gets ``{key: ETag}`` from each
        successful answer (what a LIST after the upload would say, without the LIST).
        """
        from awscrt.s3 import S3RequestType

        unknown = set(extra) - set(_PUT_HEADERS)
        if unknown:
            raise ValueError(f"arguments not sent natively: {sorted(unknown)}")
        base = [(_PUT_HEADERS[k], str(v)) for k, v in extra.items()]

        def start(key, path, metadata=None, content_md5=None, sha256=None, *, progress):
            headers = base + [("Content-Length", str(os.path.getsize(path)))]
            headers += [(f"x-amz-meta-{k}", v) for k, v in (metadata or {}).items()]
            if content_md5:
                headers.append(("Content-MD5", content_md5))
            if sha256:  # as botocore sends ChecksumSHA256 with ChecksumAlgorithm
                headers += [("x-amz-sdk-checksum-algorithm", "SHA256"),
                            ("x-amz-checksum-sha256", sha256)]
            return self._client.make_request(
                type=S3RequestType.PUT_OBJECT, request=self._request("PUT", key, headers),
                send_filepath=path, on_progress=progress,
                on_headers=None if etags is None else functools.partial(_keep_etag, key))

        def _keep_etag(key, status_code, headers, **_kwargs):
            if status_code != 200:
                return
            said = {name.lower(): value for name, value in headers}
            # under SSE-KMS (the bucket's default, say) or SSE-C an ETag is no MD5
            if said.get("x-amz-server-side-encryption", "AES256") == "AES256" and \
                    "x-amz-server-side-encryption-customer-algorithm" not in said and \
                    said.get("etag"):
                etags[key] = said["etag"].strip('"')

        return self._run(jobs, start, on_bytes, stall_seconds, cleanup=False)

    def _run(self, jobs, start, on_bytes, stall_seconds, *, cleanup: bool, on_done=None):
        """Keep up to ``window`` requests in flight; cancel what is left on a stall."""
        failed: dict[int, BaseException] = {}
        pending: deque = deque()
        last = [time.monotonic()]

        def progress(nbytes):
            _keep_thread_state()
            last[0] = time.monotonic()
            if on_bytes is not None:
                on_bytes(nbytes)

        def settle(index, job, request, timeout, done=on_done) -> bool:
            """True once ``request`` has ended (a failure is recorded)."""
            try:
                request.finished_future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                return False
            except Exception as exc:  # handed back: botocore tries again and reports
                failed[index] = exc
                if cleanup:
                    remove_if_there(job[1])
                return True
            if done is not None:
                try:
                    done(index)
                except Exception as exc:  # noqa: BLE001 - e.g. a wrong size: botocore again
                    failed[index] = exc
            return True

        def cancel_pending(done=on_done):
            for _, _, request in pending:
                request.cancel()
            for index, job, request in pending:
                settle(index, job, request, None, done)
            pending.clear()

        def wait_oldest():
            index, job, request = pending[0]
            while not settle(index, job, request, 0.25):
                if time.monotonic() - last[0] > stall_seconds:
                    logger.debug("native transfers made no progress for %.0f s; cancelling "
                                 "%d (botocore takes them over)", stall_seconds, len(pending))
                    cancel_pending()
                    return
            pending.popleft()

        try:
            for index, job in enumerate(jobs):
                try:
                    request = start(*job, progress=progress)
                except Exception as exc:  # noqa: BLE001 - e.g. a folder we cannot write to:
                    failed[index] = exc   # botocore tries it and reports in its words
                    continue
                pending.append((index, job, request))
                last[0] = time.monotonic()
                while len(pending) >= self.window:
                    wait_oldest()
            while pending:
                wait_oldest()
        except BaseException:  # interrupted: end every request, put nothing more in place
            cancel_pending(done=None)
            raise
        return failed


def parse_list_page(document: bytes) -> dict:
    """A ``ListBucketResult`` (ListObjectsV2) as :meth:`NativeEngine.list_page` returns it.

    Keys are URL-decoded when the answer says they were encoded (``EncodingType``: a
    server may ignore the request for it), as botocore does. Raises ``ValueError`` for
    anything that is not such a document.
    """
    import xml.etree.ElementTree as ET
    from urllib.parse import unquote_plus

    from .session import fast_timestamp

    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise ValueError(f"not an XML answer: {exc}") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != ns + "ListBucketResult":
        raise ValueError(f"not a listing: <{root.tag}>")
    encoded = (root.findtext(ns + "EncodingType") or "").lower() == "url"
    objects = []
    for entry in root.iterfind(ns + "Contents"):
        key = entry.findtext(ns + "Key")
        if key is None:
            raise ValueError("a listed object without a key")
        modified = entry.findtext(ns + "LastModified")
        objects.append((unquote_plus(key) if encoded else key,
                        int(entry.findtext(ns + "Size") or 0),
                        (entry.findtext(ns + "ETag") or "").strip('"'),
                        fast_timestamp(modified) if modified else None))
    truncated = (root.findtext(ns + "IsTruncated") or "").lower() == "true"
    token = root.findtext(ns + "NextContinuationToken") if truncated else None
    return {"objects": objects, "token": token or None, "truncated": truncated}


def listing_engine(client, bucket: str):
    """An engine for LISTs of ``bucket``: one already made for ``client``, or a new one
    with the default settings (``None`` when botocore is to be used)."""
    with _engines_lock:
        for (engine_bucket, _conc, _part, pid), engine in _engines.get(client, {}).items():
            if engine_bucket == bucket and pid == os.getpid():
                return engine
    return native_engine(client, bucket, max_concurrency=cfg.DEFAULT_MAX_CONCURRENCY,
                         part_size=cfg.DEFAULT_MULTIPART_CHUNKSIZE)


#: Bytes per ``write`` of a downloaded body (see :meth:`NativeEngine.download`).
_WRITE_SLICE = 64 * 1024
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_HAS_PWRITE = hasattr(os, "pwrite")


def open_empty(path: str, size: int | None = None) -> int:
    """``path`` opened for writing, empty; created if missing.

    Not with ``O_TRUNC``: on ext4 (its default ``auto_da_alloc``) truncating a file marks
    it, and its ``close`` then starts writing the whole file back to disk, in the closing
    thread (measured: 0.1 s more for 4 x 200 MiB, and every small file started its own
    writeback). Only a file that is not empty is truncated.

    With ``size`` (the object's, from a LIST) of :data:`_PREALLOCATE_FROM` or more, the
    file's blocks are reserved at once (see :func:`_preallocate`).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | _O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        if size is not None and size >= _PREALLOCATE_FROM:
            _preallocate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


#: Files from this size up have their blocks reserved before their parts arrive.
_PREALLOCATE_FROM = 8 * 1024 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_fallocate: list = []  # [the C function, or None where there is none]


def _preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of blocks for ``fd``, keeping its size (Linux; else nothing).

    Parts arrive out of order, several files at once; reserving each file's blocks first
    lets the file system allocate one extent instead of many as the pages are written
    back (measured: 4 x 200 MiB came down in 0.71 s instead of 0.78 s, medians of 10).
    Linux's ``fallocate`` with ``FALLOC_FL_KEEP_SIZE``, called directly: the file's size
    stays what was written, so a short body is still caught by its size, and a file
    system without the call says so instead of having zeros written (as
    ``posix_fallocate`` would do). Any failure is ignored: this is only a speed-up.
    """
    if not _fallocate:
        _fallocate.append(_find_fallocate())
    call = _fallocate[0]
    if call is not None:
        call(fd, _FALLOC_FL_KEEP_SIZE, 0, size)  # an error (-1) changes nothing: ignored


def _find_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        call = getattr(libc, "fallocate64", None) or libc.fallocate
        call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        call.restype = ctypes.c_int
        return call
    except (OSError, AttributeError):  # pragma: no cover - a libc without it
        return None


_thread_state = threading.local()


def _keep_thread_state() -> None:
    """Keep the Python thread state of the CRT thread this callback runs on.

    awscrt calls into Python from its event-loop threads between ``PyGILState_Ensure``
    and ``PyGILState_Release``. On a thread Python did not start, that pair creates a
    thread state for each callback and deletes it afterwards, with its 16 KiB frame
    stack: an ``mmap``, and an ``munmap`` that interrupts the other core to flush its
    TLB. A small download made 2,000 such pairs for 500 files (``docs/benchmarks.rst``).
    One more ``Ensure``, never released, keeps the state for the thread's life; the
    threads are the process's shared event loops (:func:`_shared_bootstrap`), so a
    handful of states are kept. Outside CPython this does nothing.
    """
    if getattr(_thread_state, "kept", False):
        return
    _thread_state.kept = True  # in the state kept from here on; tried once either way
    if sys.implementation.name != "cpython":  # pragma: no cover
        return
    try:
        import ctypes

        ctypes.pythonapi.PyGILState_Ensure()
    except Exception:  # noqa: BLE001 - pragma: no cover - only a speed-up
        pass


def _write_at(fd: int, chunk, offset: int, **_kwargs) -> None:
    """The CRT's ``on_body``: write ``chunk`` at ``offset`` of ``fd``, in slices.

    An exception here (a full disk) fails the request; botocore then tries it again.
    """
    _keep_thread_state()
    write_at(fd, chunk, offset)


def write_at(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd``, in slices of :data:`_WRITE_SLICE`."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    while pos < end:
        pos += os.pwrite(fd, view[pos:pos + _WRITE_SLICE], offset + pos)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover - closed already
        pass


def remove_if_there(path: str) -> None:
    """Remove the file ``path``; nothing if there is none."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
