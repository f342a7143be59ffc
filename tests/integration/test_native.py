"""The native (awscrt) transfer engine against a real S3 server: used, exact, and never
the last word (whatever it does not finish, botocore does)."""

import base64
import hashlib
import os

import boto3
import pytest

from nipype_s3.exceptions import ConfigurationError
from nipype_s3.s3 import native
from nipype_s3.s3.download import DownloadItem, download_files
from nipype_s3.s3.session import make_s3_client
from nipype_s3.s3.transfer import TransferSettings
from nipype_s3.s3.upload import UploadItem, upload_files
from nipype_s3.testing.proxy import RecordingProxy

pytest.importorskip("awscrt", reason="the native engine needs awscrt (installed with nipype_s3)")
pytestmark = pytest.mark.seaweedfs

N = 30


def _native(rec) -> bool:
    return (rec.header("user-agent") or "").startswith("CRTS3NativeClient")


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    sums = {}
    for i in range(N):
        data = os.urandom(1000 + 4099 * i)
        (root / f"f{i:02d}.bin").write_bytes(data)
        sums[f"f{i:02d}.bin"] = hashlib.sha256(data).hexdigest()
    return root, sums


def _client(url):
    return make_s3_client(boto3.Session(), endpoint_url=url, region="us-east-1")


def _round_trip(url, bucket, root, dest, **settings):
    client = _client(url)
    items = [UploadItem(str(p), f"n/{p.name}") for p in sorted(root.iterdir())]
    up = upload_files(client, bucket, items, settings=TransferSettings(**settings))
    down = download_files(client, bucket,
                          [DownloadItem(f"n/{p.name}", str(dest / p.name), p.stat().st_size)
                           for p in sorted(root.iterdir())],
                          settings=TransferSettings(**settings))
    return up, down


def _put_all(server, bucket, root):
    """The files under ``n/`` in the bucket (with the server's own client, not ours)."""
    client = server.client()
    for p in root.iterdir():
        client.upload_file(str(p), bucket, f"n/{p.name}")


