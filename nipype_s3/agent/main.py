"""The agent: the same code on EC2 and in tests (``python -m nipype_s3.agent``).

It long-polls its run's jobs queue, checks each message's signature, fetches the
signed spec, and starts one worker process per job while the jobs fit the machine's
vCPUs and memory. While a job runs it keeps the message invisible (heartbeat); when the
worker ends it uploads the log, writes ``done/<job>.json`` with ``IfNoneMatch='*'``
(the first finished attempt wins, a late duplicate is dropped), tells the controller on
the events queue and deletes the message. A job whose message was received more than
``max_attempts`` times (its agents died) is reported as an infrastructure failure.

It stops — and on EC2 the bootstrap then shuts the instance down, which terminates it —
after ``idle_timeout`` without work, when the controller's lease goes stale, or at
``max_lifetime``.

AWS errors that may pass (no connection, a timeout, throttling, a 5xx answer: see
:func:`transient`) do not stop it: the loop waits and tries again, running jobs go on,
and a finished job's report is written once AWS answers again. Only an agent with
nothing running gives up, after ``max_outage`` seconds without a successful request.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import boto3
import botocore.exceptions

from ..ec2.jobs import (
    MAX_SPEC_BYTES,
    MessageRejected,
    open_message,
    read_bounded,
    seal,
    unseal,
    valid_job_id,
    verify,
)
from ..remote.versions import mismatch, runtime_versions
from ..s3.session import make_s3_client
from .config import AgentConfig
from .forked import _THREAD_VARS, ForkedWorker, can_fork, preload
from .metadata import Metadata

__all__ = ["Agent", "main"]

logger = logging.getLogger("nipype_s3.agent")

_LOG_TAIL = 40
#: At most this much of a job's log is read for its tail (a 300 MB log stays on disk).
_TAIL_BYTES = 64 * 1024
#: The metadata service is asked for a spot interruption notice this often (seconds):
#: EC2 gives two minutes.
_NOTICE_EVERY = 5.0
#: While jobs run and there is room for more, the queue is asked this often (seconds).
_BUSY_RECEIVE_EVERY = 2.0


_THROTTLED = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
              "RequestLimitExceeded", "ServiceUnavailable", "InternalError",
              "RequestThrottled", "TooManyRequestsException"}


def transient(exc: BaseException) -> bool:
    """Whether an AWS error may pass if the request is made again later.

    Connection failures and timeouts (botocore's own errors), throttling and server-side
    (5xx) errors are; a refusal (403), a missing object or queue (404) or a bad request
    are not.
    """
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _THROTTLED
    return isinstance(exc, (botocore.exceptions.ConnectionError,
                            botocore.exceptions.HTTPClientError,
                            botocore.exceptions.ReadTimeoutError,
                            botocore.exceptions.ConnectTimeoutError,
                            botocore.exceptions.NoCredentialsError))


_AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


@dataclass
class _Running:
    job_id: str
    receipt: str
    attempt: int
    proc: subprocess.Popen | ForkedWorker
    log_path: str
    outcome_path: str
    n_procs: int
    mem_gb: float
    started: float
    last_beat: float
    #: the SQS message it came in (a copy of it, received again, is not started again)
    message_id: str = ""


#: After a failed AWS request the agent waits this long, doubling up to ``_RETRY_MAX``.
_RETRY_FIRST, _RETRY_MAX = 1.0, 30.0


@dataclass
class _Outage:
    since: float
    delay: float


class Agent:
    """Serve one run's jobs until idle, orphaned or too old."""

    def __init__(self, config: AgentConfig, *, instance_id: str | None = None) -> None:
        self.cfg = config
        self.layout = config.layout
        self.metadata = Metadata()
        # on AWS Batch, the agent's own job (several agents may share a host)
        self.instance_id = instance_id or os.environ.get("NIPYPE_S3_INSTANCE_ID") \
            or os.environ.get("AWS_BATCH_JOB_ID") \
            or self.metadata.instance_id() or "local"
        session = boto3.Session(region_name=config.region)
        self.s3 = make_s3_client(session, endpoint_url=config.endpoint_url,
                                 region=config.region)
        kwargs = {"region_name": config.region}
        if config.endpoint_url:
            kwargs["endpoint_url"] = config.endpoint_url
        self.sqs = session.client("sqs", **kwargs)
        self.ssm = session.client("ssm", **kwargs)
        self.vcpus = config.machine_vcpus()
        self.mem_gb = config.machine_mem_gb()
        self.running: dict[str, _Running] = {}
        self.jobs_done = 0
        self._key: bytearray | None = None
        #: the last verified lease's expiry; until one is read, what the first check may
        #: wait for (a controller that wrote none is gone)
        self._lease_expires = time.time() + max(60.0, 4 * config.lease_check)
        self._stop = False
        self.stop_reason = ""

    # -- helpers ------------------------------------------------------------------------
    def _job_key(self) -> bytes:
        if self._key is None:
            value = self.ssm.get_parameter(Name=self.cfg.job_key_parameter,
                                           WithDecryption=True)["Parameter"]["Value"]
            self._key = bytearray(bytes.fromhex(value))
        return bytes(self._key)

    def _forget_key(self) -> None:
        """In a forked worker: wipe the run's key from this copy of the agent's memory."""
        if self._key is not None:
            self._key[:] = bytes(len(self._key))
            self._key = None

    def _lease_stale(self) -> bool:
        """Whether the controller's lease has run out.

        Only a lease signed with the run's key counts: one that does not verify (or
        whose time is not a finite number) is ignored, and the last verified expiry
        stands, so a planted lease can neither stop the agents nor keep them alive
        after the controller is gone. A lease that is gone means the run was cleaned up.
        """
        try:
            data = read_bounded(self.s3, self.cfg.bucket, self.layout.lease_key, 64 * 1024,
                                what="lease")
            lease = unseal(self._job_key(), data, "lease", limit=64 * 1024)
            expires = lease.get("expires")
            if lease.get("run_id") != self.cfg.run_id or isinstance(expires, bool) or \
                    not isinstance(expires, (int, float)) or not math.isfinite(expires):
                raise MessageRejected(f"a lease of run {lease.get('run_id')!r} expiring "
                                      f"{expires!r}")
            self._lease_expires = float(expires)
        except botocore.exceptions.ClientError as exc:
            if transient(exc):
                raise  # unknown, not stale: the loop tries again
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return True  # gone: the run was cleaned up
            logger.warning("could not read the controller's lease (%s)", exc)
        except MessageRejected as exc:
            logger.warning("ignored the lease at s3://%s/%s: %s", self.cfg.bucket,
                           self.layout.lease_key, exc)
        return time.time() > self._lease_expires

    def _free(self) -> tuple[int, float]:
        cpus = self.vcpus - sum(r.n_procs for r in self.running.values())
        mem = self.mem_gb - sum(r.mem_gb for r in self.running.values())
        return cpus, mem

    def _send_event(self, job_id: str, status: str, **more) -> None:
        """Tell the controller (signed: it ignores events it cannot verify)."""
        try:
            body = seal(self._job_key(), "event", dict(more, **{
                "run_id": self.cfg.run_id, "job_id": job_id, "status": status,
                "instance_id": self.instance_id, "sent": time.time()}))
            self.sqs.send_message(QueueUrl=self.cfg.events_queue_url,
                                  MessageBody=body.decode())
        except _AWS_ERRORS as exc:  # the controller also LISTs done/
            logger.warning("could not send the event for job %s: %s", job_id or status, exc)

    def _write_done(self, job_id: str, report: dict) -> bool:
        """Write the signed done report once; False when another attempt already did.

        A report already there that does not verify (planted by someone without the
        run's key) is not a result: it is replaced.
        """
        key = self.layout.done_key(job_id)
        body = seal(self._job_key(), "report", dict(report, run_id=self.cfg.run_id,
                                                   job_id=job_id))
        try:
            self.s3.put_object(Bucket=self.cfg.bucket, Key=key, Body=body, IfNoneMatch="*",
                               ContentType="application/json")
            return True
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if not (code in ("PreconditionFailed", "ConditionalRequestConflict") or
                    exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
                raise
        try:
            there = read_bounded(self.s3, self.cfg.bucket, key, len(body) * 4 + (1 << 20),
                                 what="done report")
            found = unseal(self._job_key(), there, "report")
            if found.get("job_id") == job_id and found.get("run_id") == self.cfg.run_id:
                logger.info("job %s already has a result; this attempt's is dropped", job_id)
                return False
            why = "it names another job"
        except MessageRejected as exc:
            why = str(exc)
        except botocore.exceptions.ClientError as exc:
            if transient(exc):
                raise
            why = f"it could not be read ({exc})"
        logger.warning("job %s: the report already at s3://%s/%s is not one of this run's "
                       "(%s); replacing it", job_id, self.cfg.bucket, key, why)
        self.s3.put_object(Bucket=self.cfg.bucket, Key=key, Body=body,
                           ContentType="application/json")
        return True

    def _delete(self, receipt: str) -> None:
        try:
            self.sqs.delete_message(QueueUrl=self.cfg.jobs_queue_url, ReceiptHandle=receipt)
        except botocore.exceptions.ClientError as exc:
            logger.warning("could not delete a job message: %s", exc)

    # -- one message --------------------------------------------------------------------
    def _take_safely(self, msg) -> bool:
        """:meth:`_take`, for any message at all: whatever it holds, it is rejected,
        logged and deleted, and the jobs running here go on. Only an AWS error that may
        pass is raised (the loop waits it out; the message comes back)."""
        try:
            return self._take(msg)
        except _AWS_ERRORS as exc:
            if transient(exc):
                raise
            logger.error("refused a job message: %s", exc)
        except Exception as exc:  # noqa: BLE001 - one message must not stop the agent
            logger.error("refused a job message that could not be handled (%s: %s)",
                         type(exc).__name__, str(exc)[:300])
        receipt = msg.get("ReceiptHandle") if isinstance(msg, dict) else None
        if isinstance(receipt, str):
            self._delete(receipt)
        return False

    def _take(self, msg: dict) -> bool:
        """Start the job of ``msg`` if it is a genuine job to run here; True when it
        started."""
        receipt = msg["ReceiptHandle"]
        body = None
        try:
            body = open_message(msg.get("Body"), self.layout)
            spec_bytes = read_bounded(self.s3, self.cfg.bucket, body["spec_key"],
                                      MAX_SPEC_BYTES, what="job spec")
            if not verify(self._job_key(), spec_bytes, body["hmac"]):
                raise MessageRejected(f"job {body['job_id']}: the signature does not verify")
            spec = json.loads(spec_bytes)
            if not isinstance(spec, dict) or spec.get("job_id") != body["job_id"]:
                raise MessageRejected("the spec names another job than its message")
        except (MessageRejected, botocore.exceptions.ClientError, ValueError) as exc:
            if isinstance(exc, botocore.exceptions.ClientError):
                if transient(exc):
                    raise  # the message comes back after its visibility timeout
                if body is not None and _refused(exc):
                    self._cannot_run(body["job_id"], exc)
            logger.error("refused a job message: %s", exc)
            self._delete(receipt)
            return False
        job_id = spec["job_id"]
        running = self.running.get(job_id)
        if running is not None:  # this job runs here already: never a second copy
            if msg.get("MessageId") and msg.get("MessageId") == running.message_id:
                running.receipt = receipt  # its own message, back: the newest receipt
            else:
                logger.warning("job %s already runs here: a copy of its message deleted",
                               job_id)
                self._delete(receipt)
            return False
        if self._finished(job_id):
            self._delete(receipt)  # a duplicate of a finished job
            return False
        try:
            attempt = int(msg.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        except (TypeError, ValueError):
            attempt = 1
        if attempt > self.cfg.max_attempts:
            # SQS counts receives, which anyone who may receive can inflate: the starts
            # this run's agents signed are what count
            attempt = self._verified_starts(job_id) + 1
        if attempt > self.cfg.max_attempts:
            report = {"job_id": job_id, "status": "failed", "attempt": attempt,
                      "instance_id": self.instance_id, "started": time.time(),
                      "finished": time.time(), "outputs": [],
                      "error": (f"the job was started {attempt - 1} times and no attempt "
                                "finished: the agents running it died (instance terminated, "
                                "out of memory, or killed). Giving up after max_attempts="
                                f"{self.cfg.max_attempts}.")}
            if self._write_done(job_id, report):
                self._send_event(job_id, "failed")
            self._delete(receipt)
            return False
        n_procs = max(1, int(spec.get("n_procs") or 1))
        mem_gb = float(spec.get("mem_gb") or 0)
        cpus, mem = self._free()
        if self.running and (n_procs > cpus or mem_gb > mem):
            # does not fit beside the jobs running here: put it back as a fresh message,
            # so this receive is not counted as an attempt (max_attempts counts starts)
            try:
                self.sqs.send_message(QueueUrl=self.cfg.jobs_queue_url,
                                      MessageBody=msg["Body"])
            except _AWS_ERRORS as exc:
                # keep the message: visible again at once (this receive then counts as an
                # attempt), or after its visibility timeout if even that fails
                logger.warning("could not put job %s back as a new message (%s); "
                               "returning the message itself", job_id, exc)
                try:
                    self.sqs.change_message_visibility(
                        QueueUrl=self.cfg.jobs_queue_url, ReceiptHandle=receipt,
                        VisibilityTimeout=0)
                except _AWS_ERRORS:
                    pass
                return False
            self._delete(receipt)
            return False
        self._start(spec, receipt, attempt, n_procs, mem_gb, msg.get("MessageId") or "")
        return True

    def _cannot_run(self, job_id: str, exc: BaseException) -> None:
        """A real job this agent is refused access to (a narrow role, a KMS key it may
        not use): a signed failure report, so the controller stops waiting for it
        instead of launching instance after instance. Only a refusal counts: a spec that
        does not exist is no job of the controller's (it writes the spec first)."""
        report = {"status": "failed", "attempt": 1, "instance_id": self.instance_id,
                  "started": time.time(), "finished": time.time(), "outputs": [],
                  "error": (f"the agent on {self.instance_id} may not read this job's spec "
                            f"or signing key ({exc}). Give the instance profile read access "
                            f"to s3://{self.cfg.bucket}/{self.layout.run_prefix} (and the "
                            "bucket's KMS key, if it has one) and SSM GetParameter on the "
                            "run's key; see the IAM policy in the docs.")}
        try:
            if self._write_done(job_id, report):
                self._send_event(job_id, "failed")
        except (_AWS_ERRORS + (MessageRejected,)) as err:
            logger.error("job %s cannot run here (%s), and its failure could not be "
                         "reported either: %s", job_id, exc, err)

    def _signed(self, key: str, kind: str) -> dict | None:
        """The body of the signed document of ``kind`` at ``key``; ``None`` when there is
        none, or it does not verify (planted)."""
        try:
            return unseal(self._job_key(), read_bounded(
                self.s3, self.cfg.bucket, key, 16 * 1024 * 1024, what=kind), kind)
        except MessageRejected as exc:
            logger.warning("ignored s3://%s/%s: %s", self.cfg.bucket, key, exc)
            return None
        except botocore.exceptions.ClientError as exc:
            if transient(exc):
                raise
            return None

    def _finished(self, job_id: str) -> bool:
        """Whether ``job_id`` has a genuine report (one planted there does not count)."""
        report = self._signed(self.layout.done_key(job_id), "report")
        return report is not None and report.get("job_id") == job_id

    def _verified_starts(self, job_id: str) -> int:
        """How many times this run's agents signed that they started ``job_id``."""
        count = 0
        for slot in range(1, self.cfg.max_attempts + 1):
            start = self._signed(self.layout.start_key(job_id, slot), "start")
            if start is None or start.get("job_id") != job_id:
                break
            count = slot
        return count

    def _mark_start(self, job_id: str, attempt: int) -> None:
        """Sign that this agent starts ``job_id`` (the ``attempt``-th start), in the first
        slot free; best effort: a failure here only costs the count its precision."""
        body = seal(self._job_key(), "start", {"job_id": job_id, "run_id": self.cfg.run_id,
                                               "instance_id": self.instance_id,
                                               "at": time.time()})
        for slot in range(max(1, attempt), self.cfg.max_attempts + 2):
            try:
                self.s3.put_object(Bucket=self.cfg.bucket, IfNoneMatch="*", Body=body,
                                   Key=self.layout.start_key(job_id, slot))
                return
            except botocore.exceptions.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status != 412:
                    logger.warning("could not record the start of job %s: %s", job_id, exc)
                    return
                if self._signed(self.layout.start_key(job_id, slot), "start") is None:
                    try:  # planted there: the slot is ours
                        self.s3.put_object(Bucket=self.cfg.bucket, Body=body,
                                           Key=self.layout.start_key(job_id, slot))
                    except botocore.exceptions.ClientError as err:
                        logger.warning("could not record the start of job %s: %s",
                                       job_id, err)
                    return

    def _start(self, spec: dict, receipt: str, attempt: int, n_procs: int,
               mem_gb: float, message_id: str = "") -> None:
        job_id = spec["job_id"]
        jobdir = os.path.join(self.cfg.worker_root, ".jobs", f"{job_id}-{attempt}")
        os.makedirs(jobdir, exist_ok=True)
        spec_path = os.path.join(jobdir, "spec.json")
        with open(spec_path, "w") as fobj:
            json.dump(spec, fobj)
        log_path = os.path.join(jobdir, "log.txt")
        outcome_path = os.path.join(jobdir, "outcome.json")
        env = {"NIPYPE_S3_AGENT_CONFIG": self.cfg.to_json(), "NIPYPE_NO_ET": "1"}
        env.update((name, str(n_procs)) for name in _THREAD_VARS)
        how, proc = "a fork of the agent", None
        if n_procs == 1 and can_fork():
            try:
                proc = ForkedWorker.start(spec_path, outcome_path, log_path, jobdir, env,
                                          forget=self._forget_key)
            except OSError as exc:
                logger.warning("could not fork a worker (%s): starting an interpreter", exc)
        if proc is None:
            how = "a new interpreter"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "nipype_s3.agent.worker", spec_path, outcome_path],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=dict(os.environ, **env), cwd=jobdir)
        now = time.time()
        self.running[job_id] = _Running(job_id, receipt, attempt, proc, log_path,
                                        outcome_path, n_procs, mem_gb, now, now, message_id)
        logger.info("job %s (%s) started in %s, attempt %d", job_id, spec.get("node"), how,
                    attempt)
        self._send_event(job_id, "started")
        self._mark_start(job_id, attempt)

    # -- the loop -----------------------------------------------------------------------
    def _heartbeat(self) -> None:
        now = time.time()
        for run in self.running.values():
            if now - run.last_beat >= self.cfg.heartbeat:
                try:
                    self.sqs.change_message_visibility(
                        QueueUrl=self.cfg.jobs_queue_url, ReceiptHandle=run.receipt,
                        VisibilityTimeout=int(self.cfg.visibility_timeout))
                    run.last_beat = now
                except botocore.exceptions.ClientError as exc:
                    logger.warning("heartbeat for job %s failed: %s", run.job_id, exc)

    def _reap(self) -> bool:
        """Finish the jobs whose worker ended; True when any did.

        A job leaves ``running`` only once its report is written: if AWS does not answer,
        the next round tries again (the log upload and the report are idempotent).
        """
        reaped = False
        for job_id, run in list(self.running.items()):
            code = run.proc.poll()
            if code is None:
                continue
            self._finish(run, code)
            del self.running[job_id]
            reaped = True
        return reaped

    def _finish(self, run: _Running, code: int) -> None:
        log_key = self.layout.log_key(run.job_id, run.attempt)
        tail = _tail(run.log_path)
        try:
            self.s3.upload_file(run.log_path, self.cfg.bucket, log_key)
        except (botocore.exceptions.ClientError, OSError) as exc:
            logger.warning("could not upload the log of job %s: %s", run.job_id, exc)
        outcome, why = None, (f"The worker process for this job died (exit code {code}) "
                              "before reporting; see the log tail below.\n")
        try:
            with open(run.outcome_path) as fobj:
                outcome = json.load(fobj)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a worker killed while writing it, a bad disk
            why = (f"The worker's outcome file {run.outcome_path} could not be read "
                   f"({exc}; exit code {code}); see the log tail below.\n")
        if not isinstance(outcome, dict) or "status" not in outcome:
            outcome = {"job_id": run.job_id, "status": "error", "outputs": [],
                       "started": run.started, "finished": time.time(), "traceback": [why]}
        report = dict(outcome, attempt=run.attempt, instance_id=self.instance_id,
                      log_key=log_key, log_tail=tail, exit_code=code, received=run.started,
                      reported=time.time())
        if self._write_done(run.job_id, report):
            self._send_event(run.job_id, report["status"])
        self._delete(run.receipt)
        self.jobs_done += 1
        logger.info("job %s finished: %s", run.job_id, report["status"])

    def _outage(self, outage: _Outage | None, exc: BaseException) -> _Outage | None:
        """Wait after a failed AWS request; ``None`` when the agent should stop.

        An error that will not pass by itself (a refusal, a missing queue) is raised. A
        passing one is waited out (1 s, doubling up to 30 s) for as long as jobs run, or up
        to ``max_outage`` seconds when none do.
        """
        if not transient(exc):
            raise exc
        now = time.monotonic()
        outage = outage or _Outage(since=now, delay=_RETRY_FIRST)
        if not self.running and now - outage.since > self.cfg.max_outage:
            self.stop_reason = (f"AWS did not answer for {now - outage.since:.0f} s "
                                f"(max_outage): {exc}")
            return None
        logger.warning("an AWS request failed (%s); trying again in %.3g s%s", exc,
                       outage.delay, f" ({len(self.running)} jobs keep running)"
                       if self.running else "")
        time.sleep(outage.delay)
        outage.delay = min(_RETRY_MAX, outage.delay * 2)
        return outage

    def _hand_back(self, why: str) -> None:
        """Stop every job running here and make its message visible again at once, so
        another agent starts it now (not after its visibility timeout): this instance
        is about to go."""
        for run in list(self.running.values()):
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            try:
                self.sqs.change_message_visibility(
                    QueueUrl=self.cfg.jobs_queue_url, ReceiptHandle=run.receipt,
                    VisibilityTimeout=0)
            except _AWS_ERRORS as exc:  # it comes back after its visibility timeout
                logger.warning("could not hand job %s back at once: %s", run.job_id, exc)
            self._send_event(run.job_id, "handed-back")
            logger.warning("job %s handed back to the queue: %s", run.job_id, why)
        self.running.clear()

    def _kill_all(self) -> None:
        for run in self.running.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
        self.running.clear()

    def stop(self, *_args) -> None:
        self._stop = True
        self.stop_reason = self.stop_reason or "signal"

    def run_one(self, job_id: str) -> int:
        """One-job mode (EC2ContainerRun): verify, run, upload, report; then stop."""
        from .onejob import run_one_job

        cfg = self.cfg
        if not valid_job_id(job_id):
            logger.error("refused the job id %r", job_id)
            self.stop_reason = "refused a job id"
            return 3
        spec_key = self.layout.spec_key(job_id)
        try:
            spec_bytes = read_bounded(self.s3, cfg.bucket, spec_key, MAX_SPEC_BYTES,
                                      what="job spec")
            tag = read_bounded(self.s3, cfg.bucket, spec_key + ".hmac", 1024,
                               what="job signature")
            if not verify(self._job_key(), spec_bytes, tag.strip()):
                raise MessageRejected("the signature does not verify")
            spec = json.loads(spec_bytes)
            if not isinstance(spec, dict):
                raise MessageRejected("the spec is not a JSON object")
        except (MessageRejected, ValueError) as exc:
            logger.error("refused job %s: %s", job_id, exc)
            self.stop_reason = "refused an unsigned job"
            return 3
        logger.info("one-job mode: %s (%s)", job_id, spec.get("runtime"))
        workdir = os.path.join(cfg.worker_root, ".onejob", job_id)
        report = run_one_job(cfg, spec, workdir)
        log_key = self.layout.log_key(job_id, 1)
        try:
            self.s3.upload_file(report.pop("log_path"), cfg.bucket, log_key)
        except (botocore.exceptions.ClientError, OSError) as exc:
            logger.warning("could not upload the job log: %s", exc)
        report.update(log_key=log_key, log_tail=_tail(os.path.join(workdir, "job.log")),
                      instance_id=self.instance_id)
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh folder per job, none left
        self._write_done(job_id, report)
        self.jobs_done = 1
        self.stop_reason = "one job done"
        logger.info("one-job mode: %s finished: %s (exit code %s)", job_id, report["status"],
                    report["exit_code"])
        return 0

    def run(self) -> int:
        """Serve until a stop condition; return the process exit status."""
        cfg = self.cfg
        if cfg.extra.get("one_job"):
            return self.run_one(cfg.extra["one_job"])
        os.makedirs(cfg.worker_root, exist_ok=True)
        start = time.monotonic()
        last_work = time.monotonic()
        last_lease = 0.0
        last_notice = 0.0
        last_receive = 0.0
        logger.info("agent on %s serving run %s (%d vCPU, %.1f GiB)", self.instance_id,
                    cfg.run_id, self.vcpus, self.mem_gb)
        versions = runtime_versions()
        refused = mismatch(cfg.versions, versions, "this agent") if cfg.versions else None
        if refused:  # its nodes would not load here: said to the controller, not tried
            logger.error("not serving run %s: %s", cfg.run_id, refused)
            self._send_event("", "agent-refused", versions=versions, why=refused)
            self.stop_reason = "versions differ from the controller's"
            return 1
        # the controller counts instances that booted
        self._send_event("", "agent-up", versions=versions)
        if os.environ.get("NIPYPE_S3_AGENT_FORK", "1") != "0":
            preload()  # one-CPU jobs then start as forks of this process, imports done
        outage: _Outage | None = None
        try:
            while not self._stop:
                now = time.monotonic()
                if now - start > cfg.max_lifetime:
                    self.stop_reason = "max lifetime reached"
                    break
                if now - last_notice >= _NOTICE_EVERY:
                    last_notice = now
                    notice = self.metadata.interruption()
                    if notice is not None:
                        self.stop_reason = (f"spot interruption notice ({notice.get('action')} "
                                            f"at {notice.get('time')})")
                        self._hand_back(self.stop_reason)
                        break
                try:
                    if now - last_lease >= cfg.lease_check:
                        last_lease = now
                        if self._lease_stale():
                            self.stop_reason = "the controller's lease is stale"
                            break
                    freed = self._reap()
                    self._heartbeat()
                except _AWS_ERRORS as exc:
                    outage = self._outage(outage, exc)
                    if outage is None:
                        break
                    continue
                if self.running:
                    last_work = now
                elif cfg.extra.get("one_node") and self.jobs_done:
                    # a node's own Batch job: its node is done, and so is the job
                    self.stop_reason = "its one node done"
                    break
                elif now - last_work > cfg.idle_timeout and outage is None:
                    # idle only by a look at the queue that worked: an outage may have hidden
                    # a job, and stopping then would leave it for an instance yet to boot
                    self.stop_reason = f"idle for {cfg.idle_timeout:.0f} s"
                    break
                cpus, _ = self._free()
                if cpus <= 0 and self.running:
                    time.sleep(0.2)
                    continue
                if self.running and not freed and now - last_receive < _BUSY_RECEIVE_EVERY:
                    # busy with room to spare: finished jobs are reaped every 0.2 s, but
                    # the queue is asked again only every few seconds or when a job ends
                    time.sleep(0.2)
                    continue
                last_receive = now
                wait = 0 if self.running else int(min(cfg.poll_wait, max(
                    0, cfg.idle_timeout - (now - last_work)), cfg.lease_check))
                try:
                    resp = self.sqs.receive_message(
                        QueueUrl=cfg.jobs_queue_url, MaxNumberOfMessages=max(1, min(10, cpus)),
                        WaitTimeSeconds=wait, VisibilityTimeout=int(cfg.visibility_timeout),
                        MessageSystemAttributeNames=["ApproximateReceiveCount"])
                    messages = resp.get("Messages", [])
                    started = sum(bool(self._take_safely(msg)) for msg in messages)
                except _AWS_ERRORS as exc:
                    outage = self._outage(outage, exc)
                    if outage is None:
                        break
                    continue
                if outage is not None:
                    logger.info("AWS answers again after %.0f s", time.monotonic()
                                - outage.since)
                    outage = None
                if messages:
                    if started:  # refused messages are no work: they keep no agent awake
                        last_work = time.monotonic()
                    last_receive = 0.0  # there may be more: ask again at once
                elif self.running:
                    time.sleep(0.2)
        finally:
            if self.running:
                logger.warning("stopping with %d jobs running (%s): killing them",
                               len(self.running), self.stop_reason or "error")
                self._kill_all()
        logger.info("agent stops: %s (%d jobs done)", self.stop_reason, self.jobs_done)
        return 0


def _tail(path: str, lines: int = _LOG_TAIL) -> str:
    """The last ``lines`` lines of a log, reading at most its last 64 KiB."""
    try:
        with open(path, "rb") as fobj:
            size = fobj.seek(0, os.SEEK_END)
            fobj.seek(max(0, size - _TAIL_BYTES))
            data = fobj.read(_TAIL_BYTES)
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if size > _TAIL_BYTES:
        text = text.split("\n", 1)[-1]  # the first line read is likely cut
    return "".join(text.splitlines(keepends=True)[-lines:])


def _refused(exc: botocore.exceptions.ClientError) -> bool:
    """Whether AWS refused the request (403, a KMS key denied), not: it is missing."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code", "")
    return status == 403 or code in ("AccessDenied", "AccessDeniedException",
                                     "KMS.AccessDeniedException", "KMSAccessDenied")


def main(argv=None) -> int:
    """``nipype-s3 agent --config FILE`` (or the config JSON in NIPYPE_S3_AGENT_CONFIG)."""
    import argparse

    parser = argparse.ArgumentParser(prog="nipype-s3 agent",
                                     description="Serve a run's jobs (runs on EC2).")
    parser.add_argument("--config", help="agent configuration (JSON file)")
    parser.add_argument("--self-test", action="store_true",
                        help="print the versions it runs with and exit (nipype-s3 "
                             "check-image runs it inside an image)")
    args = parser.parse_args(argv)
    if args.self_test:
        from ..ec2.jobs import seal as _loaded  # noqa: F401 - the agent's own modules load

        print(json.dumps(dict(runtime_versions(), boto3=boto3.__version__)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.config:
        cfg = AgentConfig.from_file(args.config)
    elif os.environ.get("NIPYPE_S3_AGENT_CONFIG"):
        cfg = AgentConfig.from_json(os.environ["NIPYPE_S3_AGENT_CONFIG"])
    else:
        parser.error("give --config FILE (or set NIPYPE_S3_AGENT_CONFIG)")
    if os.environ.get("NIPYPE_S3_WORKER_ROOT"):
        cfg.worker_root = os.environ["NIPYPE_S3_WORKER_ROOT"]
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, agent.stop)
    return agent.run()
