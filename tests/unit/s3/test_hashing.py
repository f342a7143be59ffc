"""Local ETags equal what S3 computes (checked against moto), streamed."""

import os

import pytest
from boto3.s3.transfer import TransferConfig

from nipype_s3.config import MiB
from nipype_s3.s3.hashing import candidate_part_sizes, etag_matches, file_md5, multipart_etag


@pytest.fixture
def blob(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(11 * MiB + 12345))
    return str(path)


@pytest.mark.parametrize("part_mib", [5, 8])
def test_multipart_etag_matches_s3(s3_inprocess, blob, part_mib):
    s3_inprocess.create_bucket(Bucket="hashes")
    part = part_mib * MiB
    s3_inprocess.upload_file(blob, "hashes", "k", Config=TransferConfig(
        multipart_threshold=part, multipart_chunksize=part))
    etag = s3_inprocess.head_object(Bucket="hashes", Key="k")["ETag"].strip('"')
    assert etag.endswith("-3") if part_mib == 5 else etag.endswith("-2")
    assert multipart_etag(blob, part) == etag
    # found even when our preferred part size differs from the uploader's
    assert etag_matches(blob, etag, part_size=16 * MiB)


def test_single_part_etag_is_md5(s3_inprocess, tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"hello nipype")
    s3_inprocess.create_bucket(Bucket="hashes")
    etag = s3_inprocess.put_object(Bucket="hashes", Key="s", Body=b"hello nipype")["ETag"]
    assert file_md5(path) == etag.strip('"')
    assert etag_matches(path, etag, part_size=8 * MiB)
    path.write_bytes(b"hello NIPYPE")
    assert not etag_matches(path, etag, part_size=8 * MiB)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert file_md5(path) == "d41d8cd98f00b204e9800998ecf8427e"


def test_candidate_part_sizes():
    size = 100 * MiB
    assert candidate_part_sizes(size, 7, 16 * MiB)[0] == 16 * MiB
    assert candidate_part_sizes(size, 13, 16 * MiB)[0] == 8 * MiB
    assert candidate_part_sizes(size, 20, 16 * MiB) == [5 * MiB]
    assert candidate_part_sizes(0, 1, 16 * MiB) == []


def test_unknown_etag_shapes_do_not_match(blob):
    assert not etag_matches(blob, "abc-xyz", part_size=8 * MiB)
    assert not etag_matches(blob, "not-an-md5", part_size=8 * MiB)