def _sums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _open_under(folder, wait=5.0):
    """This process's descriptors still open on files in ``folder`` (Linux), once those
    the CRT closes as its requests finish have been closed (it does so just after)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(folder)):
                held.append(target)
        if not held or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def test_small_puts_and_small_gets_go_native_byte_exact(seaweedfs, weed_bucket, files, tmp_path):
    root, sums = files
    dest = tmp_path / "dest"
    # one large file too: it goes up through s3transfer in parts, down streamed
    (root / "big.bin").write_bytes(os.urandom(11 * 1024 * 1024 + 5))
    sums["big.bin"] = hashlib.sha256((root / "big.bin").read_bytes()).hexdigest()
    with RecordingProxy(seaweedfs.url) as proxy:
        up, down = _round_trip(proxy.url, weed_bucket, root, dest,
                               multipart_threshold=8 * 1024 * 1024,
                               multipart_chunksize=8 * 1024 * 1024)
        puts = [r for r in proxy.requests if r.method == "PUT" and r.query == ""]
        gets = [r for r in proxy.requests if r.method == "GET" and "list-type" not in r.query]
    assert up.files == down.files == N + 1
    assert _sums(dest) == sums
    if os.path.isdir("/proc/self/fd"):  # every file the engine wrote is closed
        assert _open_under(dest) == []
    assert len(puts) == N and all(_native(r) for r in puts)  # the small ones, one PUT each
    # plain HTTP: the server can check every body: botocore hashes them into the
    # signature, the native PUTs carry a Content-MD5
    parts = [r for r in proxy.requests if r.method == "PUT" and "partNumber" in r.query]
    assert len(parts) == 2
    assert all(len(r.header("x-amz-content-sha256") or "") == 64 for r in parts)
    for r in puts:
        body = (root / r.key.rsplit("/", 1)[1]).read_bytes()
        assert r.header("content-md5") == base64.b64encode(hashlib.md5(body).digest()).decode()
    small_gets = [r for r in gets if not r.key.endswith("big.bin")]
    assert len(small_gets) == N and all(_native(r) for r in small_gets)
    # the large one streams through botocore (s3.ranged): one GET of the whole object
    big = [r for r in gets if r.key.endswith("big.bin")]
    assert len(big) == 1 and not _native(big[0]) and big[0].header("range") is None
    assert not [p for p in dest.iterdir() if ".part" in p.name]


def test_what_the_engine_cannot_finish_botocore_does(seaweedfs, weed_bucket, files, tmp_path):
    root, sums = files
    refused = {"f03.bin", "f17.bin"}

    def deny_native(rec, body):  # the native client is refused these two keys; botocore is not
        if _native(rec) and rec.key.rsplit("/", 1)[-1] in refused:
            return 403, (b"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code>"
                         b"<Message>injected</Message></Error>"), "application/xml"
        return None

    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url, responder=deny_native) as proxy:
        up, down = _round_trip(proxy.url, weed_bucket, root, dest)
        by_botocore = {r.key.rsplit("/", 1)[-1] for r in proxy.requests
                       if not _native(r) and r.method in ("GET", "PUT")
                       and "list-type" not in r.query}
    assert up.files == down.files == N
    assert _sums(dest) == sums
    assert by_botocore == refused  # only those, once each way


def test_the_server_refuses_a_native_body_that_does_not_match_its_md5(
        seaweedfs, weed_bucket, files, tmp_path, monkeypatch):
    """Over plain HTTP each native PUT carries a Content-MD5 the server checks: a body
    that changed on the way is refused, and botocore sends it again (signed)."""
    from nipype_s3.s3 import upload

    root, sums = files
    real = upload._md5
    monkeypatch.setattr(upload, "_md5", lambda path: "0" * 32 if path.endswith("f07.bin")
                        else real(path))  # as if f07's bytes had changed in transit
    with RecordingProxy(seaweedfs.url) as proxy:
        up, down = _round_trip(proxy.url, weed_bucket, root, tmp_path / "dest")
        f07 = [(r.status, _native(r)) for r in proxy.requests
               if r.method == "PUT" and r.key.endswith("f07.bin")]
    assert f07 == [(400, True), (200, False)]
    assert up.files == down.files == N and _sums(tmp_path / "dest") == sums


def test_a_stalled_native_transfer_is_cancelled_and_redone(seaweedfs, weed_bucket, files,
                                                           tmp_path, monkeypatch):
    root, sums = files
    _put_all(seaweedfs, weed_bucket, root)
    monkeypatch.setenv("NIPYPE_S3_READ_TIMEOUT", "1")
    stalled = []

    def stall_once(method, path, query):
        if path.endswith("f05.bin") and not stalled:
            stalled.append(path)
            return True
        return False

    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url, fault_rate=1.0, faults=("stall",), stall_seconds=30,
                        fault_filter=stall_once) as proxy:
        down = download_files(_client(proxy.url), weed_bucket,
                              [DownloadItem(f"n/{p.name}", str(dest / p.name))
                               for p in sorted(root.iterdir())])
    assert stalled and down.files == N
    assert _sums(dest) == sums


def test_interrupted_native_download_leaves_no_partial_file(seaweedfs, weed_bucket, files,
                                                            tmp_path, monkeypatch):
    root, sums = files
    _put_all(seaweedfs, weed_bucket, root)
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    dest = tmp_path / "dest"
    with pytest.raises(KeyboardInterrupt):
        # 2 connections: 8 requests at a time, so most files are opened ahead and not
        # yet handed to the engine when the interrupt comes
        download_files(_client(seaweedfs.url), weed_bucket,
                       [DownloadItem(f"n/{p.name}", str(dest / p.name), p.stat().st_size)
                        for p in sorted(root.iterdir())],
                       settings=TransferSettings(max_concurrency=2))
    left = sorted(p.name for p in dest.iterdir())
    assert left == sorted(os.path.basename(c) for c in calls[:4])  # put in place before it
    if os.path.isdir("/proc/self/fd"):  # files opened ahead of their requests are closed
        assert _open_under(dest) == []
    for name in left:
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sums[name]


def test_engine_switch_and_hooked_clients_use_botocore(seaweedfs, weed_bucket, files, tmp_path,
                                                       monkeypatch):
    root, _ = files
    monkeypatch.setenv("NIPYPE_S3_ENGINE", "botocore")
    with RecordingProxy(seaweedfs.url) as proxy:
        _round_trip(proxy.url, weed_bucket, root, tmp_path / "a")
        assert proxy.requests and not any(_native(r) for r in proxy.requests)
    monkeypatch.setenv("NIPYPE_S3_ENGINE", "auto")
    client = _client(seaweedfs.url)
    assert native.native_engine(client, weed_bucket, max_concurrency=4,
                                part_size=8 << 20) is not None
    # a hook of the user's own must see every request: no native requests then
    client.meta.events.register("before-send.s3", lambda **kw: None)
    assert native.native_engine(client, weed_bucket, max_concurrency=4,
                                part_size=8 << 20) is None
    anon = make_s3_client(boto3.Session(), endpoint_url=seaweedfs.url, region="us-east-1",
                          anon=True)
    assert native.native_engine(anon, weed_bucket, max_concurrency=4, part_size=8 << 20) is None
    # a proxy the CRT would not go through: botocore throughout (unless bypassed)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert native.native_engine(_client(seaweedfs.url), weed_bucket, max_concurrency=4,
                                part_size=8 << 20) is None
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert native.native_engine(_client(seaweedfs.url), weed_bucket, max_concurrency=4,
                                part_size=8 << 20) is not None
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.setenv("NIPYPE_S3_ENGINE", "fastest")
    with pytest.raises(ConfigurationError, match="NIPYPE_S3_ENGINE='fastest'"):
        native.native_engine(client, weed_bucket, max_concurrency=4, part_size=8 << 20)


def test_in_process_moto_keeps_requests_in_botocore(tmp_path):
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="moto-bucket")
        assert native.native_engine(client, "moto-bucket", max_concurrency=4,
                                    part_size=8 << 20) is None


def test_https_endpoints_get_botocores_certificate_settings(monkeypatch):
    """No request is made: the engine for an AWS bucket is set up as botocore would talk."""
    from urllib.parse import urlsplit

    from awscrt.io import TlsConnectionOptions

    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    client = make_s3_client(boto3.Session(), endpoint_url="https://s3.us-east-1.amazonaws.com",
                            region="us-east-1")
    url = urlsplit("https://s3.us-east-1.amazonaws.com/b/k")
    if os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
        assert isinstance(native._tls_options(client, url), TlsConnectionOptions)
    assert native._tls_options(client, urlsplit("http://127.0.0.1:9000/b/k")) is None
    unverified = boto3.Session().client("s3", region_name="us-east-1", verify=False)
    assert isinstance(native._tls_options(unverified, url), TlsConnectionOptions)
    engine = native.native_engine(client, "nipype-s3-some-bucket", max_concurrency=4,
                                  part_size=8 << 20)
    assert engine is not None and engine.host.endswith("amazonaws.com")
    assert engine.signs_bodies is False  # TLS protects the bodies: UNSIGNED-PAYLOAD


def test_a_failed_write_of_a_native_body_is_redone_by_botocore(seaweedfs, weed_bucket, files,
                                                               tmp_path, monkeypatch):
    """The engine writes bodies itself; a write that fails (a full disk, say) fails that
    request, nothing is left at the destination, and botocore tries the object again."""
    import errno

    root, sums = files
    _put_all(seaweedfs, weed_bucket, root)
    real_write = native._write_at
    refused = []

    def full_disk_once(fd, chunk, offset, **kwargs):
        if not refused and len(chunk) == 1000 + 4099 * 11:  # f11.bin's body
            refused.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, chunk, offset, **kwargs)

    monkeypatch.setattr(native, "_write_at", full_disk_once)
    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url) as proxy:
        down = download_files(_client(proxy.url), weed_bucket,
                              [DownloadItem(f"n/{p.name}", str(dest / p.name),
                                            p.stat().st_size) for p in sorted(root.iterdir())])
        by_botocore = [r.key.rsplit("/", 1)[-1] for r in proxy.requests
                       if not _native(r) and r.method == "GET" and "list-type" not in r.query]
    assert refused and by_botocore == ["f11.bin"]
    assert down.files == N and _sums(dest) == sums
    assert not [p for p in dest.iterdir() if ".part" in p.name]


def test_a_file_that_cannot_be_put_in_place_fails_alone_and_leaves_nothing(
        seaweedfs, weed_bucket, files, tmp_path):
    from nipype_s3.exceptions import TransferFailed

    root, sums = files
    _put_all(seaweedfs, weed_bucket, root)
    dest = tmp_path / "dest"
    (dest / "f04.bin").mkdir(parents=True)  # a folder where a file should go
    with pytest.raises(TransferFailed, match=r"1 of 30 objects failed.*'n/f04\.bin'") as err:
        download_files(_client(seaweedfs.url), weed_bucket,
                       [DownloadItem(f"n/{p.name}", str(dest / p.name), p.stat().st_size)
                        for p in sorted(root.iterdir())])
    assert [key for key, _ in err.value.failures] == ["n/f04.bin"]
    assert (dest / "f04.bin").is_dir()
    del sums["f04.bin"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.iterdir() if p.is_file()} == sums
    assert not [p for p in dest.iterdir() if ".part" in p.name]


def test_a_native_download_over_a_longer_stale_file_leaves_exactly_the_object(
        seaweedfs, weed_bucket, files, tmp_path):
    """Target files are opened without ``O_TRUNC`` (ext4 would start writing them back at
    ``close``); whatever was longer at the path before is cut to the object's size."""
    root, sums = files
    _put_all(seaweedfs, weed_bucket, root)
    engine = native.native_engine(_client(seaweedfs.url), weed_bucket, max_concurrency=4,
                                  part_size=8 << 20)
    names = ["f00.bin", "f07.bin"]
    for name in names:
        (tmp_path / name).write_bytes(b"stale" * 20000)  # longer than either object
    assert engine.download([(f"n/{name}", str(tmp_path / name)) for name in names]) == {}
    assert {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
            for name in names} == {name: sums[name] for name in names}


