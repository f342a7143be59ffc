"""ClientError → our exceptions, once, with messages that name the value and the fix."""

import boto3
import botocore.exceptions
import pytest
from botocore.stub import Stubber

from nipype_s3.exceptions import (
    CredentialsError,
    S3AccessDenied,
    S3BucketNotFound,
    S3Error,
    S3ObjectNotFound,
    S3WrongRegion,
)
from nipype_s3.s3.errors import s3_errors, translate
from nipype_s3.s3.listing import list_objects


def _client():
    return boto3.client("s3", region_name="us-east-1")


def _raise_from_stub(code, status, headers=None, key=None):
    client = _client()
    with Stubber(client) as stub:
        stub.add_client_error("list_objects_v2", service_error_code=code,
                              service_message="server says no", http_status_code=status,
                              response_meta={"HTTPHeaders": headers or {}})
        with pytest.raises(S3Error) as err:
            list_objects(client, "mybucket", key or "")
    assert isinstance(err.value.__cause__, botocore.exceptions.ClientError)
    return err.value


def test_no_such_bucket():
    err = _raise_from_stub("NoSuchBucket", 404)
    assert isinstance(err, S3BucketNotFound) and isinstance(err, FileNotFoundError)
    assert str(err) == ("Bucket 'mybucket' does not exist (while trying to list s3://mybucket). "
                        "Check the bucket name, the endpoint, and the account you use.")
    assert err.bucket == "mybucket" and err.code == "NoSuchBucket"


def test_access_denied():
    err = _raise_from_stub("AccessDenied", 403, key="data/")
    assert isinstance(err, S3AccessDenied) and isinstance(err, PermissionError)
    assert str(err) == ("Access denied to list s3://mybucket/data/ (AccessDenied). Check the IAM "
                        "or bucket policy for this operation; for a public bucket use anon=True.")


def test_invalid_access_key_id():
    err = _raise_from_stub("InvalidAccessKeyId", 403)
    assert isinstance(err, S3AccessDenied)
    assert "access key id in use is not known" in str(err)
    assert "creds_path, profile or AWS_ACCESS_KEY_ID" in str(err)


def test_signature_does_not_match():
    err = _raise_from_stub("SignatureDoesNotMatch", 403)
    assert isinstance(err, S3AccessDenied)
    assert "secret key does not match" in str(err)


def test_expired_token():
    err = _raise_from_stub("ExpiredToken", 400)
    assert isinstance(err, S3AccessDenied)
    assert "session token has expired" in str(err) and "Refresh" in str(err)


def test_wrong_region_names_bucket_and_region():
    err = _raise_from_stub("PermanentRedirect", 301,
                           headers={"x-amz-bucket-region": "eu-west-1"})
    assert isinstance(err, S3WrongRegion) and err.region == "eu-west-1"
    assert str(err) == (
        "Bucket 'mybucket' is in another region than the request was sent to (while trying to "
        "list s3://mybucket): it is in 'eu-west-1'; pass region='eu-west-1' or leave region "
        "unset so it is found from the bucket.")


def test_no_such_key():
    err = translate(botocore.exceptions.ClientError(
        {"Error": {"Code": "NoSuchKey", "Message": "x"}}, "GetObject"),
        bucket="b1b", key="a/b.nii", action="download")
    assert isinstance(err, S3ObjectNotFound)
    assert str(err) == "s3://b1b/a/b.nii does not exist (while trying to download it)."


def test_other_codes_keep_the_server_message():
    err = _raise_from_stub("SlowDown", 503)
    assert type(err) is S3Error and "SlowDown: server says no" in str(err)


def test_no_credentials():
    err = translate(botocore.exceptions.NoCredentialsError(), bucket="bkt", action="upload to")
    assert isinstance(err, CredentialsError)
    assert "No AWS credentials found to upload to s3://bkt" in str(err)
    assert "anon=True" in str(err)


def test_connection_error_names_endpoint():
    exc = botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    with pytest.raises(S3Error) as err:
        with s3_errors(bucket="bkt", action="list", endpoint="http://127.0.0.1:1"):
            raise exc
    assert "Could not connect to the S3 endpoint at http://127.0.0.1:1" in str(err.value)
    assert err.value.__cause__ is exc
