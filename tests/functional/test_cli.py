"""The command line: --version, help, the demo end to end, errors as one line."""

import subprocess
import sys

import pytest

import nipype_s3
from nipype_s3.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"nipype-s3 {nipype_s3.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("plugin", ["EC2", "Linear",
                                    pytest.param("Batch", marks=pytest.mark.docker)])
def test_demo_runs_end_to_end_and_leaves_no_process(tmp_path, plugin, request):
    which = ["--plugin", plugin]
    if plugin == "Batch":
        request.getfixturevalue("docker_images")  # skips, saying why, without an engine
        which = ["--backend", "batch"]
    proc = subprocess.run([sys.executable, "-m", "nipype_s3.cli", "demo", "--keep",
                           str(tmp_path / "keep"), *which], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "s3://nipype-s3-demo/" in out
    for name in ("sub-01_task-rest_bold_mean.nii.gz", "sub-02_task-rest_bold_tsnr.nii.gz",
                 "sub-02_task-rest_bold_mask.nii.gz"):
        assert name in out
    assert "no instance left running" in out
    if plugin == "EC2":
        assert "jobs on instances" in out and "cost report: s3://" in out
    if plugin == "Batch":
        assert "jobs on Batch" in out and "no Batch job left running" in out
        assert "removed the job queue, compute environment and roles" in out
    kept = sorted(p.name for p in (tmp_path / "keep").rglob("*.nii.gz"))
    assert len(kept) == 6
    import nibabel as nib

    mean = nib.load(next((tmp_path / "keep").rglob("sub-02_task-rest_bold_mean.nii.gz")))
    assert mean.shape == (128, 96, 24)
    import re
    import socket

    port = int(re.search(r"embedded S3 server at http://127.0.0.1:(\d+)", out).group(1))
    with pytest.raises(OSError):  # the server is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    leftover = subprocess.run(["pgrep", "-f", f"moto.server .*-p {port}"],
                              capture_output=True, text=True)
    assert leftover.stdout.strip() == ""


def test_errors_are_one_line(capsys, monkeypatch):
    from nipype_s3 import cli

    def boom(args):
        raise nipype_s3.ConfigurationError("bad value 'x': do y")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(func=boom)
    assert main(["demo"]) == 1
    assert capsys.readouterr().err == "nipype-s3 demo: error: bad value 'x': do y\n"


def _no_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _unreachable(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens


@pytest.mark.parametrize("argv, setup, says", [
    (["cleanup", "--run", "20261206-000000-abcdef"], _no_credentials, "no AWS credentials"),
    (["cleanup", "--all", "--dry-run"], _no_credentials, "no AWS credentials"),
    (["cost", "--run", "20261206-000000-abcdef", "--s3-prefix", "s3://my-bucket/runs"],
     _no_credentials, "no AWS credentials"),
    (["cleanup", "--run", "20261206-000000-abcdef"], _unreachable, "could not reach AWS"),
    (["cost", "--run", "20261206-000000-abcdef", "--s3-prefix", "s3://my-bucket/runs"],
     _unreachable, "Could not connect"),
    (["cleanup", "--run", "../etc"], None, "run id"),
    (["cost", "--run", "x", "--s3-prefix", "not-a-uri"], None, "S3"),
    (["policy", "agent", "--s3-prefix", "s3://b"], None, "bucket"),
    (["policy", "batch-controller"], None, "needs --name"),
    (["policy", "batch-controller", "--name", "neuro"], None, "needs --s3-prefix"),
    (["batch", "setup", "--name", "neuro", "--s3-prefix", "s3://my-bucket/runs"],
     _no_credentials, "no AWS credentials"),
    (["batch", "teardown", "--name", "neuro"], _unreachable, "could not reach AWS"),
    (["demo", "--backend", "batch", "--plugin", "Linear"], None, "disagree"),
    (["demo", "--image", "a/b:1"], None, "--image is for --backend batch"),
    (["demo", "--backend", "batch", "--image", "nipype-s3-test/not-here:1"], None,
     "demo --backend batch runs the nodes"),
    (["demo", "--backend", "batch", "--image", "NotAnImage!"], None,
     "demo --image must be a container image reference"),
    (["demo", "--keep", "/proc/nope"], None, "demo --keep '/proc/nope': cannot write"),
    (["policy", "batch-controller", "--name", "bad name", "--s3-prefix", "s3://my-bucket/r"],
     None, "Batch environment name 'bad name'"),
    (["batch", "template", "--name", "neuro", "--s3-prefix", "s3://my-bucket/${aws:userid}"],
     None, "no wildcards or policy variables"),
])
def test_every_cli_failure_is_one_line_saying_what_to_do(capsys, monkeypatch, tmp_path, argv,
                                                        setup, says):
    if setup is not None:
        setup(monkeypatch, tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"nipype-s3 {argv[0]}: error: ") and says in err, err


def test_policy_prints_the_documents_of_nipype_s3_iam(capsys):
    import json

    from nipype_s3.iam import agent_policy

    assert main(["policy", "agent", "--s3-prefix", "s3://my-bucket/runs", "--run", "2026*",
                 "--data-bucket", "openneuro"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == agent_policy("my-bucket", "runs", run="2026*", data_buckets=("openneuro",))
