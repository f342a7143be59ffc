"""run_one_job on moto in-process: a fresh folder per job, nothing of one job in the
next, and env values masked in the log and the error text."""

import os

import pytest

from nipype_s3.agent import AgentConfig, onejob
from nipype_s3.agent.onejob import run_one_job

SECRET = "FS-LICENCE-8c1f2e77b0c94d21"


@pytest.fixture
def bucket(s3_inprocess):
    s3_inprocess.create_bucket(Bucket="data")
    for subject in ("sub-01", "sub-02"):
        s3_inprocess.put_object(Bucket="data", Key=f"{subject}/anat/{subject}_T1w.nii.gz",
                                Body=f"{subject} bytes".encode())
    return s3_inprocess


def _cfg():
    return AgentConfig(bucket="data", prefix="runs", run_id="r1", region="us-east-1",
                       jobs_queue_url="", events_queue_url="", job_key_parameter="")


def _spec(subject, command="cp {input} {output_dir}/", **extra):
    return {"job_id": "container", "runtime": "none", "image": None, "command": command,
            "input_s3": f"s3://data/{subject}/anat/{subject}_T1w.nii.gz",
            "output_s3": f"s3://data/out/{subject}/", "env": {}, "timeout": 60, **extra}


def _keys(s3, prefix):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix=prefix)
                  .get("Contents", []))


def test_the_second_job_sees_and_uploads_nothing_of_the_first(bucket, tmp_path):
    """An existing instance runs one subject after the other in the same folder."""
    workdir = str(tmp_path / ".onejob" / "container")
    first = run_one_job(_cfg(), _spec("sub-01"), workdir)
    assert first["status"] == "ok", first
    # the command lists what it finds: only its own input may be there
    second = run_one_job(_cfg(), _spec("sub-02", command=(
        "ls -R {input} .. > {output_dir}/seen.txt; cp {input} {output_dir}/")), workdir)
    assert second["status"] == "ok", second
    assert second["outputs"] == ["s3://data/out/sub-02/seen.txt",
                                 "s3://data/out/sub-02/sub-02_T1w.nii.gz"]
    assert _keys(bucket, "out/sub-02/") == ["out/sub-02/seen.txt",
                                            "out/sub-02/sub-02_T1w.nii.gz"]
    seen = bucket.get_object(Bucket="data", Key="out/sub-02/seen.txt")["Body"].read()
    assert b"sub-01" not in seen
    with open(second["log_path"], "rb") as fobj:
        assert b"sub-01" not in fobj.read()  # the log is this job's alone


def test_the_data_is_gone_when_the_job_returns(bucket, tmp_path):
    workdir = tmp_path / "job"
    (workdir / "output").mkdir(parents=True)
    (workdir / "output" / "left-by-an-earlier-job.nii.gz").write_bytes(b"old")
    report = run_one_job(_cfg(), _spec("sub-01"), str(workdir))
    assert report["outputs"] == ["s3://data/out/sub-01/sub-01_T1w.nii.gz"]
    assert os.listdir(workdir) == ["job.log"]  # only the log, for the caller to upload
    assert oct(os.stat(workdir).st_mode & 0o777) == "0o700"


def test_a_failed_job_leaves_no_data_either(bucket, tmp_path):
    workdir = tmp_path / "job"
    report = run_one_job(_cfg(), _spec("sub-01", command="cp {input} {output_dir}/; exit 4"),
                         str(workdir))
    assert report["exit_code"] == 4 and report["status"] == "error"
    assert os.listdir(workdir) == ["job.log"]


