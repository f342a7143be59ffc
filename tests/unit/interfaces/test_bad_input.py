"""Bad input a user can give S3DataSink / S3DataGrabber: each message, exactly."""

import pytest

from nipype_s3 import ConfigurationError, S3DataGrabber, S3DataSink

CASES = [
    ("s3:/mybucket/out", "Not an S3 URI: 's3:/mybucket/out' (it needs two slashes after 's3:'). "
                         "Expected the form s3://bucket/key/prefix."),
    ("s3a://mybucket/out", "Not an S3 URI: 's3a://mybucket/out' (use the plain 's3://' scheme)."
                           " Expected the form s3://bucket/key/prefix."),
    ("s3://My_Bucket/out", "Invalid S3 bucket name 'My_Bucket': it has upper-case letters "
                           "(bucket names are lower case). Check the bucket part of the s3:// "
                           "URI (s3://BUCKET/key/prefix)."),
    ("s3://ab/out", "Invalid S3 bucket name 'ab': it has 2 characters (3 to 63 are allowed). "
                    "Check the bucket part of the s3:// URI (s3://BUCKET/key/prefix)."),
    ("s3:///out", "S3 URI 's3:///out' names no bucket. Expected the form s3://bucket/key/prefix."),
]


@pytest.mark.parametrize("base, message", CASES)
def test_sink_base_directory(base, message, tmp_path, nifti_files):
    sink = S3DataSink(base_directory=base)
    sink.inputs.anat = nifti_files["anatomical.nii"]
    with pytest.raises(ConfigurationError) as err:
        sink.run(cwd=str(tmp_path))
    assert str(err.value) == message
    assert not (tmp_path / "s3:").exists()  # never a local folder named like the URI


def test_sink_unreadable_creds_path(tmp_path, nifti_files):
    sink = S3DataSink(base_directory="s3://mybucket/out",
                      creds_path=str(tmp_path / "nope.csv"))
    sink.inputs.anat = nifti_files["anatomical.nii"]
    with pytest.raises(ConfigurationError, match=r"Cannot use creds_path '.*nope.csv': the "
                                                 r"file does not exist\. It must be"):
        sink.run(cwd=str(tmp_path))


@pytest.mark.parametrize("bucket, message", [
    ("Bad_Bucket", "Invalid S3 bucket name 'Bad_Bucket'"),
])
def test_grabber_bucket(bucket, message, tmp_path):
    grab = S3DataGrabber()
    grab.inputs.bucket = bucket
    grab.inputs.template = "*"
    with pytest.raises(ConfigurationError, match=message):
        grab.run(cwd=str(tmp_path))


def test_grabber_bucket_uri_with_a_prefix(tmp_path):
    grab = S3DataGrabber()
    grab.inputs.bucket = "s3://mybucket/study/sub-01"
    grab.inputs.template = "*"
    with pytest.raises(ConfigurationError) as err:
        grab.run(cwd=str(tmp_path))
    assert str(err.value) == (
        "S3DataGrabber input 'bucket' is 's3://mybucket/study/sub-01', a bucket and a key "
        "prefix: give the bucket alone (bucket='mybucket') and the prefix as bucket_path "
        "(bucket_path='study/sub-01/').")


def test_grabber_infield_missing(tmp_path):
    grab = S3DataGrabber(infields=["subject_id"])
    grab.inputs.bucket = "mybucket"
    grab.inputs.template = "%s/*"
    with pytest.raises(ConfigurationError) as err:
        grab.run(cwd=str(tmp_path))
    assert str(err.value) == ("S3DataGrabber requires a value for input 'subject_id' because "
                              "it was listed in 'infields'.")


def test_grabber_template_args_mismatch(tmp_path):
    grab = S3DataGrabber(infields=["a", "b"])
    grab.inputs.bucket = "mybucket"
    grab.inputs.template = "%s/%s"
    grab.inputs.a = ["x", "y"]
    grab.inputs.b = ["z"]
    with pytest.raises(ConfigurationError, match=r"have different lengths \[1, 2\]"):
        grab.run(cwd=str(tmp_path))
