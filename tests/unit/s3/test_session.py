"""Client construction: endpoint, region discovery, retries, pool, no Expect header."""

import boto3
import pytest
from botocore.stub import Stubber

from nipype_s3.exceptions import S3BucketNotFound
from nipype_s3.s3 import session as s3session
from nipype_s3.s3.session import bucket_region, client_config, make_s3_client


def test_config_bounds_every_wait_and_sizes_pool():
    conf = client_config(max_concurrency=40)
    assert conf.max_pool_connections == 44
    assert conf.retries == {"mode": "adaptive", "max_attempts": 8}
    assert conf.connect_timeout == 10 and conf.read_timeout == 60


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = make_s3_client(boto3.Session(), bucket="anything")
    assert client.meta.endpoint_url == "http://127.0.0.1:9"
    assert client.meta.region_name == "us-east-1"


def test_explicit_endpoint_beats_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    client = make_s3_client(boto3.Session(), endpoint_url="http://127.0.0.1:10")
    assert client.meta.endpoint_url == "http://127.0.0.1:10"


def test_anonymous_client_does_not_sign():
    from botocore import UNSIGNED

    client = make_s3_client(boto3.Session(), endpoint_url="http://127.0.0.1:9", anon=True)
    assert client.meta.config.signature_version is UNSIGNED


def test_region_found_from_bucket(monkeypatch):
    probe = boto3.client("s3", region_name="us-east-1")
    stub = Stubber(probe)
    stub.add_response("head_bucket", {"ResponseMetadata": {
        "HTTPStatusCode": 200, "HTTPHeaders": {"x-amz-bucket-region": "eu-central-1"}}},
        {"Bucket": "abcd-data"})
    stub.activate()
    session = boto3.Session()
    monkeypatch.setattr(session, "client", lambda *a, **k: probe)
    assert bucket_region("abcd-data", session) == "eu-central-1"
    # cached: the stub has no more responses, a second request would fail
    assert bucket_region("abcd-data", session) == "eu-central-1"
    stub.assert_no_pending_responses()


def test_region_from_a_403_answer(monkeypatch):
    probe = boto3.client("s3", region_name="us-east-1")
    stub = Stubber(probe)
    stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403,
                          response_meta={"HTTPHeaders": {"x-amz-bucket-region": "us-west-2"}})
    stub.activate()
    session = boto3.Session()
    monkeypatch.setattr(session, "client", lambda *a, **k: probe)
    assert bucket_region("private-bucket", session) == "us-west-2"


def test_region_of_missing_bucket_is_a_clear_error(monkeypatch):
    probe = boto3.client("s3", region_name="us-east-1")
    stub = Stubber(probe)
    stub.add_client_error("head_bucket", service_error_code="NoSuchBucket",
                          http_status_code=404)
    stub.activate()
    session = boto3.Session()
    monkeypatch.setattr(session, "client", lambda *a, **k: probe)
    with pytest.raises(S3BucketNotFound, match="'no-such-bucket-x' does not exist"):
        bucket_region("no-such-bucket-x", session)


def test_expect_header_is_dropped():
    class Req:
        headers = {"Expect": "100-continue", "Content-Length": "5"}

    s3session._drop_expect_header(Req())
    assert Req.headers == {"Content-Length": "5"}


@pytest.mark.parametrize("ours", [True, False])
def test_client_registers_expect_handler(ours):
    if ours:
        client = make_s3_client(boto3.Session(), endpoint_url="http://127.0.0.1:9")
    else:  # control: a plain client sends the header, so the test can see it go
        client = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1")
    sent = {}

    def capture(request, **kwargs):
        sent.update(request.headers)
        from botocore.awsrequest import AWSResponse

        class Raw:
            def stream(self):
                yield b""

        return AWSResponse(request.url, 200, {}, Raw())

    client.meta.events.register_last("before-send.s3", capture)
    client.put_object(Bucket="bkt", Key="k", Body=b"x" * (2 * 1024 * 1024))
    assert ("Expect" in sent) is not ours
    assert sent.get("Content-Length") == str(2 * 1024 * 1024)


@pytest.mark.parametrize("text", [
    "2026-11-22T06:41:48.123Z", "2026-11-22T06:41:48Z", "2026-11-22T06:41:48.123456+00:00",
    "2026-11-22T08:41:48+02:00", "Sun, 22 Nov 2026 06:41:48 GMT", "1700000000", "2026-11-22"])
def test_fast_timestamps_are_botocores_instants(text):
    import botocore.utils

    from nipype_s3.s3.session import fast_timestamp

    assert fast_timestamp(text) == botocore.utils.parse_timestamp(text)


def test_listing_uses_the_fast_parser_and_keeps_times(tmp_path):
    import datetime as dt

    import boto3
    from moto import mock_aws

    from nipype_s3.s3.listing import list_objects
    from nipype_s3.s3.session import make_s3_client

    with mock_aws():
        client = make_s3_client(boto3.Session(), region="us-east-1")
        client.create_bucket(Bucket="times-bucket")
        client.put_object(Bucket="times-bucket", Key="a/b", Body=b"x")
        (info,) = list_objects(client, "times-bucket", "a/").values()
        head = client.head_object(Bucket="times-bucket", Key="a/b")
    assert info.last_modified.tzinfo is not None
    assert abs(info.last_modified - dt.datetime.now(dt.timezone.utc)).total_seconds() < 600
    assert info.last_modified == head["LastModified"]


