"""One run's AWS pieces for an agent under test (moto in-process): bucket, queues, key."""

import time

import boto3
import pytest

from nipype_s3.agent import AgentConfig
from nipype_s3.ec2.jobs import RunLayout, job_key_parameter, new_run_id, seal


@pytest.fixture
def make_run(s3_inprocess, tmp_path):
    """``make_run(key, lease=..., **config)`` -> ``(layout, cfg, sqs)``: a run's bucket,
    jobs and events queues, its key in SSM, an agent configuration, and (``lease``
    seconds ahead, if given) a signed lease."""
    def make(key: bytes, *, lease: float | None = None, **config):
        run_id = new_run_id()
        layout = RunLayout("runs-bucket", "p", run_id)
        s3_inprocess.create_bucket(Bucket="runs-bucket")
        sqs = boto3.client("sqs", region_name="us-east-1")
        jobs = sqs.create_queue(QueueName=layout.queue_name("jobs"))["QueueUrl"]
        events = sqs.create_queue(QueueName=layout.queue_name("events"))["QueueUrl"]
        boto3.client("ssm", region_name="us-east-1").put_parameter(
            Name=job_key_parameter(run_id), Value=key.hex(), Type="SecureString")
        settings = dict(idle_timeout=1, poll_wait=0, lease_check=0.2,
                        worker_root=str(tmp_path / "root"))
        settings.update(config)
        cfg = AgentConfig(bucket="runs-bucket", prefix="p", run_id=run_id, region="us-east-1",
                          jobs_queue_url=jobs, events_queue_url=events,
                          job_key_parameter=job_key_parameter(run_id), **settings)
        if lease is not None:
            s3_inprocess.put_object(Bucket=layout.bucket, Key=layout.lease_key, Body=seal(
                key, "lease", {"run_id": run_id, "expires": time.time() + lease}))
        return layout, cfg, sqs

    return make
