"""The local servers the tests (and users' own tests) start."""

import itertools
import re
import socket
import time

import pytest

from nipype_s3.testing import servers

pytestmark = pytest.mark.seaweedfs


def test_seaweedfs_tries_other_ports_when_one_was_taken_meanwhile(monkeypatch):
    """Its nine ports are picked free, then bound by ``weed``: another process can take
    one in between (an outgoing connection's port, in a busy test run). The server then
    exits at once; it is started again on other ports instead of failing the run."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(1)
    real, picks = servers.free_port, itertools.count()
    # the S3 port is the first pick, then master, master gRPC, volume, volume gRPC,
    # filer: the filer's port is taken on the first attempt
    monkeypatch.setattr(servers, "free_port", lambda: held.getsockname()[1]
                        if next(picks) == 5 else real())
    server = servers.SeaweedFS()
    try:
        server.start()
        assert next(picks) == 20  # the first nine ports, then another S3 port and nine
        server.client().create_bucket(Bucket="after-a-retry")
    finally:
        server.stop()
        held.close()


def test_seaweedfs_takes_a_volume_size_limit():
    """A benchmark writing gigabytes sets the limit above what it writes, so the server
    does not stop to make new volumes in the middle of a timed run."""
    server = servers.SeaweedFS(volume_size_limit_mb=3000)
    try:
        server.start()
        client = server.client()
        client.create_bucket(Bucket="volumes")
        client.put_object(Bucket="volumes", Key="k", Body=b"x")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(server.log_path) as fobj:
                found = re.search(r"Volume Size:\s+([\d.]+ \w+)", fobj.read())
            if found:
                break
            time.sleep(0.2)
        assert found, "weed never reported its volume size"
        assert found.group(1) == "2.93 GiB"  # 3000 MB
    finally:
        server.stop()