AWKWARD = ["odd/a b.txt", "odd/plus+sign", "odd/ünï/ç.nii.gz", "odd/q?x=1&y=2", "odd/pct%20",
           "odd/tilde~", "odd/eq=sign", "odd/ctl\x01char", "odd/amp&lt;"]


def test_native_listings_match_botocores_for_awkward_keys_and_pages(seaweedfs, weed_bucket,
                                                                     monkeypatch):
    from nipype_s3.s3.listing import list_objects

    client = _client(seaweedfs.url)
    for key in AWKWARD:
        client.put_object(Bucket=weed_bucket, Key=key, Body=key.encode())
    with RecordingProxy(seaweedfs.url) as proxy:
        via_proxy = _client(proxy.url)
        native_lists = {prefix: list_objects(via_proxy, weed_bucket, prefix)
                        for prefix in ("odd/", "odd/ü", "odd/q?x", "none/")}
        lists = [r for r in proxy.requests if "list-type" in r.query]
    assert lists and all(_native(r) for r in lists)  # the engine listed, botocore did not
    monkeypatch.setenv("NIPYPE_S3_ENGINE", "botocore")
    assert native_lists == {prefix: list_objects(client, weed_bucket, prefix)
                            for prefix in native_lists}
    assert sorted(native_lists["odd/"]) == sorted(AWKWARD)
    monkeypatch.delenv("NIPYPE_S3_ENGINE")

    # page by page: the tokens lead through every key once
    engine = native.listing_engine(client, weed_bucket)
    seen, token, pages = [], None, 0
    while True:
        page = engine.list_page("odd/", token, max_keys=4)
        seen += [key for key, *_ in page["objects"]]
        pages += 1
        token = page["token"]
        if not page["truncated"]:
            break
    assert pages == 3 and seen == sorted(AWKWARD)


