"""An HTTP proxy on 127.0.0.1 that records every S3 request (and can inject faults).

Put it between a client and a local S3 server to count what a transfer really sends:

>>> with RecordingProxy("http://127.0.0.1:8333") as proxy:     # doctest: +SKIP
...     client = boto3.client("s3", endpoint_url=proxy.url)
...     ...
...     proxy.count("PUT")

Requests are forwarded with their ``Host`` header unchanged, so SigV4 signatures made
for the proxy's address stay valid upstream.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["RecordingProxy", "Recorded"]

_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
        "trailer", "upgrade", "expect"}


@dataclass(frozen=True)
class Recorded:
    """One request seen by the proxy."""

    method: str
    path: str
    query: str
    status: int
    headers: tuple = ()
    action: str = ""
    #: the parameters of an API call (JSON body or query protocol), for the IAM check;
    #: empty for S3, whose bucket and key are in the path
    params: tuple = ()
    #: the AWS service the request was signed for (``s3``, ``ec2``, ``iam``, ``batch``)
    service: str = ""

    def header(self, name: str) -> str | None:
        """A request header's value (names compared without case)."""
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    @property
    def key(self) -> str:
        """``bucket/key`` part of a path-style request."""
        return urllib.parse.unquote(self.path.lstrip("/"))


def _bad_digest(method: str, headers, body: bytes, action: str) -> str | None:
    """S3's error code for an upload whose body does not match the digest it carries
    (``x-amz-checksum-sha256``, ``x-amz-content-sha256``); ``None`` when it does.

    moto stores such bodies; S3 refuses them, and the content store relies on that (a
    file changed between hashing and upload is refused, not stored under the old
    digest). Bodies sent as ``aws-chunked`` carry their digests in trailers and are
    not checked here.
    """
    if method != "PUT" or not action.startswith("S3:"):
        return None
    if "aws-chunked" in (headers.get("Content-Encoding") or ""):
        return None
    checksum = headers.get("x-amz-checksum-sha256")
    if checksum and base64.b64encode(hashlib.sha256(body).digest()).decode() != checksum:
        return "BadDigest"
    content = headers.get("x-amz-content-sha256") or ""
    if len(content) == 64 and hashlib.sha256(body).hexdigest() != content.lower():
        return "XAmzContentSHA256Mismatch"
    return None


def _params(action: str, body: bytes, query: str) -> tuple:
    """``(name, value)`` of an API call's top-level text parameters (not S3's)."""
    if action.startswith("S3:") or len(body) > 1 << 20:
        return ()
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return ()
        return tuple((k, v) for k, v in data.items() if isinstance(v, str))
    pairs = urllib.parse.parse_qsl(text or query)
    return tuple((k, v) for k, v in pairs if "." not in k or k.endswith(".1"))


def _service(headers) -> str:
    """The service of the request's signature (its credential scope)."""
    scope = (headers.get("Authorization") or "").split("Credential=", 1)[-1].split("/")
    return scope[3] if len(scope) > 4 else ""


