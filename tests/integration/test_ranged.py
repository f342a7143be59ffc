"""Large objects streamed down in ranges through botocore (``s3.ranged``), against a
real S3 server: exact, of the one object listed, and nothing left behind."""

import hashlib
import os

import boto3
import pytest

from nipype_s3.exceptions import TransferFailed
from nipype_s3.s3 import ranged
from nipype_s3.s3.download import DownloadItem, download_files
from nipype_s3.s3.listing import list_objects
from nipype_s3.s3.session import make_s3_client
from nipype_s3.s3.transfer import TransferSettings
from nipype_s3.testing.proxy import RecordingProxy

pytestmark = pytest.mark.seaweedfs

MiB = 1024 * 1024
SETTINGS = TransferSettings(multipart_threshold=4 * MiB, multipart_chunksize=4 * MiB)
SIZES = {"a.nii": 10 * MiB + 7, "b.nii": 5 * MiB, "c.nii": 4 * MiB - 1}  # c: not streamed


@pytest.fixture
def objects(seaweedfs, weed_bucket, monkeypatch):
    """Three objects under ``r/``, with their SHA-256; ranges of 3 MiB."""
    monkeypatch.setattr(ranged, "RANGE_SIZE", 3 * MiB)
    client = seaweedfs.client()
    sums = {}
    for name, size in SIZES.items():
        data = os.urandom(size)
        client.put_object(Bucket=weed_bucket, Key=f"r/{name}", Body=data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def _items(client, bucket, dest):
    listing = list_objects(client, bucket, "r/")
    return [DownloadItem(key, str(dest / key[2:]), info.size, info.etag, info.last_modified)
            for key, info in sorted(listing.items())]


def _sums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _object_gets(proxy, name):
    return [r for r in proxy.requests if r.method == "GET" and r.key.endswith(name)]


def test_large_objects_come_down_in_ranges_of_the_object_listed(seaweedfs, weed_bucket,
                                                                 objects, tmp_path):
    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url) as proxy:
        client = make_s3_client(boto3.Session(), endpoint_url=proxy.url, region="us-east-1")
        items = _items(client, weed_bucket, dest)
        summary = download_files(client, weed_bucket, items, settings=SETTINGS)
    assert summary.files == 3 and _sums(dest) == objects  # byte exact, nothing else there
    etags = {item.key: item.etag.strip('"') for item in items}
    a = _object_gets(proxy, "a.nii")
    # 10 MiB + 7 in four ranges of about the same size, each of the ETag listed
    assert sorted(r.header("range") for r in a) == [
        "bytes=0-2621441", "bytes=2621442-5242883", "bytes=5242884-7864325",
        "bytes=7864326-10485766"]
    assert all(r.header("if-match").strip('"') == etags["r/a.nii"] for r in a)
    assert all(r.status == 206 for r in a)
    b = _object_gets(proxy, "b.nii")
    assert len(b) == 2 and all(r.header("if-match") for r in b)
    c = _object_gets(proxy, "c.nii")  # under the threshold: the native engine's
    assert len(c) == 1 and c[0].header("if-match") is None
    # the object's time, as for every download, so a re-run skips it from stat alone
    assert os.stat(dest / "a.nii").st_mtime == pytest.approx(
        items[0].last_modified.timestamp(), abs=0.001)
    with RecordingProxy(seaweedfs.url) as proxy:
        client = make_s3_client(boto3.Session(), endpoint_url=proxy.url, region="us-east-1")
        again = download_files(client, weed_bucket, _items(client, weed_bucket, dest),
                               settings=SETTINGS)
    assert again.files == 0 and again.skipped == 3
    assert not [r for r in proxy.requests if r.method == "GET" and "list-type" not in r.query]


def test_a_body_cut_off_midway_is_asked_again(seaweedfs, weed_bucket, objects, tmp_path):
    dest = tmp_path / "dest"

    def object_gets(method, path, query):
        return method == "GET" and path.endswith(".nii")

    with RecordingProxy(seaweedfs.url, fault_rate=0.4, faults=("cut",),
                        fault_filter=object_gets, seed=3) as proxy:
        client = make_s3_client(boto3.Session(), endpoint_url=proxy.url, region="us-east-1")
        download_files(client, weed_bucket, _items(client, weed_bucket, dest),
                       settings=SETTINGS)
        ranges = [r for r in _object_gets(proxy, "a.nii") if r.header("range")]
    assert _sums(dest) == objects
    assert len(ranges) > 4  # some ranges were asked for again
    assert not [p.name for p in dest.iterdir() if ".part" in p.name]


def test_an_object_written_again_after_its_listing_fails_and_leaves_nothing(
        seaweedfs, weed_bucket, objects, tmp_path):
    dest = tmp_path / "dest"
    client = make_s3_client(boto3.Session(), region="us-east-1")
    items = _items(client, weed_bucket, dest)
    # someone writes a.nii again, the same size, between the LIST and the GETs
    seaweedfs.client().put_object(Bucket=weed_bucket, Key="r/a.nii",
                                  Body=os.urandom(SIZES["a.nii"]))
    with pytest.raises(TransferFailed) as caught:
        download_files(client, weed_bucket, items, settings=SETTINGS)
    message = str(caught.value)
    assert "1 of 3 objects failed" in message and "r/a.nii" in message
    assert "changed after it was listed" in message and "Run again" in message
    assert sorted(p.name for p in dest.iterdir()) == ["b.nii", "c.nii"]  # no part, no temp


def test_an_interrupt_midway_leaves_no_file_and_no_descriptor(seaweedfs, weed_bucket, objects,
                                                              tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    client = make_s3_client(boto3.Session(), region="us-east-1")
    items = [i for i in _items(client, weed_bucket, dest) if i.size >= 4 * MiB]
    seen = []

    def interrupted(nbytes):
        seen.append(nbytes)
        if len(seen) == 3:
            raise KeyboardInterrupt

    jobs = [(i.key, i.dest + ".part", i.size, i.etag) for i in items]
    with pytest.raises(KeyboardInterrupt):
        ranged.ranged_download(client, weed_bucket, jobs, threads=4, extra={},
                               on_bytes=interrupted)
    assert list(dest.iterdir()) == []
    if os.path.isdir("/proc/self/fd"):
        held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                if os.path.exists(f"/proc/self/fd/{fd}")]
        assert not [t for t in held if t.startswith(str(dest))]


def test_the_botocore_engine_keeps_large_objects_on_s3transfer(seaweedfs, weed_bucket, objects,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("NIPYPE_S3_ENGINE", "botocore")
    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url) as proxy:
        client = make_s3_client(boto3.Session(), endpoint_url=proxy.url, region="us-east-1")
        download_files(client, weed_bucket, _items(client, weed_bucket, dest),
                       settings=SETTINGS)
    assert _sums(dest) == objects
    # s3transfer's ranges are the chunk size (4 MiB), not ours (3 MiB)
    assert "bytes=0-4194303" in {r.header("range") for r in _object_gets(proxy, "a.nii")}
