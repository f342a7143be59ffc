"""LocalCloud fails where AWS fails, where moto would not: an upload whose body does not
match the digest it carries is refused (moto stores it)."""

import base64
import hashlib

import boto3
import botocore.exceptions
import pytest

from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow


def test_an_upload_that_does_not_match_its_checksum_is_refused_as_on_s3():
    with LocalCloud() as cloud:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="my-bucket")
        data = b"the file as it was hashed"
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        s3.put_object(Bucket="my-bucket", Key="ok", Body=data, ChecksumSHA256=digest)
        with pytest.raises(botocore.exceptions.ClientError) as err:
            s3.put_object(Bucket="my-bucket", Key="changed", Body=data + b" and appended",
                          ChecksumSHA256=digest)
        assert err.value.response["Error"]["Code"] == "BadDigest"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"]]
        assert keys == ["ok"]
        direct = cloud.client("s3", direct=True)  # moto itself takes it: the gap closed
        direct.put_object(Bucket="my-bucket", Key="moto-takes-it", Body=b"x",
                          ChecksumSHA256=digest)
