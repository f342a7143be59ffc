"""The controller believes a report only once it verifies, and even a verified report
cannot make it write outside the node's folder or unpickle what it did not name
(moto in-process; the collection code of EC2Plugin, no agent)."""

import gzip
import hashlib
import json
import os
import pickle

import boto3
import pytest
from nipype import Node
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import EC2Plugin
from nipype_s3.ec2.jobs import RunLayout, seal
from nipype_s3.plugins.ec2 import _Job
from nipype_s3.s3.cas import ContentStore

KEY = b"c" * 32


class _Pwn:
    """Unpickling this writes a marker file: code run on the controller."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def plugin(s3_inprocess, tmp_path):
    s3_inprocess.create_bucket(Bucket="runs-bucket")
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://runs-bucket/p"})
    plugin.run_id = "r1"
    plugin.layout = RunLayout("runs-bucket", "p", "r1")
    plugin.s3 = s3_inprocess
    plugin.store = ContentStore(s3_inprocess, "runs-bucket", "p")
    plugin._job_key = KEY
    return plugin


def _job(tmp_path, name="n"):
    node = Node(IdentityInterface(fields=["a"]), name, base_dir=str(tmp_path / "wf"))
    job = _Job(0, f"00000-{name}", node, node.output_dir(), 0.0, 1, 0.0)
    return job


def _store(s3, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket="runs-bucket", Key=f"p/cas/sha256/{digest}", Body=data)
    return {"sha256": digest, "size": len(data), "mtime": 1.0}


def _report(job, outputs, **extra):
    return dict({"run_id": "r1", "job_id": job.job_id, "status": "ok", "outputs": outputs,
                 "worker_root": "/w", "started": 1.0, "finished": 2.0}, **extra)


def _put(plugin, job, body: bytes):
    plugin.s3.put_object(Bucket="runs-bucket", Key=plugin.layout.done_key(job.job_id),
                         Body=body)


def test_an_unsigned_report_is_refused_deleted_and_nothing_is_unpickled(plugin, tmp_path,
                                                                       caplog):
    job = _job(tmp_path)
    marker = tmp_path / "pwned"
    evil = gzip.compress(pickle.dumps(_Pwn(str(marker))))
    outputs = [dict(_store(plugin.s3, evil), path="result_n.pklz"),
               dict(_store(plugin.s3, b"x"), path="../../../escaped.txt")]
    _put(plugin, job, json.dumps(_report(job, outputs)).encode())
    plugin._collect([job])
    assert not job.done  # still waiting for its agent's report
    assert not marker.exists() and not (tmp_path / "escaped.txt").exists()
    assert not os.path.exists(os.path.join(job.node_dir, "result_n.pklz"))
    assert "refused its report" in caplog.text
    assert "Contents" not in plugin.s3.list_objects_v2(Bucket="runs-bucket",
                                                       Prefix="p/runs/r1/done/")


def test_a_report_signed_with_another_key_or_for_another_job_is_refused(plugin, tmp_path):
    job = _job(tmp_path)
    _put(plugin, job, seal(b"o" * 32, "report", _report(job, [])))
    plugin._collect([job])
    assert not job.done
    _put(plugin, job, seal(KEY, "report", dict(_report(job, []), job_id="00001-other")))
    plugin._collect([job])
    assert not job.done
    _put(plugin, job, seal(KEY, "event", _report(job, [])))
    plugin._collect([job])
    assert not job.done


@pytest.mark.parametrize("outputs", [
    [{"path": "../../escaped.txt"}],
    [{"path": "/tmp/escaped.txt"}],
    [{"path": "sub//escaped.txt"}],
    # a link made by the report, then a file written through it
    [{"path": "d", "link": "OUTSIDE", "sha256": "", "size": 0, "mtime": 1.0},
     {"path": "d/escaped.txt"}],
])
def test_a_signed_report_cannot_write_outside_the_node_folder(plugin, tmp_path, outputs):
    outside = tmp_path / "outside"
    outside.mkdir()
    job = _job(tmp_path)
    content = _store(plugin.s3, b"attacker")
    entries = []
    for entry in outputs:
        entry = dict(entry)
        if entry.get("link") == "OUTSIDE":
            entry["link"] = str(outside)
        else:
            entry = dict(content, **entry)
        entries.append(entry)
    _put(plugin, job, seal(KEY, "report", _report(job, entries)))
    plugin._collect([job])
    assert job.done  # a crash of this node, not of the run
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert not [p for p in written if p.endswith("escaped.txt")]
    from nipype.utils.filemanip import loadpkl

    crash = loadpkl(os.path.join(job.node_dir, "result_n.pklz"))
    assert "UnsafePath" in "".join(crash["traceback"])


def test_a_stored_object_that_is_not_its_digest_is_not_used(plugin, tmp_path):
    """The report is genuine but the object at the result's digest was replaced: the
    bytes are checked against the signed digest before anything reads them."""
    job = _job(tmp_path)
    marker = tmp_path / "pwned"
    evil = gzip.compress(pickle.dumps(_Pwn(str(marker))))
    good = b"g" * len(evil)  # the same size: only the digest tells them apart
    entry = dict(_store(plugin.s3, good), path="result_n.pklz")
    plugin.s3.put_object(Bucket="runs-bucket", Key=f"p/cas/sha256/{entry['sha256']}",
                         Body=evil)
    _put(plugin, job, seal(KEY, "report", _report(job, [entry])))
    plugin._collect([job])
    assert not marker.exists()
    from nipype.utils.filemanip import loadpkl

    crash = loadpkl(os.path.join(job.node_dir, "result_n.pklz"))  # our crash file
    assert "do not match their SHA-256" in "".join(crash["traceback"])
    assert not marker.exists()


def test_events_that_do_not_verify_are_ignored(plugin, tmp_path, caplog):
    sqs = boto3.client("sqs", region_name="us-east-1")
    plugin.sqs = sqs
    plugin.events_queue = sqs.create_queue(QueueName="ev")["QueueUrl"]
    job = _job(tmp_path)
    plugin._by_job_id[job.job_id] = job
    for body in [json.dumps({"job_id": job.job_id, "status": "ok"}),
                 json.dumps({"status": "agent-up", "instance_id": "i-fake"}), "[]", "x",
                 seal(b"o" * 32, "event", {"run_id": "r1", "job_id": job.job_id,
                                           "status": "ok"}).decode()]:
        sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=body)
    plugin._drain_events()
    assert plugin._booted == set() and not job.done
    assert caplog.text.count("ignored a message on the events queue") == 5


def test_replayed_and_foreign_agent_up_events_count_once_and_only_for_our_instances(
        plugin, tmp_path):
    import types

    sqs = boto3.client("sqs", region_name="us-east-1")
    plugin.sqs = sqs
    plugin.events_queue = sqs.create_queue(QueueName="ev2")["QueueUrl"]
    plugin._fleets = {"c6i.large": types.SimpleNamespace(pool=types.SimpleNamespace(
        launched={"i-ours": {"launched": 0.0}}))}
    up = seal(KEY, "event", {"run_id": "r1", "status": "agent-up", "instance_id": "i-ours"})
    other = seal(KEY, "event", {"run_id": "r1", "status": "agent-up",
                                "instance_id": "i-not-launched"})
    for body in (up, up, other):
        sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=body.decode())
    plugin._drain_events()
    assert plugin._booted == {"i-ours"} and len(plugin._boot_seconds) == 1
    progress = plugin._progress
    sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=up.decode())
    plugin._drain_events()
    assert plugin._progress == progress  # a replay is no sign of progress


def test_a_version_event_stops_the_run_only_for_our_instances_and_says_short_versions(
        plugin, tmp_path):
    """A signed agent-up naming an instance the run never launched changes nothing; one
    of ours whose versions differ stops the run, its version strings cut to versions."""
    import types

    from nipype_s3.exceptions import ConfigurationError

    sqs = boto3.client("sqs", region_name="us-east-1")
    plugin.sqs = sqs
    plugin.events_queue = sqs.create_queue(QueueName="ev3")["QueueUrl"]
    plugin._fleets = {"c6i.large": types.SimpleNamespace(pool=types.SimpleNamespace(
        launched={"i-ours": {"launched": 0.0}}))}
    lie = dict(plugin._versions, nipype="0.1\n[nipype_s3] " + "x" * 5000)
    for iid in ("i-attacker", "i-not-launched"):
        sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=seal(KEY, "event", {
            "run_id": "r1", "status": "agent-refused", "instance_id": iid,
            "versions": lie, "why": "[nipype_s3] anything"}).decode())
    plugin._drain_events()
    assert plugin._fatal is None
    sqs.send_message(QueueUrl=plugin.events_queue, MessageBody=seal(KEY, "event", {
        "run_id": "r1", "status": "agent-up", "instance_id": "i-ours",
        "versions": lie}).decode())
    plugin._drain_events()
    assert isinstance(plugin._fatal, ConfigurationError)
    said = str(plugin._fatal)
    assert "the agent on i-ours runs nipype ? where the controller runs" in said
    assert "xxxx" not in said and "\n" not in said


def test_a_genuine_report_replaced_after_its_job_finished_sends_the_job_again(plugin,
                                                                             tmp_path):
    """Its agent said it finished, then the report was overwritten: nobody would
    write it again, so the run would wait for ever. The job is sent again instead,
    and after max_attempts replacements it fails, saying why."""
    sqs = boto3.client("sqs", region_name="us-east-1")
    plugin.sqs = sqs
    queue = sqs.create_queue(QueueName="jobs")["QueueUrl"]
    job = _job(tmp_path)
    plugin._messages[job.job_id] = (queue, "the signed job message")
    for attempt in range(int(plugin.settings.max_attempts) + 1):
        job.reported = True
        _put(plugin, job, json.dumps(_report(job, [])).encode())
        plugin._collect([job])
        if attempt < int(plugin.settings.max_attempts):
            assert not job.done
            (msg,) = sqs.receive_message(QueueUrl=queue)["Messages"]
            assert msg["Body"] == "the signed job message"
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=msg["ReceiptHandle"])
    assert job.done
    from nipype.utils.filemanip import loadpkl

    crash = loadpkl(os.path.join(job.node_dir, "result_n.pklz"))
    assert "is tampering with the run" in "".join(crash["traceback"])
