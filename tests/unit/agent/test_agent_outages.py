"""AWS errors that pass do not stop an agent or lose a job (moto in-process; the
failures are injected in front of the agent's real clients)."""

import importlib
import json
import logging
import time

import botocore.exceptions
import pytest

from nipype_s3.agent import Agent
from nipype_s3.agent.main import transient
from nipype_s3.ec2.jobs import (
    make_message,
    unseal,
)

agent_main = importlib.import_module("nipype_s3.agent.main")  # the package's main() hides it


def _client_error(status, code, op="ReceiveMessage"):
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "injected"},
         "ResponseMetadata": {"HTTPStatusCode": status}}, op)


def _no_connection():
    return botocore.exceptions.EndpointConnectionError(endpoint_url="https://sqs.invalid")


@pytest.mark.parametrize("exc, passes", [
    (_client_error(500, "InternalError"), True),
    (_client_error(503, "SlowDown"), True),
    (_client_error(400, "ThrottlingException"), True),
    (_client_error(429, "TooManyRequests"), True),
    (_no_connection(), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="https://s3.invalid"), True),
    (_client_error(403, "AccessDenied"), False),
    (_client_error(404, "NoSuchKey"), False),
    (_client_error(400, "AWS.SimpleQueueService.NonExistentQueue"), False),
    (botocore.exceptions.ParamValidationError(report="bad"), False),
])
def test_which_errors_pass(exc, passes):
    assert transient(exc) is passes


class Flaky:
    """A client whose ``operation`` raises the given errors first, then works."""

    def __init__(self, real, operation, errors):
        self._real, self._op, self.errors, self.calls = real, operation, list(errors), 0

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name != self._op:
            return attr

        def call(**kwargs):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            return attr(**kwargs)

        return call


@pytest.fixture
def run(make_run, s3_inprocess, monkeypatch):
    monkeypatch.setattr(agent_main, "_RETRY_FIRST", 0.05)
    key = b"k" * 32
    layout, cfg, sqs = make_run(key, lease=600, idle_timeout=0.5, vcpus=2, mem_gb=4)
    return layout, cfg, key, sqs, s3_inprocess


def test_an_idle_agent_rides_out_a_short_outage(run, caplog):
    caplog.set_level(logging.INFO, logger="nipype_s3.agent")
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    agent.sqs = Flaky(agent.sqs, "receive_message",
                      [_no_connection(), _client_error(503, "ServiceUnavailable")])
    assert agent.run() == 0
    assert agent.sqs.calls > 2 and not agent.sqs.errors
    assert agent.stop_reason == "idle for 0 s"
    assert "an AWS request failed" in caplog.text and "AWS answers again" in caplog.text


def test_an_agent_does_not_stop_idle_before_it_has_seen_the_queue_again(run):
    """Its idle time runs out during an outage: a job may be waiting, so it looks once
    more when AWS answers, and only then stops."""
    import dataclasses

    layout, cfg, key, sqs, s3 = run
    agent = Agent(dataclasses.replace(cfg, idle_timeout=0.01), instance_id="i-test")
    agent.sqs = Flaky(agent.sqs, "receive_message",
                      [_no_connection(), _client_error(503, "ServiceUnavailable")])
    assert agent.run() == 0
    assert agent.sqs.calls == 3 and not agent.sqs.errors  # the third look worked
    assert agent.stop_reason == "idle for 0 s"


def test_an_idle_agent_gives_up_after_max_outage(run):
    layout, cfg, key, sqs, s3 = run
    cfg.max_outage = 0.3
    agent = Agent(cfg, instance_id="i-test")
    agent.sqs = Flaky(agent.sqs, "receive_message", [_no_connection()] * 1000)
    started = time.monotonic()
    agent.run()
    assert agent.stop_reason.startswith("AWS did not answer for")
    assert "max_outage" in agent.stop_reason and "sqs.invalid" in agent.stop_reason
    assert time.monotonic() - started < 30


def test_an_error_that_will_not_pass_still_stops_the_agent(run):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    agent.sqs = Flaky(agent.sqs, "receive_message", [_client_error(403, "AccessDenied")])
    with pytest.raises(botocore.exceptions.ClientError, match="AccessDenied"):
        agent.run()


def test_an_unreadable_lease_is_not_a_stale_one(run):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    agent.s3 = Flaky(agent.s3, "get_object", [_client_error(500, "InternalError", "GetObject")])
    with pytest.raises(botocore.exceptions.ClientError):
        agent._lease_stale()
    assert agent._lease_stale() is False  # the lease is fine once S3 answers
    s3.delete_object(Bucket=layout.bucket, Key=layout.lease_key)
    assert agent._lease_stale() is True  # gone: the run was cleaned up


