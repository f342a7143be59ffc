"""The content store against SeaweedFS, a server that checks checksums as S3 does: a
body that is not its key's is refused, and the store hashes the file and sends it
again; a multipart object is recognised by its checksum of parts' checksums."""

import base64
import hashlib
import os

import boto3
import pytest

from nipype_s3.s3 import cas
from nipype_s3.s3.session import make_s3_client
from nipype_s3.s3.transfer import TransferSettings
from nipype_s3.testing.proxy import RecordingProxy

pytestmark = pytest.mark.seaweedfs


def _client(url):
    return make_s3_client(boto3.Session(), endpoint_url=url, region="us-east-1")


def _objects(server, bucket):
    """``{key: bytes}`` of the bucket, read with the server's own client."""
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.mark.parametrize("engine", ["native", "botocore"])
def test_a_body_changed_after_hashing_is_refused_then_hashed_and_sent_again(
        seaweedfs, weed_bucket, tmp_path, monkeypatch, engine):
    if engine == "native":
        pytest.importorskip("awscrt")
    monkeypatch.setenv("NIPYPE_S3_ENGINE", engine)
    f = tmp_path / "sub-01_task-rest_bold.json"
    f.write_bytes(b'{"RepetitionTime": 2.0}')
    old = hashlib.sha256(f.read_bytes()).hexdigest()
    real = cas.upload_files

    def rewritten_first(*args, **kwargs):  # same size, other bytes, before it is sent
        if not rewritten_first.done:
            rewritten_first.done = True
            f.write_bytes(b'{"RepetitionTime": 3.0}')
        return real(*args, **kwargs)

    rewritten_first.done = False
    monkeypatch.setattr(cas, "upload_files", rewritten_first)
    with RecordingProxy(seaweedfs.url) as proxy:
        store = cas.ContentStore(_client(proxy.url), weed_bucket, "p")
        [entry] = store.put([str(f)])
        puts = [(r.key.rsplit("/", 1)[1], r.status, r.header("x-amz-checksum-sha256"))
                for r in proxy.requests if r.method == "PUT"]
    new = hashlib.sha256(f.read_bytes()).hexdigest()
    assert entry.sha256 == new
    assert _objects(seaweedfs, weed_bucket) == {store.key(new): f.read_bytes()}
    refused = [p for p in puts if p[0] == old]
    assert refused and all(status == 400 for _, status, _ in refused)
    assert [status for key, status, _ in puts if key == new] == [200]
    # every PUT carried the checksum of the digest it was sent under
    assert all(sent == base64.b64encode(bytes.fromhex(key)).decode() for key, _, sent in puts)


def test_a_multipart_object_is_found_whole_by_its_checksum_of_parts(seaweedfs, weed_bucket,
                                                                    tmp_path):
    settings = TransferSettings(multipart_threshold=5 * 1024 * 1024,
                                multipart_chunksize=5 * 1024 * 1024)
    f = tmp_path / "bold.nii"
    f.write_bytes(os.urandom(11 * 1024 * 1024))
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    with RecordingProxy(seaweedfs.url) as proxy:
        cas.ContentStore(_client(proxy.url), weed_bucket, "p", settings=settings).put([str(f)])
        first = len(proxy.requests)
        store = cas.ContentStore(_client(proxy.url), weed_bucket, "p", settings=settings)
        store.put([str(f)])
        again = [r.method for r in proxy.requests[first:]]
    head = seaweedfs.client().head_object(Bucket=weed_bucket, Key=store.key(digest),
                                          ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"].endswith("-3")  # three parts' checksums, checked by S3
    assert again == ["HEAD"]
    assert _objects(seaweedfs, weed_bucket) == {store.key(digest): f.read_bytes()}