def test_a_native_listing_that_fails_is_asked_again_of_botocore(seaweedfs, weed_bucket):
    from nipype_s3.exceptions import S3BucketNotFound
    from nipype_s3.s3.listing import list_objects

    with RecordingProxy(seaweedfs.url) as proxy:
        client = _client(proxy.url)
        with pytest.raises(S3BucketNotFound, match="nipype-s3-no-such-bucket"):
            list_objects(client, "nipype-s3-no-such-bucket", "x/")
        lists = [_native(r) for r in proxy.requests if "list-type" in r.query]
    assert lists[0] is True and lists[-1] is False  # the engine tried; botocore reported


def test_crt_callbacks_keep_their_thread_state_on_the_process_shared_event_loops(
        seaweedfs, weed_bucket, files, tmp_path):
    """Each CRT thread keeps one Python thread state across callbacks (it was made and
    deleted for every callback: an mmap/munmap pair each time), and every engine of the
    process uses the same few event-loop threads, so only a handful are ever kept."""
    import threading

    root, _sums = files
    _put_all(seaweedfs, weed_bucket, root)
    probe = threading.local()  # its values live in the calling thread's state
    counts: dict[int, int] = {}

    def on_bytes(_n):
        probe.calls = getattr(probe, "calls", 0) + 1
        ident = threading.get_ident()
        counts[ident] = max(counts.get(ident, 0), probe.calls)

    for i in range(3):  # three clients: three engines
        engine = native.native_engine(_client(seaweedfs.url), weed_bucket, max_concurrency=4,
                                      part_size=8 * 1024 * 1024)
        assert engine is not None
        dest = tmp_path / f"d{i}"
        dest.mkdir()
        jobs = [(f"n/{p.name}", str(dest / p.name)) for p in sorted(root.iterdir())]
        assert engine.download(jobs, on_bytes=on_bytes) == {}
    loops = max(1, min(4, os.cpu_count() or 1))
    assert 1 <= len(counts) <= loops  # three engines, one set of threads
    # 90 downloads of 1-120 KiB: the thread states saw all their threads' callbacks
    assert sum(counts.values()) >= 3 * N


