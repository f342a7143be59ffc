"""Whatever arrives on the jobs queue, an agent rejects what is not a genuine job of its
run, deletes it, and goes on: its running jobs are not disturbed (moto in-process).

Written as an attacker with write access to the run's queue and bucket would: wrong
types, missing fields, huge and binary bodies, forged and planted documents.
"""

import importlib
import json
import logging
import time

import botocore.exceptions
import pytest

from nipype_s3.agent import Agent
from nipype_s3.ec2.jobs import (
    MAX_SPEC_BYTES,
    make_message,
    seal,
    sign,
    unseal,
)

agent_main = importlib.import_module("nipype_s3.agent.main")

KEY = b"q" * 32


@pytest.fixture
def run(make_run, s3_inprocess):
    layout, cfg, sqs = make_run(KEY, lease=600, idle_timeout=0.5, vcpus=4, mem_gb=8)
    return layout, cfg, sqs, s3_inprocess


def _msg(layout, **fields):
    body = {"run_id": layout.run_id, "job_id": "j1", "spec_key": layout.spec_key("j1"),
            "hmac": "0" * 64}
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not _MISSING})


_MISSING = object()


def _hostile_bodies(layout):
    """(label, body) of messages no agent may act on."""
    return [
        ("job id a number", _msg(layout, job_id=7)),
        ("job id a list", _msg(layout, job_id=["j1"])),
        ("job id null", _msg(layout, job_id=None)),
        ("job id with a slash", _msg(layout, job_id="../j1",
                                     spec_key=layout.spec_key("../j1"))),
        ("signature a number", _msg(layout, hmac=12345)),
        ("signature non-ASCII", _msg(layout, hmac="é" * 64)),
        ("signature too short", _msg(layout, hmac="ab")),
        ("no run id", _msg(layout, run_id=_MISSING)),
        ("run id an object", _msg(layout, run_id={"a": 1})),
        ("spec key of another run", _msg(layout, spec_key="p/runs/other/jobs/j1/spec.json")),
        ("a JSON list", "[1, 2, 3]"),
        ("a JSON string", '"job"'),
        ("a JSON number", "1e999"),
        ("deeply nested", "[" * 5000 + "]" * 5000),
        ("not JSON", "hello"),
        ("binary-looking", "\x00\x01\x02\udcff".encode("utf-8", "surrogatepass")
         .decode("utf-8", "replace")),
        ("huge", json.dumps({"run_id": layout.run_id, "pad": "x" * 250_000})),
        ("empty", " "),
    ]


def test_the_validator_rejects_every_hostile_body_without_raising_anything_else(run):
    layout, cfg, sqs, s3 = run
    from nipype_s3.ec2.jobs import MessageRejected, open_message

    for label, body in _hostile_bodies(layout) + [("bytes", b"\xff\xfe"), ("none", None),
                                                   ("int", 5)]:
        with pytest.raises(MessageRejected):
            open_message(body, layout)
        assert label


class _Slow:
    """A worker that runs for ``seconds``, then exits 0."""

    def __init__(self, seconds):
        self.until = time.monotonic() + seconds

    def poll(self):
        return 0 if time.monotonic() >= self.until else None

    def kill(self):
        raise AssertionError("a running job was killed")

    def wait(self):
        return 0