def test_the_folder_is_gone_once_the_agent_has_reported(bucket, tmp_path):
    """The agent uploads the log after run_one_job returns, then removes the folder."""
    import json

    import boto3

    from nipype_s3.agent import Agent
    from nipype_s3.ec2.jobs import RunLayout, job_key_parameter, sign, unseal

    key = b"o" * 32
    boto3.client("ssm", region_name="us-east-1").put_parameter(
        Name=job_key_parameter("r1"), Value=key.hex(), Type="SecureString")
    cfg = AgentConfig(bucket="data", prefix="runs", run_id="r1", region="us-east-1",
                      jobs_queue_url="", events_queue_url="",
                      job_key_parameter=job_key_parameter("r1"),
                      worker_root=str(tmp_path / "root"))
    layout = RunLayout("data", "runs", "r1")
    spec = json.dumps(_spec("sub-01")).encode()
    bucket.put_object(Bucket="data", Key=layout.spec_key("container"), Body=spec)
    bucket.put_object(Bucket="data", Key=layout.spec_key("container") + ".hmac",
                      Body=sign(key, spec).encode())
    cfg.extra["one_job"] = "container"
    assert Agent(cfg, instance_id="i-mine").run() == 0
    report = unseal(key, bucket.get_object(Bucket="data", Key=layout.done_key("container"))
                    ["Body"].read(), "report")
    assert report["status"] == "ok" and "uploading 1 files" in report["log_tail"]
    assert not (tmp_path / "root" / ".onejob" / "container").exists()
    assert _keys(bucket, "out/") == ["out/sub-01/sub-01_T1w.nii.gz"]


@pytest.mark.parametrize("key", ["in/../../../escaped.nii", "in//double.nii"])
def test_an_input_key_that_would_leave_the_folder_is_refused(bucket, tmp_path, key):
    bucket.put_object(Bucket="data", Key=key, Body=b"attacker's bytes")
    report = run_one_job(_cfg(), dict(_spec("sub-01"), input_s3="s3://data/in/"),
                         str(tmp_path / "a" / "b" / "job"))
    assert report["status"] == "error"
    assert "Refusing the S3 key" in report["error"]
    written = [f for d, _, fs in os.walk(tmp_path) for f in fs]
    assert "escaped.nii" not in written and "double.nii" not in written


def test_env_values_are_not_in_the_log(bucket, tmp_path):
    command = ('echo "licence: $FS_LICENSE_KEY"; printf "%s\\n" "$MULTI"; '
               "echo threads=$OMP_NUM_THREADS; cp {input} {output_dir}/")
    env = {"FS_LICENSE_KEY": SECRET, "MULTI": "line-one-secret\nline-two-secret",
           "OMP_NUM_THREADS": "4"}
    report = run_one_job(_cfg(), _spec("sub-01", command=command, env=env),
                         str(tmp_path / "job"))
    assert report["status"] == "ok", report
    with open(report["log_path"], "rb") as fobj:
        log = fobj.read().decode()
    assert "licence: ***" in log and "threads=4" in log
    for text in (SECRET, "line-one-secret", "line-two-secret"):
        assert text not in log
    assert "FS_LICENSE_KEY" in log  # the names are said, without the values


def test_env_values_are_not_in_the_error(bucket, tmp_path, monkeypatch):
    def boom(*args, **kwargs):  # a library that puts the environment in its message
        raise RuntimeError(f"upload failed with FS_LICENSE_KEY={SECRET}")

    monkeypatch.setattr(onejob, "upload_files", boom)
    report = run_one_job(_cfg(), _spec("sub-01", env={"FS_LICENSE_KEY": SECRET}),
                         str(tmp_path / "job"))
    assert report["status"] == "error"
    assert report["error"] == "RuntimeError: upload failed with FS_LICENSE_KEY=***"
    with open(report["log_path"], "rb") as fobj:
        assert SECRET.encode() not in fobj.read()


def test_masking_a_large_log_finds_values_across_chunks(tmp_path):
    path = tmp_path / "job.log"
    path.write_bytes(b"x" * 1000 + SECRET.encode() + b"y" * 1000 + SECRET.encode())
    for chunk in (7, 16, 1003, 1 << 20):
        onejob._mask_file(str(path), [SECRET.encode()], chunk=chunk)
        assert path.read_bytes() == b"x" * 1000 + b"***" + b"y" * 1000 + b"***"
