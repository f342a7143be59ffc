"""EC2Plugin on LocalCloud against someone with write access to the run's bucket and
queues: what they plant is refused, the workflow's result is the real one, and a job no
agent may read ends the run with a clear error instead of launching forever."""

import gzip
import hashlib
import json
import os
import pickle
import threading
import time

import boto3
import pytest
from nipype import Function, Node, Workflow

from nipype_s3 import EC2Plugin
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow

FAST = {"idle_timeout": 15, "lease_timeout": 8, "visibility_timeout": 6, "heartbeat": 1.5,
        "poll_wait": 1, "scale_interval": 0.5, "done_scan_interval": 1}


def _sleep_then_double(x):
    import time

    time.sleep(4)
    return 2 * x


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _plugin(**extra):
    return EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                  "max_instances": 1, **FAST, **extra})


def test_a_planted_report_and_forged_events_change_nothing(tmp_path, caplog):
    marker = tmp_path / "pwned"
    with LocalCloud() as cloud:
        s3 = boto3.client("s3")
        sqs = boto3.client("sqs")
        s3.create_bucket(Bucket="my-bucket")
        wf = Workflow("trust", base_dir=str(tmp_path / "wf"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        node = Node(Function(input_names=["x"], output_names=["y"],
                             function=_sleep_then_double), name="slow")
        node.inputs.x = 21
        wf.add_nodes([node])
        plugin = _plugin()
        planted = threading.Event()

        def attack():
            deadline = time.time() + 120
            while time.time() < deadline and not plugin._by_job_id:
                time.sleep(0.1)
            job_id = next(iter(plugin._by_job_id))
            layout = plugin.layout
            evil = gzip.compress(pickle.dumps(_Pwn(str(marker))))
            digest = hashlib.sha256(evil).hexdigest()
            s3.put_object(Bucket="my-bucket", Key=f"nipype-runs/cas/sha256/{digest}",
                          Body=evil)
            report = {"job_id": job_id, "run_id": layout.run_id, "status": "ok",
                      "worker_root": "/", "outputs": [
                          {"path": "result_slow.pklz", "sha256": digest,
                           "size": len(evil), "mtime": 1.0},
                          {"path": "../../../escaped.txt", "sha256": digest,
                           "size": len(evil), "mtime": 1.0}]}
            s3.put_object(Bucket="my-bucket", Key=layout.done_key(job_id),
                          Body=json.dumps(report).encode())
            for body in (json.dumps({"job_id": job_id, "status": "ok"}),
                         json.dumps({"status": "agent-up", "instance_id": "i-attacker"}),
                         "[" * 10000):
                sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=body)
            planted.set()

        attacker = threading.Thread(target=attack, daemon=True)
        attacker.start()
        result = wf.run(plugin=plugin)
        attacker.join(5)
        assert planted.is_set()
        (done,) = [n for n in result.nodes()]
        assert done.result.outputs.y == 42  # the real result
        assert not marker.exists()
        assert not [f for d, _, fs in os.walk(tmp_path) for f in fs if f == "escaped.txt"]
        assert "refused its report" in caplog.text or \
            "is not one of this run's" in "".join(i.log() for i in cloud.instance_list())
        assert "ignored a message on the events queue" in caplog.text
        assert "i-attacker" not in plugin._booted
        assert cloud.live_instances() == []
        assert cloud.errors == []


def test_a_job_no_agent_may_read_ends_the_run_clearly(tmp_path):
    """A role that may not read the run's specs (or a KMS key it may not use): the
    agent reports it, signed; the run stops with that reason, with no new launches."""
    with LocalCloud(agents_via_proxy=True) as cloud:
        boto3.client("s3").create_bucket(Bucket="my-bucket")
        cloud.deny_agents("/spec.json")
        wf = Workflow("denied", base_dir=str(tmp_path / "wf"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
        node = Node(Function(input_names=["x"], output_names=["y"],
                             function=_sleep_then_double), name="locked")
        node.inputs.x = 1
        wf.add_nodes([node])
        with pytest.raises(RuntimeError):
            wf.run(plugin=_plugin())
        from nipype.utils.filemanip import loadcrash

        (crash,) = (tmp_path / "crashes").glob("crash-*locked*.pklz")
        text = "".join(loadcrash(str(crash))["traceback"])
        assert "may not read this job's spec" in text
        assert cloud.proxy.count(action="RunInstances") == 1
        assert cloud.live_instances() == []


def _refused_everything(cloud, tmp_path, name, node_name):
    """A one-node workflow on a cloud whose agents may read no spec and write no report."""
    boto3.client("s3").create_bucket(Bucket="my-bucket")
    cloud.deny_agents("/spec.json")
    cloud.deny_agents("/done/")
    wf = Workflow(name, base_dir=str(tmp_path / "wf"))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = Node(Function(input_names=["x"], output_names=["y"],
                         function=_sleep_then_double), name=node_name)
    node.inputs.x = 1
    wf.add_nodes([node])
    return wf


def test_launches_are_bounded_when_instances_keep_ending(tmp_path):
    """Agents that start, take nothing and end (here: every spec read refused and the
    report refused too) cannot make the controller launch forever."""
    with LocalCloud(agents_via_proxy=True) as cloud:
        wf = _refused_everything(cloud, tmp_path, "bounded", "never")
        started = time.time()
        from nipype_s3.exceptions import InstanceLaunchError

        with pytest.raises(InstanceLaunchError, match="max_launches=3"):
            wf.run(plugin=_plugin(idle_timeout=2, max_launches=3, stall_timeout=60))
        assert cloud.proxy.count(action="RunInstances") <= 3
        assert time.time() - started < 120
        assert cloud.live_instances() == []


def test_jobs_no_agent_starts_end_the_run_after_stall_timeout(tmp_path):
    """Agents up and idle, the job never started (its report could not be written
    either): after ``stall_timeout`` the run stops, naming the job, instead of paying
    for idle instances until max_lifetime."""
    with LocalCloud(agents_via_proxy=True) as cloud:
        wf = _refused_everything(cloud, tmp_path, "stalled", "waiting")
        from nipype_s3.exceptions import EC2Error

        with pytest.raises(EC2Error, match=r"stalled\.waiting.*never started.*stall_timeout"):
            wf.run(plugin=_plugin(idle_timeout=120, stall_timeout=6))
        assert cloud.proxy.count(action="RunInstances") == 1
        assert cloud.live_instances() == []
