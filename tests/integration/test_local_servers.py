"""The local servers the tests (and users' own tests) start."""

import itertools
import socket

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