def test_a_poisoned_queue_does_not_stop_the_agent_nor_its_running_job(run, tmp_path,
                                                                      caplog):
    caplog.set_level(logging.INFO, logger="nipype_s3.agent")
    layout, cfg, sqs, s3 = run
    bodies = _hostile_bodies(layout)
    for _, body in bodies:
        sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=body)
    # messages that pass the validator but name a spec that is forged, too big, or absent
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key("forged"),
                  Body=b'{"job_id": "forged"}')
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=make_message(
        layout, "forged", b'{"job_id": "forged"}', b"w" * 32))
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=make_message(
        layout, "absent", b"{}", KEY))
    agent = Agent(cfg, instance_id="i-test")
    log = tmp_path / "busy.log"
    log.write_text("worker log\n")
    outcome = tmp_path / "busy.outcome.json"
    outcome.write_text(json.dumps({"job_id": "busy", "status": "ok", "outputs": [],
                                   "started": 1.0, "finished": 2.0}))
    agent.running["busy"] = agent_main._Running(
        "busy", "receipt", 1, _Slow(1.5), str(log), str(outcome), 1, 0.0, time.time(),
        time.time())
    assert agent.run() == 0
    assert agent.stop_reason == "idle for 0 s"
    done = unseal(KEY, s3.get_object(Bucket=layout.bucket,
                                     Key=layout.done_key("busy"))["Body"].read(), "report")
    assert done["status"] == "ok"  # the job running meanwhile finished as it should
    assert caplog.text.count("refused a job message") == len(bodies) + 2
    left = sqs.get_queue_attributes(QueueUrl=cfg.jobs_queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
    assert set(left["Attributes"].values()) == {"0"}  # every one deleted
    done_keys = [o["Key"] for o in s3.list_objects_v2(
        Bucket=layout.bucket, Prefix=layout.key("done"))["Contents"]]
    assert done_keys == [layout.done_key("busy")]  # nothing reported for what was refused


def test_a_huge_spec_is_refused_before_it_is_read(run, caplog, monkeypatch):
    layout, cfg, sqs, s3 = run
    monkeypatch.setattr(agent_main, "MAX_SPEC_BYTES", 1024)
    spec = json.dumps({"job_id": "big", "pad": "x" * 4096}).encode()
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key("big"), Body=spec)
    sqs.send_message(QueueUrl=cfg.jobs_queue_url,
                     MessageBody=make_message(layout, "big", spec, KEY))
    agent = Agent(cfg, instance_id="i-test")
    read = []
    real = agent.s3.get_object

    def get_object(**kw):
        resp = real(**kw)
        if kw["Key"] == layout.spec_key("big"):
            body = resp["Body"]
            orig = body.read
            body.read = lambda n=None: read.append(n) or orig(n)
        return resp

    agent.s3.get_object = get_object
    agent.run()
    assert "is 4" in caplog.text and "more than the 1024" in caplog.text
    assert read == []  # not a byte of it was read
    assert MAX_SPEC_BYTES >= 16 * 1024 * 1024  # the real bound leaves room for manifests


def test_a_job_the_agent_may_not_read_gets_a_signed_failure_report(run, caplog):
    """A 403 on the spec (a narrow role, a KMS bucket): the controller hears of it, and
    stops waiting, instead of launching instance after instance."""
    layout, cfg, sqs, s3 = run
    spec = json.dumps({"job_id": "locked", "node": "n"}).encode()
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key("locked"), Body=spec)
    sqs.send_message(QueueUrl=cfg.jobs_queue_url,
                     MessageBody=make_message(layout, "locked", spec, KEY))
    agent = Agent(cfg, instance_id="i-test")
    real = agent.s3.get_object

    def get_object(**kw):
        if kw["Key"] == layout.spec_key("locked"):
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                 "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
        return real(**kw)

    agent.s3.get_object = get_object
    agent.run()
    report = unseal(KEY, s3.get_object(Bucket=layout.bucket,
                                       Key=layout.done_key("locked"))["Body"].read(), "report")
    assert report["status"] == "failed" and "may not read this job's spec" in report["error"]
    events = sqs.receive_message(QueueUrl=cfg.events_queue_url, MaxNumberOfMessages=10)
    statuses = [unseal(KEY, m["Body"], "event")["status"] for m in events["Messages"]]
    assert "failed" in statuses


def test_a_planted_report_is_replaced_by_the_real_one(run, tmp_path, caplog):
    layout, cfg, sqs, s3 = run
    s3.put_object(Bucket=layout.bucket, Key=layout.done_key("j9"),
                  Body=json.dumps({"job_id": "j9", "status": "ok", "outputs": [
                      {"path": "../../x", "sha256": "0" * 64, "size": 1, "mtime": 0}]}))
    agent = Agent(cfg, instance_id="i-test")
    assert agent._write_done("j9", {"status": "ok", "outputs": []}) is True
    report = unseal(KEY, s3.get_object(Bucket=layout.bucket,
                                       Key=layout.done_key("j9"))["Body"].read(), "report")
    assert report["outputs"] == [] and report["job_id"] == "j9"
    assert "is not one of this run's" in caplog.text
    # a genuine one already there is kept: a second attempt's is dropped
    assert agent._write_done("j9", {"status": "error", "outputs": []}) is False


def test_events_and_reports_cannot_stand_for_each_other():
    event = seal(KEY, "event", {"job_id": "j", "status": "ok"})
    from nipype_s3.ec2.jobs import MessageRejected

    with pytest.raises(MessageRejected):
        unseal(KEY, event, "report")
    assert sign(KEY, b"x") != sign(b"r" * 32, b"x")


def test_a_forked_worker_does_not_keep_the_run_key(run):
    layout, cfg, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    assert agent._job_key() == KEY
    held = agent._key
    agent._forget_key()
    assert agent._key is None and bytes(held) == bytes(32)


