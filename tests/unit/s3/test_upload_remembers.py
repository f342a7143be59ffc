"""An upload leaves each file's ETag in the digest cache, so the first unchanged re-run
compares without reading any file (a multipart ETag costs a read of the whole file)."""

import os

import pytest

from nipype_s3.s3 import hashing
from nipype_s3.s3.transfer import TransferSettings
from nipype_s3.s3.upload import UploadItem, upload_files

MiB = 1024 * 1024


@pytest.fixture
def reads(monkeypatch):
    """Every whole-file digest computed (a read of the file), by kind."""
    seen = []
    real_md5, real_etag = hashing.file_md5, hashing.multipart_etag
    monkeypatch.setattr(hashing, "file_md5", lambda p: seen.append(("md5", p)) or real_md5(p))
    monkeypatch.setattr(hashing, "multipart_etag",
                        lambda p, ps: seen.append(("etag", p)) or real_etag(p, ps))
    return seen


def test_the_first_unchanged_rerun_reads_no_file(s3_inprocess, tmp_path, reads,
                                                 monkeypatch):
    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(tmp_path / "cache" / "d.sqlite"))
    s3_inprocess.create_bucket(Bucket="out-bucket")
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    files = {"big.nii.gz": os.urandom(12 * MiB), "small.json": b'{"a": 1}'}
    items = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        items.append(UploadItem(str(tmp_path / name), f"derivs/{name}"))
    first = upload_files(s3_inprocess, "out-bucket", items, settings=settings)
    assert first.files == 2
    reads.clear()
    again = upload_files(s3_inprocess, "out-bucket", items, settings=settings)
    assert (again.files, again.skipped) == (0, 2)
    assert reads == []  # compared by the ETags the upload left, no file read
    # a file changed since: read and sent again
    (tmp_path / "small.json").write_bytes(b'{"a": 2}')
    third = upload_files(s3_inprocess, "out-bucket", items, settings=settings)
    assert (third.files, third.skipped) == (1, 1)
    head = s3_inprocess.get_object(Bucket="out-bucket", Key="derivs/small.json")
    assert head["Body"].read() == b'{"a": 2}'


def test_an_etag_that_is_no_md5_is_not_kept(s3_inprocess, tmp_path, monkeypatch):
    """Under SSE-KMS (here the bucket's default) an answer's ETag is not the body's MD5:
    kept as one, it would stand for the file's digest."""
    from nipype_s3.s3 import upload

    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(tmp_path / "cache" / "d.sqlite"))
    kept = []
    monkeypatch.setattr(upload, "remember_etag", lambda path, etag, *a, **k: kept.append(
        (os.path.basename(path), etag)))
    (tmp_path / "a.json").write_bytes(b"{}")
    item = [UploadItem(str(tmp_path / "a.json"), "k/a.json")]
    s3_inprocess.create_bucket(Bucket="plain-bucket")
    upload_files(s3_inprocess, "plain-bucket", item)
    assert [name for name, _ in kept] == ["a.json"]
    kept.clear()
    s3_inprocess.create_bucket(Bucket="kms-bucket")
    s3_inprocess.put_bucket_encryption(
        Bucket="kms-bucket", ServerSideEncryptionConfiguration={"Rules": [{
            "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]})
    upload_files(s3_inprocess, "kms-bucket", item)
    assert kept == []


def test_a_listed_etag_of_other_parts_than_sent_is_not_kept(tmp_path, monkeypatch):
    """A multipart upload's ETag comes from a LIST after it: an object written there
    since, in one PUT or in other parts, is not taken for this file's."""
    from nipype_s3.s3 import upload
    from nipype_s3.s3.listing import ObjectInfo

    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (12 * MiB))
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    item = UploadItem(str(path), "k/big.bin")
    kept = []
    monkeypatch.setattr(upload, "remember_etag", lambda p, etag, *a, **k: kept.append(etag))
    for listed, expected in (("0" * 32, []), ("ab" * 16 + "-2", []),
                             ("ab" * 16 + "-3", ["ab" * 16 + "-3"])):
        kept.clear()
        monkeypatch.setattr(upload, "list_objects", lambda *a, listed=listed, **k: {
            "k/big.bin": ObjectInfo("k/big.bin", 12 * MiB, listed)})
        upload._remember_etags(None, "b", [item], ["k/big.bin"], {str(path): path.stat()},
                               settings, {})
        assert kept == expected, listed
