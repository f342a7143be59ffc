"""LocalCloud plays AWS Batch: submitted jobs run for real, as containers of this
machine's Docker engine, and report Batch's states, exit codes and reasons; AWS's limits
hold (moto holds none), and spot reclaims and throttling can be injected."""

from __future__ import annotations

import time

import boto3
import botocore.config
import botocore.exceptions
import pytest

from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud(docker_images):
    with LocalCloud() as cloud:
        yield cloud


def _batch():
    # no retries: each throttled call is seen
    return boto3.client("batch", config=botocore.config.Config(retries={"total_max_attempts": 1,
                                                                        "mode": "standard"}))


def _definition(batch, image, command, name="probe"):
    return batch.register_job_definition(
        jobDefinitionName=f"nipype-s3-{name}", type="container",
        containerProperties={"image": image, "command": command, "resourceRequirements": [
            {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"}]},
    )["jobDefinitionArn"]


def _wait(batch, ids, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = batch.describe_jobs(jobs=ids)["jobs"]
        if jobs and all(j["status"] in ("SUCCEEDED", "FAILED") for j in jobs):
            return {j["jobId"]: j for j in jobs}
        time.sleep(0.3)
    raise TimeoutError(ids)


@pytest.mark.docker
def test_a_job_runs_its_image_and_command_with_batchs_variables(cloud, docker_images):
    batch = _batch()
    definition = _definition(batch, docker_images["test"], ["true"])
    script = ("import os, sys; print('job', os.environ['AWS_BATCH_JOB_ID'], 'attempt', "
              "os.environ['AWS_BATCH_JOB_ATTEMPT'], 'greeting', os.environ['GREETING']); "
              "sys.exit(int(os.environ['EXIT']))")
    ids = {}
    for code in (0, 3):
        ids[code] = batch.submit_job(
            jobName=f"exit-{code}", jobQueue=cloud.batch.QUEUE, jobDefinition=definition,
            containerOverrides={"command": ["python3", "-c", script], "environment": [
                {"name": "GREETING", "value": "hello"}, {"name": "EXIT", "value": str(code)},
                # the container's, not this machine's docker client's
                {"name": "DOCKER_HOST", "value": "tcp://127.0.0.1:9"}]},
        )["jobId"]
    jobs = _wait(batch, list(ids.values()))
    ok, failed = jobs[ids[0]], jobs[ids[3]]
    assert ok["status"] == "SUCCEEDED" and ok["container"]["exitCode"] == 0
    assert ok["startedAt"] <= ok["stoppedAt"]
    assert failed["status"] == "FAILED" and failed["container"]["exitCode"] == 3
    assert failed["statusReason"] == "Essential container in task exited"
    log = cloud.batch._log(ids[0])
    assert f"job {ids[0]} attempt 1 greeting hello" in log


@pytest.mark.docker
def test_an_array_job_runs_each_index(cloud, docker_images):
    batch = _batch()
    definition = _definition(batch, docker_images["test"], [
        "python3", "-c", "import os; print('index', os.environ['AWS_BATCH_JOB_ARRAY_INDEX'])"])
    parent = batch.submit_job(jobName="array", jobQueue=cloud.batch.QUEUE,
                              jobDefinition=definition, arrayProperties={"size": 3})["jobId"]
    kids = [f"{parent}:{i}" for i in range(3)]
    _wait(batch, kids)
    assert [cloud.batch._log(k).strip() for k in kids] == ["index 0", "index 1", "index 2"]
    (summary,) = batch.describe_jobs(jobs=[parent])["jobs"]
    assert summary["status"] == "SUCCEEDED"
    assert summary["arrayProperties"] == {"size": 3, "statusSummary": {"SUCCEEDED": 3}}
    deadline = time.time() + 10  # LocalCloud's own record follows
    while cloud.batch.jobs[parent]["status"] != "SUCCEEDED" and time.time() < deadline:
        time.sleep(0.2)
    assert cloud.batch.jobs[parent]["status"] == "SUCCEEDED"


@pytest.mark.docker
def test_deleting_a_queue_ends_its_jobs(cloud, docker_images):
    batch = _batch()
    sleeper = _definition(batch, docker_images["test"], ["sleep", "300"], "sleeper")
    job = batch.submit_job(jobName="long", jobQueue=cloud.batch.QUEUE,
                           jobDefinition=sleeper)["jobId"]
    deadline = time.time() + 60
    while cloud.batch.jobs[job]["status"] != "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    batch.update_job_queue(jobQueue=cloud.batch.QUEUE, state="DISABLED")
    batch.delete_job_queue(jobQueue=cloud.batch.QUEUE)
    (done,) = _wait(batch, [job]).values()
    assert done["status"] == "FAILED"
    assert done["statusReason"] == f"Job queue {cloud.batch.QUEUE} was deleted"


@pytest.mark.docker
def test_terminate_reclaim_and_a_missing_image(cloud, docker_images):
    batch = _batch()
    sleeper = _definition(batch, docker_images["test"], ["sleep", "300"], "sleeper")
    one, two = (batch.submit_job(jobName=n, jobQueue=cloud.batch.QUEUE,
                                 jobDefinition=sleeper)["jobId"] for n in ("one", "two"))
    reclaimed = cloud.batch.reclaim(one)
    assert reclaimed == one
    batch.terminate_job(jobId=two, reason="run r1 ended (nipype-s3)")
    missing = _definition(batch, "nipype-s3-test/not-here:1", ["true"], "missing")
    three = batch.submit_job(jobName="three", jobQueue=cloud.batch.QUEUE,
                             jobDefinition=missing)["jobId"]
    jobs = _wait(batch, [one, two, three])
    assert jobs[one]["status"] == "FAILED" and "exitCode" not in jobs[one]["container"]
    assert jobs[one]["statusReason"].startswith("Host EC2 (instance i-")
    assert jobs[one]["statusReason"].endswith(") terminated.")
    assert jobs[two]["statusReason"] == "run r1 ended (nipype-s3)"
    assert jobs[three]["statusReason"].startswith("CannotPullContainerError")


@pytest.mark.docker
def test_aws_limits_and_throttling(cloud, docker_images):
    batch = _batch()
    definition = _definition(batch, docker_images["test"], ["true"])

    def refused(**kwargs):
        with pytest.raises(botocore.exceptions.ClientError) as err:
            batch.submit_job(jobName="x", jobQueue=cloud.batch.QUEUE,
                             jobDefinition=definition, **kwargs)
        return err.value.response["Error"]

    big = [{"name": f"V{i}", "value": "x" * 100} for i in range(90)]
    assert "at most 8192" in refused(containerOverrides={"environment": big})["Message"]
    assert "2 to 10000" in refused(arrayProperties={"size": 10001})["Message"]
    with pytest.raises(botocore.exceptions.ClientError, match="at most 100"):
        batch.describe_jobs(jobs=[f"id-{i}" for i in range(101)])
    cloud.batch.throttle("SubmitJob", times=2)
    for _ in range(2):
        assert refused()["Code"] == "TooManyRequestsException"
    job = batch.submit_job(jobName="x", jobQueue=cloud.batch.QUEUE,
                           jobDefinition=definition)["jobId"]
    assert _wait(batch, [job])[job]["status"] == "SUCCEEDED"


def test_docker_asked_for_and_no_engine_a_job_fails_saying_so(monkeypatch):
    import nipype_s3.testing.batch as local_batch

    monkeypatch.setattr(local_batch.shutil, "which", lambda name: None)
    with LocalCloud(boot="direct", batch_engine="docker") as cloud:
        batch = _batch()
        definition = _definition(batch, "nipype-s3-test/nipype:local", ["true"])
        job = batch.submit_job(jobName="x", jobQueue=cloud.batch.QUEUE,
                               jobDefinition=definition)["jobId"]
        (done,) = _wait(batch, [job]).values()
    assert done["status"] == "FAILED"
    assert done["statusReason"] == (
        "CannotPullContainerError: LocalCloud cannot run nipype-s3-test/nipype:local: no "
        "Docker engine answers 'docker info'")


def _sandbox_or_skip():
    from nipype_s3.testing.sandbox import sandbox_available

    why = sandbox_available()
    if why:
        pytest.skip(f"LocalCloud's Batch without Docker runs jobs in the sandbox: {why}")


def _square(x):
    return x * x


def test_without_docker_a_job_is_a_sandboxed_process_and_batchplugin_runs_on_it(tmp_path):
    """No engine: the same command in the instances' sandbox, its python3 the
    controller's environment (as the EC2 bootstrap builds it); Batch's states, exit
    codes and variables as with Docker; an unpullable image fails as Batch says."""
    _sandbox_or_skip()
    from nipype import Function, Node, Workflow
    from nipype.interfaces.utility import IdentityInterface

    from nipype_s3 import BatchPlugin

    secret = tmp_path / "controller-only.txt"
    secret.write_text("not on the instance")
    probe = ("import os, sys; print('job', os.environ['AWS_BATCH_JOB_ID'], 'attempt', "
             f"os.environ['AWS_BATCH_JOB_ATTEMPT'], os.path.exists({str(secret)!r})); "
             "sys.exit(int(os.environ['EXIT']))")

    def build(base):
        wf = Workflow("sandboxed", base_dir=str(base))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        src = Node(IdentityInterface(fields=["x"]), name="src")
        src.iterables = ("x", [2, 3])
        square = Node(Function(input_names=["x"], output_names=["y"], function=_square),
                      name="square")
        wf.connect(src, "x", square, "x")
        return wf

    with LocalCloud(batch_engine="sandbox") as cloud:
        batch = _batch()
        definition = _definition(batch, "any/image:1", ["python3", "-c", probe])
        ids = {code: batch.submit_job(
            jobName=f"exit{code}", jobQueue=cloud.batch.QUEUE, jobDefinition=definition,
            containerOverrides={"environment": [{"name": "EXIT", "value": str(code)}]})[
            "jobId"] for code in (0, 3)}
        cloud.batch.unpullable.add("any/missing:1")
        missing = batch.submit_job(jobName="missing", jobQueue=cloud.batch.QUEUE,
                                   jobDefinition=_definition(batch, "any/missing:1",
                                                             ["true"], "missing"))["jobId"]
        jobs = _wait(batch, [*ids.values(), missing])
        logs = {code: cloud.batch._log(job) for code, job in ids.items()}
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        plugin = BatchPlugin(plugin_args={
            "s3_prefix": "s3://batch-runs/runs", "job_queue": cloud.batch.QUEUE,
            "image": "any/image:1", "idle_timeout": 5, "max_agents": 1})
        result = build(tmp_path / "batch").run(plugin=plugin)
        assert all(j["status"] in ("SUCCEEDED", "FAILED") for j in cloud.batch.jobs.values())
    assert jobs[ids[0]]["status"] == "SUCCEEDED" and jobs[ids[0]]["container"]["exitCode"] == 0
    assert jobs[ids[3]]["status"] == "FAILED" and jobs[ids[3]]["container"]["exitCode"] == 3
    assert f"job {ids[0]} attempt 1 False" in logs[0]  # the controller's file: out of reach
    assert jobs[missing]["statusReason"].startswith("CannotPullContainerError")
    squares = sorted(n.result.outputs.y for n in result.nodes() if n.name == "square")
    assert squares == [4, 9] and plugin.stats["remote_done"] == 2
