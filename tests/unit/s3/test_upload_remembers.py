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
