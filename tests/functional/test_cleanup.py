"""``nipype-s3 cleanup`` on a moto server: everything a run made goes, nothing else does;
``--all`` finds runs whose instances are gone; ``--dry-run`` lists and deletes nothing."""

import boto3
import pytest

from nipype_s3.cli import main
from nipype_s3.ec2.jobs import RUN_TAG, data_credentials_parameter, job_key_parameter

pytestmark = pytest.mark.moto_server

RUN = "20261201-101500-abc123"
OTHER = "20261202-090000-def456"
BUCKET = "my-bucket"
S3_PREFIX = f"s3://{BUCKET}/nipype-runs"


def _clients():
    return {name: boto3.client(name, region_name="us-east-1")
            for name in ("ec2", "sqs", "ssm", "s3")}


def _queues(sqs):
    return sorted(u.rsplit("/", 1)[-1] for u in sqs.list_queues().get("QueueUrls", []))


def _parameters(ssm):
    pages = ssm.get_paginator("describe_parameters").paginate()
    return sorted(p["Name"] for page in pages for p in page["Parameters"]
                  if p["Name"].startswith("/nipype-s3/"))


def _uploads(s3):
    return sorted(u["Key"] for u in s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def _objects(s3):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def _live(ec2):
    resp = ec2.describe_instances(Filters=[{"Name": "instance-state-name",
                                            "Values": ["pending", "running", "stopped"]}])
    return sorted(i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"])


def _leave_a_run(c, run_id, *, instance=True, queues=("jobs", "events", "jobs-c6i-large"),
                 parameters=True, files=True):
    """What a run whose controller died leaves behind."""
    made = {}
    if instance:
        made["instance"] = c["ec2"].run_instances(
            ImageId="ami-0ed094fb1304fd857", MinCount=1, MaxCount=1, InstanceType="t3.micro",
            TagSpecifications=[{"ResourceType": "instance", "Tags": [
                {"Key": RUN_TAG, "Value": run_id}]}])["Instances"][0]["InstanceId"]
    for kind in queues:
        c["sqs"].create_queue(QueueName=f"nipype-s3-{run_id}-{kind}")
    if parameters:
        for name in (job_key_parameter(run_id), data_credentials_parameter(run_id)):
            c["ssm"].put_parameter(Name=name, Value="not-shown", Type="SecureString")
    if files:
        key = f"nipype-runs/runs/{run_id}/jobs/j1/outputs.tar"
        c["s3"].put_object(Bucket=BUCKET, Key=f"nipype-runs/runs/{run_id}/jobs/j1/spec.json",
                           Body=b"{}")
        upload = c["s3"].create_multipart_upload(Bucket=BUCKET, Key=key)
        c["s3"].upload_part(Bucket=BUCKET, Key=key, PartNumber=1, Body=b"x" * 1024,
                            UploadId=upload["UploadId"])
    return made


@pytest.fixture
def aws(moto_server):
    c = _clients()
    c["s3"].create_bucket(Bucket=BUCKET)
    return c


def test_a_run_leaves_nothing_and_other_runs_keep_theirs(aws, capsys):
    made = _leave_a_run(aws, RUN)
    kept = _leave_a_run(aws, OTHER)
    before = (_queues(aws["sqs"]), _parameters(aws["ssm"]), _uploads(aws["s3"]),
              _objects(aws["s3"]), _live(aws["ec2"]))

    assert main(["cleanup", "--run", RUN, "--s3-prefix", S3_PREFIX, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would terminate 1 instance(s): {made['instance']}" in out
    assert "would delete 3 SQS queue(s)" in out
    for kind in ("jobs", "events", "jobs-c6i-large"):
        assert f"/nipype-s3-{RUN}-{kind}\n" in out
    assert "would delete 2 SSM parameter(s)" in out
    assert f"  {data_credentials_parameter(RUN)}\n" in out
    assert f"  {job_key_parameter(RUN)}\n" in out
    assert "would abort 1 incomplete multipart upload(s)" in out
    assert f"  s3://{BUCKET}/nipype-runs/runs/{RUN}/jobs/j1/outputs.tar\n" in out
    assert f"  s3://{BUCKET}/nipype-runs/runs/{RUN}/jobs/j1/spec.json\n" in out
    assert "not-shown" not in out
    assert (_queues(aws["sqs"]), _parameters(aws["ssm"]), _uploads(aws["s3"]),
            _objects(aws["s3"]), _live(aws["ec2"])) == before  # nothing deleted

    assert main(["cleanup", "--run", RUN, "--s3-prefix", S3_PREFIX]) == 0
    out = capsys.readouterr().out
    assert "terminated 1 instance(s)" in out and "aborted 1 incomplete multipart" in out
    assert _queues(aws["sqs"]) == [f"nipype-s3-{OTHER}-events", f"nipype-s3-{OTHER}-jobs",
                                   f"nipype-s3-{OTHER}-jobs-c6i-large"]
    assert _parameters(aws["ssm"]) == [data_credentials_parameter(OTHER),
                                       job_key_parameter(OTHER)]
    assert _uploads(aws["s3"]) == [f"nipype-runs/runs/{OTHER}/jobs/j1/outputs.tar"]
    assert _objects(aws["s3"]) == [f"nipype-runs/runs/{OTHER}/jobs/j1/spec.json"]
    assert _live(aws["ec2"]) == [kept["instance"]]


def test_all_finds_runs_whose_instances_are_gone(aws, capsys):
    only_queue = "20261203-000000-aaaaaa"
    only_parameter = "container-20261204-000000-bbbbbb"  # EC2ContainerRun's data credentials
    only_files = "20261205-000000-cccccc"
    _leave_a_run(aws, only_queue, instance=False, queues=("jobs-g4dn-xlarge",),
                 parameters=False, files=False)
    _leave_a_run(aws, only_parameter, instance=False, queues=(), files=False)
    aws["ssm"].delete_parameter(Name=job_key_parameter(only_parameter))
    _leave_a_run(aws, only_files, instance=False, queues=(), parameters=False)
    aws["s3"].delete_object(Bucket=BUCKET,
                            Key=f"nipype-runs/runs/{only_files}/jobs/j1/spec.json")
    aws["ec2"].run_instances(ImageId="ami-0ed094fb1304fd857", MinCount=1, MaxCount=1,
                             InstanceType="t3.micro")  # not ours: no run tag

    assert main(["cleanup", "--all", "--s3-prefix", S3_PREFIX, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (f"3 run(s) found: {only_queue}, {only_files}, {only_parameter}\n") in out
    assert "would terminate 0 instance(s)" in out

    assert main(["cleanup", "--all", "--s3-prefix", S3_PREFIX]) == 0
    assert _queues(aws["sqs"]) == []
    assert _parameters(aws["ssm"]) == []
    assert _uploads(aws["s3"]) == []
    assert len(_live(aws["ec2"])) == 1  # the instance that is not nipype-s3's

    assert main(["cleanup", "--all"]) == 0
    assert capsys.readouterr().out.endswith("0 run(s) found\nterminated 0 instance(s)\n")


def test_a_run_id_that_is_not_one_is_refused_before_any_request(aws, capsys):
    assert main(["cleanup", "--run", "../other"]) == 1
    assert capsys.readouterr().err.startswith(
        "nipype-s3 cleanup: error: cleanup: '../other' is not a run id")