def _action(method: str, headers, body: bytes, query: str, path: str = "") -> str:
    target = headers.get("X-Amz-Target")
    if target:
        return target
    if _service(headers) == "batch" and path.startswith("/v1/"):
        return "Batch:" + path[4:].strip("/")  # REST: the operation, in lower case
    for source in (query, body[:4096].decode("latin-1") if body else ""):
        for pair in source.split("&"):
            name, _, value = pair.partition("=")
            if name == "Action":
                return urllib.parse.unquote_plus(value)
    return f"S3:{method}"


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a killed agent, a cancelled request) is normal
    here: no traceback on stderr for that."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RecordingProxy:
    """Forwards to ``upstream``; records requests; optionally fails some of them.

    Parameters
    ----------
    upstream : str
        ``http://host:port`` of the real server.
    fault_rate : float
        Fraction of requests answered with a fault instead of being forwarded.
    faults : tuple of str
        Which faults: ``"503"`` (SlowDown), ``"500"``, ``"drop"`` (close the connection
        without an answer), ``"stall"`` (answer nothing for ``stall_seconds``), ``"cut"``
        (forward, then send the answer's headers and half its body, and close).
    fault_filter : callable, optional
        ``fault_filter(method, path, query) -> bool``: only matching requests may fail
        (e.g. object GETs but not LISTs).
    responder : callable, optional
        ``responder(request: Recorded, body: bytes) -> (status, body, content_type) or
        None``: answer a request without forwarding it (an injected AWS error, an API
        LocalCloud plays itself).

    Each request is recorded with its ``action``: the API operation for JSON and query
    protocols (``AmazonSQS.ReceiveMessage``, ``RunInstances``), else ``S3:<METHOD>``.
    """

    def __init__(self, upstream: str, *, fault_rate: float = 0.0,
                 faults: tuple[str, ...] = ("503",), stall_seconds: float = 5.0,
                 fault_filter=None, responder=None, seed: int = 0) -> None:
        self.fault_filter = fault_filter
        self.responder = responder
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.fault_rate = fault_rate
        self.faults = faults
        self.stall_seconds = stall_seconds
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- bookkeeping ----------------------------------------------------------------
    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def count(self, method: str | None = None, *, query_has: str | None = None,
              action: str | None = None) -> int:
        """How many requests (of ``method``, with ``query_has`` in the query, of
        ``action``) were seen."""
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method)
                       and (query_has is None or query_has in r.query)
                       and (action is None or r.action == action))

    def actions(self) -> dict:
        """``{action: count}`` of every request seen."""
        out: dict = {}
        with self._lock:
            for r in self.requests:
                out[r.action] = out.get(r.action, 0) + 1
        return out

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def _pick_fault(self, method: str = "", path: str = "", query: str = "") -> str | None:
        if self.fault_filter is not None and not self.fault_filter(method, path, query):
            return None
        with self._lock:
            if self.fault_rate and self._random.random() < self.fault_rate:
                return self._random.choice(self.faults)
        return None

    # -- server ---------------------------------------------------------------------
    def start(self) -> RecordingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self):
                body = self._body()
                path, _, query = self.path.partition("?")
                seen = tuple((k.lower(), v) for k, v in self.headers.items()
                             if k.lower() not in ("authorization", "x-amz-security-token"))
                action = _action(self.command, self.headers, body, query, path)
                service = _service(self.headers)

                params = _params(action, body, query)

                def seen_as(code: int) -> Recorded:
                    return Recorded(self.command, path, query, code, seen, action, params,
                                    service)

                rec = seen_as(0)
                refused = _bad_digest(self.command, self.headers, body, action)
                if refused is not None:  # as S3 does, and moto does not
                    proxy._record(seen_as(400))
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{refused}'
                               "</Code><Message>The digest given does not match the body "
                               "(checked by LocalCloud)</Message></Error>").encode()
                    self.send_response(400)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if proxy.responder is not None:
                    canned = proxy.responder(rec, body)
                    if canned is not None:
                        code, payload, ctype = canned
                        proxy._record(seen_as(code))
                        self.send_response(code)
                        self.send_header("Content-Type", ctype)
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                fault = proxy._pick_fault(self.command, path, query)
                if fault == "drop":
                    proxy._record(seen_as(0))
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "stall":
                    proxy._record(seen_as(0))
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    code = int(fault)
                    err = "SlowDown" if code == 503 else "InternalError"
                    payload = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{err}"
                               f"</Code><Message>injected fault</Message></Error>").encode()
                    proxy._record(seen_as(code))
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                  timeout=120)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                proxy._record(Recorded(self.command, path, query, resp.status, seen,
                                       action, params, service))
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in _HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                if self.command == "HEAD":
                    self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut" and self.command != "HEAD":
                    self.wfile.write(data[:len(data) // 2])  # its full length was announced
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="nipype-s3-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> RecordingProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
