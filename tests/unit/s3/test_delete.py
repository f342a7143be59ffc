"""abort_incomplete_uploads: exact calls (Stubber), then behaviour on in-process moto."""

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber

from nipype_s3.exceptions import S3AccessDenied
from nipype_s3.s3.delete import abort_incomplete_uploads
from nipype_s3.s3.session import make_s3_client


def _client():
    return make_s3_client(boto3.Session(), endpoint_url="http://127.0.0.1:9")


def test_exact_calls_every_page_then_one_abort_per_upload():
    client = _client()
    with Stubber(client) as stub:
        stub.add_response("list_multipart_uploads", {
            "Uploads": [{"Key": "runs/r1/a.bin", "UploadId": "u1"}],
            "IsTruncated": True, "NextKeyMarker": "runs/r1/a.bin",
            "NextUploadIdMarker": "u1"}, {"Bucket": "bkt", "Prefix": "runs/r1/"})
        stub.add_response("list_multipart_uploads", {
            "Uploads": [{"Key": "runs/r1/b.bin", "UploadId": "u2"},
                        {"Key": "runs/r1/gone.bin", "UploadId": "u3"}],
            "IsTruncated": False}, {"Bucket": "bkt", "Prefix": "runs/r1/",
                                    "KeyMarker": "runs/r1/a.bin", "UploadIdMarker": "u1"})
        for key, upload_id in (("runs/r1/a.bin", "u1"), ("runs/r1/b.bin", "u2")):
            stub.add_response("abort_multipart_upload", {},
                              {"Bucket": "bkt", "Key": key, "UploadId": upload_id})
        # completed meanwhile: not an error, and not counted
        stub.add_client_error("abort_multipart_upload", "NoSuchUpload", http_status_code=404,
                              expected_params={"Bucket": "bkt", "Key": "runs/r1/gone.bin",
                                               "UploadId": "u3"})
        aborted = abort_incomplete_uploads(client, "bkt", "runs/r1/")
        stub.assert_no_pending_responses()
    assert aborted == ["runs/r1/a.bin", "runs/r1/b.bin"]


def test_refusal_is_converted_once_with_the_cause_kept():
    client = _client()
    with Stubber(client) as stub:
        stub.add_client_error("list_multipart_uploads", "AccessDenied", http_status_code=403)
        with pytest.raises(S3AccessDenied) as err:
            abort_incomplete_uploads(client, "bkt", "runs/r1/")
    assert "list the incomplete multipart uploads below s3://bkt/runs/r1/" in str(err.value)
    assert isinstance(err.value.__cause__, botocore.exceptions.ClientError)


def test_an_upload_left_behind_is_gone_and_others_stay(s3_inprocess):
    s3 = s3_inprocess
    s3.create_bucket(Bucket="bkt")
    left = s3.create_multipart_upload(Bucket="bkt", Key="runs/r1/jobs/j1/big.nii.gz")
    s3.upload_part(Bucket="bkt", Key="runs/r1/jobs/j1/big.nii.gz", PartNumber=1,
                   UploadId=left["UploadId"], Body=b"x" * 1024)
    s3.create_multipart_upload(Bucket="bkt", Key="runs/r2/other.nii.gz")
    assert abort_incomplete_uploads(s3, "bkt", "runs/r1/") == ["runs/r1/jobs/j1/big.nii.gz"]
    remaining = s3.list_multipart_uploads(Bucket="bkt").get("Uploads", [])
    assert [u["Key"] for u in remaining] == ["runs/r2/other.nii.gz"]
    assert abort_incomplete_uploads(s3, "bkt", "runs/r1/") == []
