"""download_files on in-process moto: round trip, skip, no partial files, one request each."""

import os

import pytest

from nipype_s3.exceptions import ConfigurationError, TransferFailed
from nipype_s3.s3.download import DownloadItem, download_files
from nipype_s3.s3.listing import common_prefix, list_objects


def test_known_size_means_no_head(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    s3_inprocess.put_object(Bucket="bkt", Key="a/b.txt", Body=b"abc")
    info = list_objects(s3_inprocess, "bkt")["a/b.txt"]
    calls = []
    s3_inprocess.meta.events.register("before-call.s3", lambda model, **kw:
                                      calls.append(model.name))
    summary = download_files(s3_inprocess, "bkt", [DownloadItem(
        "a/b.txt", str(tmp_path / "b.txt"), info.size, info.etag, info.last_modified)])
    assert calls == ["GetObject"]
    assert (tmp_path / "b.txt").read_bytes() == b"abc" and summary.files == 1
    # the file carries the object's time, so a re-run knows it without reading it
    assert int((tmp_path / "b.txt").stat().st_mtime) == int(info.last_modified.timestamp())


def test_round_trip_and_skip(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    blobs = {f"data/sub-0{i}/x.bin": os.urandom(500 + i) for i in range(6)}
    for key, data in blobs.items():
        s3_inprocess.put_object(Bucket="bkt", Key=key, Body=data)
    listing = list_objects(s3_inprocess, "bkt", "data/")
    items = [DownloadItem(k, str(tmp_path / k), info.size, info.etag)
             for k, info in listing.items()]
    first = download_files(s3_inprocess, "bkt", items)
    assert first.files == 6
    for key, data in blobs.items():
        assert (tmp_path / key).read_bytes() == data
    assert download_files(s3_inprocess, "bkt", items).skipped == 6
    (tmp_path / "data/sub-01/x.bin").write_bytes(b"tampered")
    assert download_files(s3_inprocess, "bkt", items).files == 1
    assert (tmp_path / "data/sub-01/x.bin").read_bytes() == blobs["data/sub-01/x.bin"]


def test_same_size_files_are_hashed_unless_their_time_matches(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    blobs = {f"k{i}.bin": os.urandom(300) for i in range(3)}
    for key, data in blobs.items():
        s3_inprocess.put_object(Bucket="bkt", Key=key, Body=data)
    items = [DownloadItem(k, str(tmp_path / k), i.size, i.etag, i.last_modified)
             for k, i in list_objects(s3_inprocess, "bkt").items()]
    assert download_files(s3_inprocess, "bkt", items).files == 3
    # k0: same bytes, another time (a copy): read, found equal, given the object's time
    os.utime(tmp_path / "k0.bin", (1_000_000, 1_000_000))
    # k1: same size, other bytes, written within the object's second: downloaded again
    (tmp_path / "k1.bin").write_bytes(os.urandom(300))
    stamp = items[1].mtime + 0.4
    os.utime(tmp_path / "k1.bin", (stamp, stamp))
    again = download_files(s3_inprocess, "bkt", items)
    assert (again.files, again.skipped) == (1, 2)
    assert again.done == [str(tmp_path / "k1.bin")]
    for key, data in blobs.items():
        assert (tmp_path / key).read_bytes() == data
    assert int((tmp_path / "k0.bin").stat().st_mtime) == int(items[0].mtime)


def test_missing_key_leaves_no_file(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    dest = tmp_path / "out" / "gone.nii"
    with pytest.raises(TransferFailed) as err:
        download_files(s3_inprocess, "bkt", [DownloadItem("gone.nii", str(dest), size=10)])
    assert "1 of 1 objects failed to download from s3://bkt" in str(err.value)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_duplicate_destinations_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="same path"):
        download_files(None, "bkt", [DownloadItem("a", str(tmp_path / "x")),
                                     DownloadItem("b", str(tmp_path / "x"))])


def test_common_prefix():
    assert common_prefix(["a/b/c", "a/b/d/e"]) == "a/b/"
    assert common_prefix(["a/bc", "a/bd"]) == "a/"
    assert common_prefix(["x", "y"]) == ""
    assert common_prefix([]) == ""
    assert common_prefix(["only/one/key.nii"]) == "only/one/"


def test_temporary_files_of_killed_downloads_are_swept(s3_inprocess, tmp_path):
    """A SIGKILLed download leaves ``<dest>.nipype-s3-<pid>-<n>.part``; the next download
    into that folder removes it, but never a live process's."""
    import subprocess
    import sys

    client, bucket = s3_inprocess, "sweep-bucket"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="k/a.bin", Body=b"abc")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    leftover = tmp_path / f"other.bin.nipype-s3-{dead_pid}-140234.part"
    leftover.write_bytes(b"half of something")
    by_s3transfer = tmp_path / f"big.nii.nipype-s3-{dead_pid}-l0.part.0aF39bC1"
    by_s3transfer.write_bytes(b"a part of a large object")
    running = tmp_path / f"b.bin.nipype-s3-{os.getppid()}-n.part"  # a live process's
    running.write_bytes(b"in progress")
    unrelated = tmp_path / "notes.part"
    unrelated.write_text("not ours")
    download_files(client, bucket, [DownloadItem("k/a.bin", str(tmp_path / "a.bin"), 3)])
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert not leftover.exists() and not by_s3transfer.exists()
    assert running.exists() and unrelated.exists()


def test_large_objects_through_s3transfer_land_in_place_and_leave_nothing(s3_inprocess,
                                                                         tmp_path):
    """In-process moto keeps transfers on botocore: objects from the multipart threshold
    go through s3transfer, into a temporary name of ours first."""
    from nipype_s3.s3.transfer import TransferSettings

    s3_inprocess.create_bucket(Bucket="big-bucket")
    blobs = {f"big{i}.bin": os.urandom(3 * 1024 * 1024 + i) for i in range(2)}
    for key, data in blobs.items():
        s3_inprocess.put_object(Bucket="big-bucket", Key=key, Body=data)
    items = [DownloadItem(k, str(tmp_path / k), i.size, i.etag, i.last_modified)
             for k, i in list_objects(s3_inprocess, "big-bucket").items()]
    settings = TransferSettings(multipart_threshold=1024 * 1024, multipart_chunksize=1024 * 1024)
    summary = download_files(s3_inprocess, "big-bucket", items, settings=settings)
    assert summary.files == 2
    assert sorted(os.listdir(tmp_path)) == sorted(blobs)  # no temporary name left
    for key, data in blobs.items():
        assert (tmp_path / key).read_bytes() == data
    # a destination that cannot be written: an error for that object, nothing left beside
    (tmp_path / "big0.bin").unlink()
    (tmp_path / "big0.bin").mkdir()
    (tmp_path / "big0.bin" / "x").write_text("a folder in the way")
    with pytest.raises(TransferFailed, match="1 of 2 objects failed"):
        download_files(s3_inprocess, "big-bucket", items, settings=settings)
    assert sorted(os.listdir(tmp_path)) == sorted(blobs)


def test_the_native_part_size_follows_the_largest_small_object():
    from nipype_s3.s3.download import DownloadItem, _part_size
    from nipype_s3.s3.transfer import TransferSettings

    settings = TransferSettings()  # 16 MiB chunks
    MiB = 1024 * 1024

    def items(*sizes):
        return [DownloadItem(f"k{i}", f"/d/{i}", size) for i, size in enumerate(sizes)]

    assert _part_size(items(256 * 1024, 1000), settings) == MiB
    assert _part_size(items(MiB), settings) == MiB
    assert _part_size(items(3 * MiB), settings) == 16 * MiB
    assert _part_size(items(200 * MiB), settings) == 16 * MiB
    assert _part_size(items(1000, None), settings) == 16 * MiB  # a size not known
