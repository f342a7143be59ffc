"""The agent refuses what it should, on moto in-process (no subprocess is started)."""

import json
import time

import pytest

from nipype_s3.agent import Agent
from nipype_s3.ec2.jobs import make_message, seal


@pytest.fixture
def run(make_run, s3_inprocess):
    key = b"s" * 32
    layout, cfg, sqs = make_run(key)
    return layout, cfg, key, sqs, s3_inprocess


def _lease(s3, layout, seconds, key=b"s" * 32):
    s3.put_object(Bucket=layout.bucket, Key=layout.lease_key, Body=seal(
        key, "lease", {"run_id": layout.run_id, "expires": time.time() + seconds}))


def test_bad_signature_is_refused_and_nothing_runs(run, caplog):
    layout, cfg, key, sqs, s3 = run
    _lease(s3, layout, 60)
    spec = json.dumps({"job_id": "j1", "node": "evil", "manifest": []}).encode()
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key("j1"), Body=spec)
    sqs.send_message(QueueUrl=cfg.jobs_queue_url,
                     MessageBody=make_message(layout, "j1", spec, b"w" * 32))
    agent = Agent(cfg, instance_id="i-test")
    assert agent.run() == 0
    assert "refused a job message: job j1: the signature does not verify" in caplog.text
    assert agent.jobs_done == 0
    assert "Contents" not in s3.list_objects_v2(Bucket=layout.bucket, Prefix=layout.key("done"))
    assert "Messages" not in sqs.receive_message(QueueUrl=cfg.jobs_queue_url)


def test_spec_outside_the_run_is_refused(run, caplog):
    layout, cfg, key, sqs, s3 = run
    _lease(s3, layout, 60)
    body = json.loads(make_message(layout, "j2", b"{}", key))
    body["spec_key"] = "p/runs/another-run/jobs/j2/spec.json"
    sqs.send_message(QueueUrl=cfg.jobs_queue_url, MessageBody=json.dumps(body))
    agent = Agent(cfg, instance_id="i-test")
    agent.run()
    assert "is not below this run's prefix" in caplog.text and agent.jobs_done == 0


def test_stale_lease_stops_the_agent(run):
    layout, cfg, key, sqs, s3 = run
    _lease(s3, layout, -1)
    agent = Agent(cfg, instance_id="i-test")
    agent.run()
    assert agent.stop_reason == "the controller's lease is stale"


def test_idle_agent_stops(run):
    layout, cfg, key, sqs, s3 = run
    _lease(s3, layout, 60)
    agent = Agent(cfg, instance_id="i-test")
    started = time.monotonic()
    agent.run()
    assert agent.stop_reason == "idle for 1 s"
    assert time.monotonic() - started < 30


def test_max_lifetime_stops_the_agent(run):
    layout, cfg, key, sqs, s3 = run
    _lease(s3, layout, 60)
    cfg.max_lifetime = 0
    agent = Agent(cfg, instance_id="i-test")
    agent.run()
    assert agent.stop_reason == "max lifetime reached"
