"""A TCP proxy that puts distance between a client and an S3 server on loopback.

Our users reach their buckets from a lab workstation, a laptop on a campus link or
another region: every request pays 20-100 ms there, while the benchmark's SeaweedFS on
127.0.0.1 answers in well under one. This proxy adds one round trip per new connection
(the TCP handshake) and one per request (the request going, the answer coming back),
and passes the bodies at full speed, so a tool pays for its requests as it would at
that distance and for its bytes as on loopback.

A request is the first bytes a client sends after the server last answered on that
connection (HTTP/1.1 keeps connections open); an ``Expect: 100-continue`` upload pays
the extra round trip the interim answer costs, as it does on a real network.

    with DelayProxy("http://127.0.0.1:8333", rtt=0.020) as proxy:
        ...  # point the tools at proxy.url
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse

__all__ = ["DelayProxy"]

_CHUNK = 256 * 1024


class DelayProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``, adding ``rtt`` seconds per new
    connection and per request (see the module docstring)."""

    def __init__(self, upstream: str, rtt: float) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.rtt = float(rtt)
        self.url = ""
        self.connections = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="nipype-s3-delay-proxy")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay proxy did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024))
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:  # open connections: closed, quietly
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.close()

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, client_r, client_w) -> None:
        self.connections += 1
        await asyncio.sleep(self.rtt)  # the handshake
        try:
            up_r, up_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_w.close()
            return
        answered = [True]  # the server spoke last: the client's next bytes are a request

        async def to_server():
            try:
                while data := await client_r.read(_CHUNK):
                    if answered[0]:
                        answered[0] = False
                        self.requests += 1
                        await asyncio.sleep(self.rtt)  # there and back
                    up_w.write(data)
                    await up_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                up_w.close()

        async def to_client():
            try:
                while data := await up_r.read(_CHUNK):
                    answered[0] = True
                    client_w.write(data)
                    await client_w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                client_w.close()

        await asyncio.gather(to_server(), to_client())