def test_the_log_tail_reads_only_the_end_of_a_big_log(tmp_path):
    log = tmp_path / "big.log"
    with open(log, "w") as fobj:
        for i in range(200_000):
            fobj.write(f"line {i}\n")
    tail = agent_main._tail(str(log), lines=3)
    assert tail == "line 199997\nline 199998\nline 199999\n"


@pytest.mark.parametrize("planted", [b'{"expires": 0}', b"[]", b'{"expires": "x"}',
                                     b'{"expires": NaN}', b"not json at all"])
def test_a_planted_lease_neither_stops_the_agent_nor_kills_its_job(run, tmp_path, planted,
                                                                   caplog):
    layout, cfg, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    assert agent._lease_stale() is False  # the controller's genuine lease
    s3.put_object(Bucket=layout.bucket, Key=layout.lease_key, Body=planted)
    assert agent._lease_stale() is False
    assert "ignored the lease" in caplog.text
    agent._lease_expires = time.time() - 1  # the last genuine lease has run out meanwhile
    assert agent._lease_stale() is True  # a planted one cannot keep the agent alive


def _signed_job(layout, s3, job_id):
    spec = json.dumps({"job_id": job_id, "node": "n"}).encode()
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key(job_id), Body=spec)
    return make_message(layout, job_id, spec, KEY)


def test_a_copy_of_a_running_jobs_message_does_not_start_it_again(run, monkeypatch):
    layout, cfg, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    started = []
    monkeypatch.setattr(agent, "_start", lambda spec, receipt, attempt, n, m, mid="":
                        (started.append(mid), agent.running.__setitem__(
                            spec["job_id"], agent_main._Running(
                                spec["job_id"], receipt, attempt, _Slow(60), "", "", n, m,
                                time.time(), time.time(), mid))))
    body = _signed_job(layout, s3, "j-dup")
    for _ in range(3):
        sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=body)
    msgs = sqs.receive_message(QueueUrl=cfg.jobs_queue_url, MaxNumberOfMessages=10,
                               MessageSystemAttributeNames=["ApproximateReceiveCount"])
    for msg in msgs["Messages"]:
        agent._take_safely(msg)
    assert len(started) == 1
    # the same message received again (its heartbeat was lost): the newest receipt kept
    first = msgs["Messages"][0]
    again = dict(first, ReceiptHandle="newer-receipt")
    assert agent._take_safely(again) is False
    assert agent.running["j-dup"].receipt == "newer-receipt" and len(started) == 1


def test_receives_counted_by_someone_else_do_not_fail_a_job(run, monkeypatch):
    """Receiving a message max_attempts times (VisibilityTimeout=0) pushed SQS's count
    over the limit: the job was failed without having run. Starts are counted from the
    agents' signed records instead."""
    layout, cfg, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    starts = []
    monkeypatch.setattr(agent, "_start", lambda spec, receipt, attempt, *a: starts.append(
        attempt))
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=_signed_job(layout, s3, "j1"))
    for _ in range(cfg.max_attempts + 2):  # the attacker's receives
        sqs.receive_message(QueueUrl=cfg.jobs_queue_url, VisibilityTimeout=0)
    msg = sqs.receive_message(QueueUrl=cfg.jobs_queue_url,
                              MessageSystemAttributeNames=["ApproximateReceiveCount"])
    assert int(msg["Messages"][0]["Attributes"]["ApproximateReceiveCount"]) > \
        cfg.max_attempts
    assert agent._take_safely(msg["Messages"][0]) is True
    assert starts == [1]
    assert "Contents" not in s3.list_objects_v2(Bucket=layout.bucket,
                                                Prefix=layout.key("done"))
    # genuine starts (signed) do count
    for slot in range(1, cfg.max_attempts + 1):
        agent._mark_start("j2", slot)
    assert agent._verified_starts("j2") == cfg.max_attempts


def test_a_planted_done_file_does_not_make_the_agent_drop_the_job(run, monkeypatch):
    layout, cfg, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    starts = []
    monkeypatch.setattr(agent, "_start", lambda spec, *a: starts.append(spec["job_id"]))
    s3.put_object(Bucket=layout.bucket, Key=layout.done_key("j3"),
                  Body=b'{"job_id": "j3", "status": "ok"}')
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=_signed_job(layout, s3, "j3"))
    msg = sqs.receive_message(QueueUrl=cfg.jobs_queue_url)["Messages"][0]
    assert agent._take_safely(msg) is True and starts == ["j3"]
    # a genuine report does mean the job is done
    agent._write_done("j4", {"status": "ok", "outputs": []})
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=_signed_job(layout, s3, "j4"))
    msg = sqs.receive_message(QueueUrl=cfg.jobs_queue_url)["Messages"][0]
    assert agent._take_safely(msg) is False and starts == ["j3"]
