import pytest

from nipype_s3.exceptions import ConfigurationError
from nipype_s3.s3.uri import S3URI, is_s3_uri, join_key, parse_s3_uri, validate_bucket_name


@pytest.mark.parametrize("uri, bucket, key", [
    ("s3://mybucket/path/to/output/dir", "mybucket", "path/to/output/dir"),
    ("S3://mybucket/path/", "mybucket", "path/"),
    ("s3://mybucket", "mybucket", ""),
    ("s3://mybucket/", "mybucket", ""),
    ("s3://my.bucket-1/a b/ü.nii.gz", "my.bucket-1", "a b/ü.nii.gz"),
])
def test_parse(uri, bucket, key):
    assert parse_s3_uri(uri) == S3URI(bucket, key)


@pytest.mark.parametrize("uri, message", [
    ("mybucket/path", "Not an S3 URI: 'mybucket/path'. Expected the form s3://bucket/key/prefix."),
    ("s3:/mybucket/path", "Not an S3 URI: 's3:/mybucket/path' (it needs two slashes after "
     "'s3:'). Expected the form s3://bucket/key/prefix."),
    ("s3a://mybucket/x", "Not an S3 URI: 's3a://mybucket/x' (use the plain 's3://' scheme). "
     "Expected the form s3://bucket/key/prefix."),
    ("s3:///key", "S3 URI 's3:///key' names no bucket. Expected the form s3://bucket/key/prefix."),
    ("s3://My_Bucket/x", "Invalid S3 bucket name 'My_Bucket': it has upper-case letters (bucket "
     "names are lower case). Check the bucket part of the s3:// URI (s3://BUCKET/key/prefix)."),
])
def test_parse_errors_say_what_and_how(uri, message):
    with pytest.raises(ConfigurationError) as err:
        parse_s3_uri(uri)
    assert str(err.value) == message


def test_http_url_hint_mentions_endpoint_url():
    with pytest.raises(ConfigurationError, match="endpoint_url"):
        parse_s3_uri("http://127.0.0.1:9000/bucket/key")


def test_require_key():
    with pytest.raises(ConfigurationError, match="names a bucket but no object key"):
        parse_s3_uri("s3://mybucket/", require_key=True)
    assert parse_s3_uri("s3://mybucket/k", require_key=True).key == "k"


def test_key_too_long():
    with pytest.raises(ConfigurationError, match="S3 allows at most 1024"):
        parse_s3_uri("s3://mybucket/" + "a" * 1025)


@pytest.mark.parametrize("name, why", [
    ("ab", "it has 2 characters (3 to 63 are allowed)"),
    ("a" * 64, "it has 64 characters (3 to 63 are allowed)"),
    ("-abc", "must start and end with a letter or digit"),
    ("abc-", "must start and end with a letter or digit"),
    ("a_bc", "may contain only lower-case letters"),
    ("a..bc", "it has '..', '.-' or '-.'"),
    ("192.168.5.4", "it is shaped like an IP address"),
    ("xn--abc", "a prefix or suffix that AWS reserves"),
    ("abc-s3alias", "a prefix or suffix that AWS reserves"),
])
def test_invalid_bucket_names(name, why):
    with pytest.raises(ConfigurationError) as err:
        validate_bucket_name(name)
    assert why in str(err.value)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("name", ["abc", "my.bucket", "a-b.c-1", "a" * 63, "123"])
def test_valid_bucket_names(name):
    assert validate_bucket_name(name) == name


def test_is_s3_uri():
    assert is_s3_uri("s3://b/k") and is_s3_uri("S3://b")
    assert not is_s3_uri("/data/s3://x") and not is_s3_uri(None) and not is_s3_uri(3)


@pytest.mark.parametrize("parts, joined", [
    (("a", "b", "c.nii"), "a/b/c.nii"),
    (("a/", "/b/", "c"), "a/b/c"),
    (("", "b"), "b"),
    (("a", ""), "a"),
    (("a/", "b/"), "a/b/"),
    ((), ""),
])
def test_join_key(parts, joined):
    assert join_key(*parts) == joined


def test_uri_join_and_str():
    uri = parse_s3_uri("s3://bkt/base")
    assert str(uri.join("sub", "f.nii")) == "s3://bkt/base/sub/f.nii"
    assert str(S3URI("bkt")) == "s3://bkt"
    assert uri.prefix == "base/" and S3URI("bkt").prefix == ""