class _Ended:
    """A worker process that has exited with ``code``."""

    def __init__(self, code=0):
        self.code = code

    def poll(self):
        return self.code


def _occupy(agent, tmp_path, job_id="busy", proc=None):
    log = tmp_path / f"{job_id}.log"
    log.write_text("worker log\n")
    agent.running[job_id] = agent_main._Running(
        job_id, "receipt-of-" + job_id, 1, proc or type("P", (), {"poll": lambda s: None})(),
        str(log), str(tmp_path / f"{job_id}.outcome.json"), agent.vcpus, 0.0,
        time.time(), time.time())


def _announce(layout, cfg, key, sqs, s3, job_id, n_procs=1):
    spec = json.dumps({"job_id": job_id, "node": "n", "n_procs": n_procs}).encode()
    s3.put_object(Bucket=layout.bucket, Key=layout.spec_key(job_id), Body=spec)
    sqs.send_message(QueueUrl=cfg.jobs_queue_url,
                     MessageBody=make_message(layout, job_id, spec, key))
    return sqs.receive_message(QueueUrl=cfg.jobs_queue_url, VisibilityTimeout=60,
                               MessageSystemAttributeNames=["ApproximateReceiveCount"]
                               )["Messages"][0]


def test_a_job_that_does_not_fit_is_kept_when_it_cannot_be_put_back(run, tmp_path):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    _occupy(agent, tmp_path)  # every vCPU taken
    msg = _announce(layout, cfg, key, sqs, s3, "j-wait")
    agent.sqs = Flaky(agent.sqs, "send_message", [_no_connection()])
    agent._take(msg)  # no exception: the agent goes on
    assert list(agent.running) == ["busy"]
    # the message was not deleted: it is visible again at once
    again = sqs.receive_message(QueueUrl=cfg.jobs_queue_url, WaitTimeSeconds=0)
    assert json.loads(again["Messages"][0]["Body"])["job_id"] == "j-wait"


def test_a_spec_that_cannot_be_fetched_yet_is_not_refused(run, caplog):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    msg = _announce(layout, cfg, key, sqs, s3, "j-later")
    agent.s3 = Flaky(agent.s3, "get_object", [_client_error(503, "SlowDown", "GetObject")])
    with pytest.raises(botocore.exceptions.ClientError):
        agent._take(msg)  # the loop waits and asks again; the message is not deleted
    assert "refused" not in caplog.text
    sqs.change_message_visibility(QueueUrl=cfg.jobs_queue_url,
                                  ReceiptHandle=msg["ReceiptHandle"], VisibilityTimeout=0)
    assert sqs.receive_message(QueueUrl=cfg.jobs_queue_url)["Messages"]


def test_a_finished_job_is_reported_once_aws_answers_again(run, tmp_path):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    _occupy(agent, tmp_path, "j-done", proc=_Ended(0))
    (tmp_path / "j-done.outcome.json").write_text(json.dumps(
        {"job_id": "j-done", "status": "ok", "outputs": [], "started": 1.0,
         "finished": 2.0}))
    agent.s3 = Flaky(agent.s3, "put_object", [_no_connection()])
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        agent._reap()
    assert "j-done" in agent.running  # kept until its report is written
    assert agent._reap() is True and not agent.running
    done = unseal(key, s3.get_object(Bucket=layout.bucket,
                                     Key=layout.done_key("j-done"))["Body"].read(), "report")
    assert done["status"] == "ok" and done["instance_id"] == "i-test"
    assert agent.jobs_done == 1


@pytest.mark.parametrize("content", ['{"job_id": "j-bad", "status": "o', "\x00\x00", "[]"])
def test_an_unreadable_outcome_is_reported_as_an_error_not_a_dead_agent(run, tmp_path,
                                                                        content):
    layout, cfg, key, sqs, s3 = run
    agent = Agent(cfg, instance_id="i-test")
    _occupy(agent, tmp_path, "j-bad", proc=_Ended(-9))
    (tmp_path / "j-bad.outcome.json").write_text(content)
    assert agent._reap() is True and not agent.running
    done = unseal(key, s3.get_object(Bucket=layout.bucket,
                                     Key=layout.done_key("j-bad"))["Body"].read(), "report")
    assert done["status"] == "error" and done["exit_code"] == -9
    assert "worker log" in done["log_tail"]
    if content != "[]":
        assert "j-bad.outcome.json could not be read" in done["traceback"][0]
