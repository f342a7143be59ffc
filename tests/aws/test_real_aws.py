"""Against a real AWS account: run with ``--run-aws`` and ``NIPYPE_S3_TEST_BUCKET`` set.

These use your default credentials (not the fake ones the other tests use) and cost a
little money: a few S3 requests, and one small instance for about two minutes.
"""

import os
import uuid

import pytest

pytestmark = pytest.mark.aws


@pytest.fixture
def real_aws(monkeypatch):
    bucket = os.environ.get("NIPYPE_S3_TEST_BUCKET")
    if not bucket:
        pytest.fail("set NIPYPE_S3_TEST_BUCKET to a bucket you own to run the aws tests")
    # undo the fake credentials of tests/conftest.py: use the real default chain
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    return bucket


def test_sink_and_grabber_round_trip(real_aws, tmp_path, nifti_files):
    import boto3

    from nipype_s3 import S3DataGrabber, S3DataSink

    prefix = f"nipype-s3-tests/{uuid.uuid4().hex}"
    sink = S3DataSink(base_directory=f"s3://{real_aws}/{prefix}", container="sub-01")
    sink.inputs.anat = nifti_files["anatomical.nii"]
    sink.run(cwd=str(tmp_path))
    grab = S3DataGrabber()
    grab.inputs.bucket = real_aws
    grab.inputs.bucket_path = prefix + "/"
    grab.inputs.template = "sub-01/anat/*.nii"
    result = grab.run(cwd=str(tmp_path))
    assert open(result.outputs.outfiles, "rb").read() == \
        open(nifti_files["anatomical.nii"], "rb").read()
    s3 = boto3.client("s3")
    s3.delete_object(Bucket=real_aws, Key=f"{prefix}/sub-01/anat/anatomical.nii")


def test_ec2plugin_one_node(real_aws, tmp_path):
    import boto3
    from nipype import Function, Node, Workflow

    from nipype_s3 import EC2Plugin

    def add(x):
        return x + 1

    wf = Workflow("aws", base_dir=str(tmp_path))
    node = Node(Function(input_names=["x"], output_names=["y"], function=add), "add")
    node.inputs.x = 41
    wf.add_nodes([node])
    plugin = EC2Plugin(plugin_args={"s3_prefix": f"s3://{real_aws}/nipype-s3-tests/runs",
                                    "instance_type": "t3.small", "max_instances": 1,
                                    "idle_timeout": 60})
    result = wf.run(plugin=plugin)
    assert next(iter(result.nodes())).result.outputs.y == 42
    ec2 = boto3.client("ec2")
    live = ec2.describe_instances(Filters=[
        {"Name": "tag:nipype-s3:run", "Values": [plugin.run_id]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    assert all(not r["Instances"] for r in live["Reservations"])
