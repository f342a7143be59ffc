"""Run operations on LocalCloud: cost reports, cleanup, and a controller that dies."""

import os
import re
import signal
import subprocess
import sys
import time

import boto3
import pytest

from nipype_s3.cli import main
from nipype_s3.ec2.instances import InstancePool, LaunchSpec
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow


@pytest.fixture
def cloud():
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="my-bucket")
        yield cloud


def test_cleanup_terminates_a_dead_runs_instances(cloud, capsys):
    ec2 = boto3.client("ec2")
    pool = InstancePool(ec2, "dead-run-1", LaunchSpec(ami="ami-0ed094fb1304fd857",
                                                      instance_type="t3.micro",
                                                      user_data="#!/bin/bash\ntrue\n"))
    ids = pool.launch(1) + pool.launch(1)  # moto starts MinCount instances per call
    boto3.client("sqs").create_queue(QueueName="nipype-s3-dead-run-1-jobs")
    assert main(["cleanup", "--run", "dead-run-1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would terminate 2 instance(s)" in out and all(i in out for i in ids)
    assert sorted(cloud.live_instances()) == sorted(ids)
    assert main(["cleanup", "--run", "dead-run-1"]) == 0
    assert "terminated 2 instance(s)" in capsys.readouterr().out
    assert cloud.live_instances() == []
    assert main(["cleanup", "--all"]) == 0
    assert "terminated 0 instance(s)" in capsys.readouterr().out


CONTROLLER = r'''
import os, sys
os.environ["NIPYPE_NO_ET"] = "1"
from nipype import Function, Node, Workflow
from nipype.interfaces.utility import IdentityInterface
from nipype_s3 import EC2Plugin

def slow(x):
    import time
    time.sleep(120)
    return x

wf = Workflow("orphan", base_dir=sys.argv[1])
wf.config["execution"]["poll_sleep_duration"] = 0.3
src = Node(IdentityInterface(fields=["x"]), "src")
src.iterables = ("x", [1, 2])
node = Node(Function(input_names=["x"], output_names=["y"], function=slow), "slow")
wf.connect(src, "x", node, "x")
wf.run(plugin=EC2Plugin(plugin_args={
    "s3_prefix": "s3://my-bucket/nipype-runs", "max_instances": 2, "agent_vcpus": 1,
    "lease_timeout": 6, "idle_timeout": 60, "visibility_timeout": 10, "heartbeat": 2,
    "poll_wait": 1, "scale_interval": 0.5}))
'''


def test_killed_controller_leaves_nothing_running(cloud, tmp_path, capsys):
    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER)
    log = open(tmp_path / "controller.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "work")],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            if cloud.busy_agents():
                break
            time.sleep(0.2)
        else:
            pytest.fail("no agent started a job: " + (tmp_path / "controller.log").read_text())
        os.kill(proc.pid, signal.SIGKILL)  # the controller dies without any cleanup
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert cloud.live_instances() != []
    # the agents notice the stale lease, stop, and their instances terminate
    assert cloud.wait_idle(60), [i.log()[-2000:] for i in cloud.instance_list()]
    logs = "".join(i.log() for i in cloud.instance_list())
    assert "agent stops: the controller's lease is stale" in logs
    run_id = re.search(r"EC2Plugin: run (\S+),", (tmp_path / "controller.log").read_text())
    assert run_id
    assert main(["cleanup", "--run", run_id.group(1)]) == 0
    out = capsys.readouterr().out
    assert "terminated 0 instance(s)" in out and "deleted 2 SQS queue(s)" in out


def test_cost_command(cloud, tmp_path, capsys):
    from nipype import Function, Node, Workflow

    from nipype_s3 import EC2Plugin

    def double(x):
        return 2 * x

    wf = Workflow("costed", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = Node(Function(input_names=["x"], output_names=["y"], function=double), "a")
    node.inputs.x = 4
    wf.add_nodes([node])
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                    "poll_wait": 1, "scale_interval": 0.5,
                                    "lease_timeout": 8})
    wf.run(plugin=plugin)
    assert main(["cost", "--run", plugin.run_id, "--s3-prefix",
                 "s3://my-bucket/nipype-runs"]) == 0
    out = capsys.readouterr().out
    assert f"run {plugin.run_id}:" in out and "1 instance(s)" in out
    assert "jobs: 1 on EC2, 0 on the controller" in out
    assert main(["cost", "--run", "no-such-run", "--s3-prefix",
                 "s3://my-bucket/nipype-runs"]) == 1
    assert capsys.readouterr().err == (
        "nipype-s3 cost: error: No cost report for run 'no-such-run': "
        "s3://my-bucket/nipype-runs/runs/no-such-run/cost.json does not exist. The latest "
        f"runs there: {plugin.run_id}. A run writes its report when it ends; check --run "
        "and --s3-prefix (the run's s3_prefix).\n")