def _delay_proxy(url, rtt):
    """benchmarks/latency.py's proxy: one round trip more per connection and request."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "latency.py")
    spec = importlib.util.spec_from_file_location("bench_latency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DelayProxy(url, rtt)


def test_small_objects_go_on_as_many_connections_as_asked_for(seaweedfs, weed_bucket,
                                                             tmp_path):
    """The CRT sizes its pool from a throughput target (25 connections at its default)
    and sets a part's memory aside for each GET (16 at once with 8 MiB parts): a
    concurrency of 40 asked for 40 small objects gets 40 connections both ways."""
    root = tmp_path / "src"
    root.mkdir()
    for i in range(40):
        (root / f"s{i:02d}.bin").write_bytes(os.urandom(64 * 1024) + bytes([i]))
    with _delay_proxy(seaweedfs.url, 0.05) as proxy:
        client = _client(proxy.url)
        items = [UploadItem(str(p), f"c/{p.name}") for p in sorted(root.iterdir())]
        settings = TransferSettings(max_concurrency=40)
        before = proxy.connections
        assert upload_files(client, weed_bucket, items, settings=settings,
                            skip_unchanged=False).files == 40
        assert proxy.connections - before >= 40
        dest = tmp_path / "dest"
        before = proxy.connections
        down = download_files(client, weed_bucket,
                              [DownloadItem(i.key, str(dest / os.path.basename(i.source)),
                                            os.path.getsize(i.source)) for i in items],
                              settings=settings, skip_unchanged=False)
        assert down.files == 40 and proxy.connections - before >= 40
    assert _sums(dest) == _sums(root)


def test_an_upload_keeps_the_etags_its_answers_gave_without_a_list(seaweedfs, weed_bucket,
                                                                  files, tmp_path,
                                                                  monkeypatch):
    """Single PUTs (native or botocore) give their ETags in their answers: no LIST after
    the upload, and the first unchanged re-run still reads no file."""
    from nipype_s3.s3 import hashing

    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(tmp_path / "cache" / "d.sqlite"))
    root, _ = files
    items = [UploadItem(str(p), f"e/{p.name}") for p in sorted(root.iterdir())]
    for engine in ("auto", "botocore"):
        monkeypatch.setenv("NIPYPE_S3_ENGINE", engine)
        with RecordingProxy(seaweedfs.url) as rec:
            client = _client(rec.url)
            prefixed = [UploadItem(i.source, f"{engine}/{i.key}") for i in items]
            assert upload_files(client, weed_bucket, prefixed).files == N
            assert rec.count("GET", query_has="list-type") == 1  # the one before
            assert rec.count("PUT") == N
            read = []
            real = hashing.file_md5
            monkeypatch.setattr(hashing, "file_md5",
                                lambda p, read=read, real=real: read.append(p) or real(p))
            rec.clear()
            again = upload_files(client, weed_bucket, prefixed)
            monkeypatch.setattr(hashing, "file_md5", real)
            assert (again.files, again.skipped, read) == (0, N, [])
            assert rec.count("PUT") == 0
