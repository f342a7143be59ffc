"""upload_files: exact calls (Stubber), then behaviour on in-process moto."""

import os

import boto3
import pytest
from botocore.stub import ANY, Stubber

from nipype_s3.config import METADATA_MD5_KEY, MiB
from nipype_s3.exceptions import (
    ConfigurationError,
    InputFileNotFound,
    S3BucketNotFound,
    TransferFailed,
)
from nipype_s3.s3.hashing import file_md5
from nipype_s3.s3.session import make_s3_client
from nipype_s3.s3.transfer import TransferSettings
from nipype_s3.s3.upload import UploadItem, sse_args, upload_files


def _file(tmp_path, name, data):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_exact_calls_one_list_then_put_with_sse(tmp_path):
    client = make_s3_client(boto3.Session(), endpoint_url="http://127.0.0.1:9")
    same = _file(tmp_path, "same.txt", b"unchanged")
    new = _file(tmp_path, "new.txt", b"brand new")
    with Stubber(client) as stub:
        stub.add_response("list_objects_v2", {"Contents": [
            {"Key": "out/same.txt", "Size": 9, "ETag": f'"{file_md5(same)}"'}],
            "KeyCount": 1, "IsTruncated": False},
            {"Bucket": "bkt", "Prefix": "out/"})
        stub.add_response("put_object", {"ETag": '"x"'}, {
            "Bucket": "bkt", "Key": "out/new.txt", "Body": ANY,
            "ServerSideEncryption": "AES256"})
        summary = upload_files(client, "bkt", [UploadItem(same, "out/same.txt"),
                                               UploadItem(new, "out/new.txt")], sse="AES256",
                               settings=TransferSettings(max_concurrency=1))
        stub.assert_no_pending_responses()
    assert (summary.files, summary.skipped, summary.bytes) == (1, 1, 9)
    assert summary.done == ["out/new.txt"]
    assert "Uploaded 1 file (9 B)" in summary.line() and "1 unchanged skipped" in summary.line()


def test_missing_source_sends_nothing(tmp_path):
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:  # no responses: any request would fail the test
        with pytest.raises(InputFileNotFound) as err:
            upload_files(client, "bkt", [UploadItem(str(tmp_path / "nope.nii"), "k")])
        stub.assert_no_pending_responses()
    assert str(err.value) == (f"Cannot upload {str(tmp_path / 'nope.nii')!r} to key 'k': the "
                              "file does not exist. Check the path connected to this input.")


def test_directory_source_refused(tmp_path):
    with pytest.raises(InputFileNotFound, match="it is not a regular file"):
        upload_files(boto3.client("s3", region_name="us-east-1"), "bkt",
                     [UploadItem(str(tmp_path), "k")])


def test_sse_args():
    assert sse_args() == {}
    assert sse_args("AES256") == {"ServerSideEncryption": "AES256"}
    assert sse_args(kms_key_id="alias/lab") == {"ServerSideEncryption": "aws:kms",
                                                "SSEKMSKeyId": "alias/lab"}
    with pytest.raises(ConfigurationError, match="Unknown server-side encryption 'DES'"):
        sse_args("DES")
    with pytest.raises(ConfigurationError, match="a KMS key needs 'aws:kms'"):
        sse_args("AES256", "alias/lab")


# -- on moto (in process) --------------------------------------------------------------
def test_round_trip_and_rerun_skips(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    items = [UploadItem(_file(tmp_path, f"d/f{i}.bin", os.urandom(1000 + i)), f"p/f{i}.bin")
             for i in range(20)]
    first = upload_files(s3_inprocess, "bkt", items)
    assert first.files == 20 and first.skipped == 0
    keys = {o["Key"] for o in s3_inprocess.list_objects_v2(Bucket="bkt")["Contents"]}
    assert keys == {i.key for i in items}
    body = s3_inprocess.get_object(Bucket="bkt", Key="p/f3.bin")["Body"].read()
    assert body == open(items[3].source, "rb").read()
    second = upload_files(s3_inprocess, "bkt", items)
    assert second.files == 0 and second.skipped == 20
    with open(items[5].source, "ab") as fobj:
        fobj.write(b"changed")
    third = upload_files(s3_inprocess, "bkt", items)
    assert third.files == 1 and third.done == ["p/f5.bin"]


def test_multipart_rerun_skips(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    big = _file(tmp_path, "big.bin", os.urandom(12 * MiB))
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    assert upload_files(s3_inprocess, "bkt", [UploadItem(big, "big.bin")],
                        settings=settings).files == 1
    assert s3_inprocess.head_object(Bucket="bkt", Key="big.bin")["ETag"].endswith('-3"')
    again = upload_files(s3_inprocess, "bkt", [UploadItem(big, "big.bin")], settings=settings)
    assert again.files == 0 and again.skipped == 1


def test_kms_stores_md5_and_rerun_skips(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="bkt")
    kms = boto3.client("kms", region_name="us-east-1")
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    path = _file(tmp_path, "sec.nii", b"secret-ish data")
    upload_files(s3_inprocess, "bkt", [UploadItem(path, "sec.nii")], kms_key_id=key_id)
    head = s3_inprocess.head_object(Bucket="bkt", Key="sec.nii")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["Metadata"][METADATA_MD5_KEY] == file_md5(path)
    again = upload_files(s3_inprocess, "bkt", [UploadItem(path, "sec.nii")], kms_key_id=key_id)
    assert again.skipped == 1


def test_missing_bucket_is_clear(s3_inprocess, tmp_path):
    path = _file(tmp_path, "a.txt", b"a")
    with pytest.raises(S3BucketNotFound, match="Bucket 'no-such-bucket' does not exist"):
        upload_files(s3_inprocess, "no-such-bucket", [UploadItem(path, "a.txt")])


def test_failures_are_collected(s3_inprocess, tmp_path):
    path = _file(tmp_path, "a.txt", b"a")
    with pytest.raises((TransferFailed, S3BucketNotFound)):
        upload_files(s3_inprocess, "no-such-bucket", [UploadItem(path, "a.txt")],
                     skip_unchanged=False)