@pytest.mark.parametrize("was_enabled", [True, False])
def test_paused_gc_restores_the_collector(was_enabled):
    import gc

    from nipype_s3.s3.session import paused_gc

    (gc.enable if was_enabled else gc.disable)()
    try:
        with paused_gc():
            assert not gc.isenabled()
        assert gc.isenabled() is was_enabled
        with pytest.raises(KeyError), paused_gc():
            raise KeyError("x")
        assert gc.isenabled() is was_enabled
    finally:
        gc.enable()


def test_objects_made_while_paused_go_straight_to_the_oldest_generation():
    """The model objects of a client live as long as the process: they are not walked
    by young collections, and cyclic garbage among them is still collected."""
    import gc
    import weakref

    from nipype_s3.s3.session import paused_gc

    class Node:
        pass

    # Python 3.12 starts with a few hundred objects of its own frozen: then nothing is
    # promoted (unfreezing would release those too) and the collector works as usual
    frozen = gc.get_freeze_count()
    assert gc.isenabled()
    gc.collect()  # every generation's count at 0: the next collection is a young one
    with paused_gc():
        kept = [[i] for i in range(30_000)]  # a model's worth
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle, dropped below
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert (id(kept) in oldest and id(kept[-1]) in oldest) is (frozen == 0)
    assert gc.get_freeze_count() == frozen
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None  # nothing was made uncollectable


def test_a_few_objects_made_while_paused_stay_young():
    import gc

    from nipype_s3.s3.session import paused_gc

    gc.collect()
    with paused_gc():
        few = [[i] for i in range(100)]
    assert id(few) not in {id(o) for o in gc.get_objects(generation=2)}


def test_a_process_that_froze_its_objects_keeps_them_frozen():
    import gc

    from nipype_s3.s3.session import paused_gc

    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with paused_gc():
            [[i] for i in range(100)]
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_sessions_share_one_model_loader_per_search_path(monkeypatch, tmp_path):
    def loader_of(session):
        make_s3_client(session, endpoint_url="http://127.0.0.1:9")
        return session._session.get_component("data_loader")

    monkeypatch.setattr(s3session, "_loaders", {})
    first, second = loader_of(boto3.Session()), loader_of(boto3.Session())
    assert first is second
    # a session that looks for models elsewhere keeps a loader of its own
    # so does a session whose loader a user gave a search path of their own
    custom = boto3.Session()
    custom._session.get_component("data_loader").search_paths.append(str(tmp_path))
    assert loader_of(custom) is not first
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    other = loader_of(boto3.Session())
    assert other is not first and str(tmp_path) in other.search_paths


@pytest.mark.parametrize("url, signed", [
    (None, False), ("https://s3.eu-west-1.amazonaws.com", False), ("HTTPS://minio:9000", False),
    ("http://127.0.0.1:8333", True), ("http://minio.lab:9000", True)])
def test_bodies_are_hashed_into_signatures_only_without_tls(url, signed):
    import hashlib

    from botocore.awsrequest import AWSResponse

    from nipype_s3.s3.session import signs_payloads

    assert signs_payloads(url) is signed
    client = make_s3_client(boto3.Session(aws_access_key_id="AKIDEXAMPLE",
                                          aws_secret_access_key="not-a-secret"),
                            endpoint_url=url, region="eu-west-1")
    sent = {}

    class Raw:
        def stream(self):
            yield b""

    def capture(request, **kwargs):
        sent.update(request.headers)
        return AWSResponse(request.url, 200, {}, Raw())

    client.meta.events.register_last("before-send.s3", capture)
    body = b"nifti" * 1000
    client.put_object(Bucket="bkt", Key="k", Body=body)
    value = sent["x-amz-content-sha256"]
    value = value.decode() if isinstance(value, bytes) else value
    assert value == (hashlib.sha256(body).hexdigest() if signed else "UNSIGNED-PAYLOAD")


@pytest.mark.parametrize("reason, final", [
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate",
     True),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", True),
    ("hostname 'minio.lab' doesn't match 'other.lab'", True),
    ("EOF occurred in violation of protocol (_ssl.c:2427)", False),  # a dropped connection
])
def test_tls_setups_that_cannot_work_are_not_retried(reason, final):
    import botocore.exceptions

    from nipype_s3.s3.session import _tls_misconfiguration_is_final

    exc = botocore.exceptions.SSLError(endpoint_url="https://minio.lab", error=reason)
    if final:
        with pytest.raises(botocore.exceptions.SSLError):
            _tls_misconfiguration_is_final(caught_exception=exc, attempts=1)
    else:
        assert _tls_misconfiguration_is_final(caught_exception=exc, attempts=1) is None
    assert _tls_misconfiguration_is_final(caught_exception=None, attempts=1) is None


def test_shared_loader_answers_for_one_service_as_botocore_would():
    import botocore.exceptions
    import botocore.loaders

    session = boto3.Session(region_name="us-east-1")
    s3session._share_loader(session)
    loader = session._session.get_component("data_loader")
    assert isinstance(loader, s3session._QuickLoader)
    names = loader.list_available_services("service-2")
    assert "s3" in names and "ec2" in names and "no-such-service" not in names
    # anything else asked of the list is botocore's own list
    assert list(names) == botocore.loaders.Loader.list_available_services(loader, "service-2")
    assert session.client("s3").meta.service_model.service_name == "s3"
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        session.client("no-such-service")
