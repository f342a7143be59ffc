"""The nipype plugin every remote backend subclasses: a run's lifecycle (lease, key,
teardown however it ends), submission, polling the events queue, and the failure of
jobs that cannot run. A backend adds where jobs go and what runs them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions
from nipype.pipeline.plugins.base import SGELikeBatchManagerBase

from ..agent.runner import run_node, write_failure_result
from ..ec2.jobs import (
    MAX_MESSAGE_BYTES,
    MessageRejected,
    RunLayout,
    job_key_parameter,
    seal,
    unseal,
)
from ..exceptions import ConfigurationError, EC2Error
from ..s3.delete import abort_incomplete_uploads
from ..s3.errors import translate
from ..secrets import scrub_tree, secret_values
from .collect import CollectMixin
from .costs import CostMixin
from .job import _Job
from .opening import OpeningMixin
from .placement import PlacementMixin
from .staging import StagingMixin
from .versions import mismatch, runtime_versions

logger = logging.getLogger("nipype.workflow")

#: nipype's loop sleeps this long between rounds in graphs up to _FAST_LOOP_NODES nodes
_FAST_LOOP_SLEEP, _FAST_LOOP_NODES = 0.05, 2000
#: the events queue is read every _QUICK_POLL s while at most _FEW_JOBS jobs are out
_QUICK_POLL, _FEW_JOBS = 0.25, 10


class RemotePlugin(OpeningMixin, PlacementMixin, StagingMixin, CollectMixin, CostMixin,
                   SGELikeBatchManagerBase):
    """Run a workflow's nodes remote (see the module docstring).

    A backend subclasses it with ``settings_class`` (its ``plugin_args``) and what
    differs: ``_start_run`` (its resources), ``_fleet(instance_type, image)`` (where a job
    goes), ``_scale`` (capacity), ``_end_steps`` (what it ends).
    """

    settings_class = None

    def __init__(self, plugin_args=None, **kwargs):
        name = type(self).__name__
        if plugin_args is not None and not isinstance(plugin_args, dict):
            raise ConfigurationError(
                f"{name}(plugin_args=...) takes a dict, e.g. "
                f"{name}(plugin_args={{'s3_prefix': 's3://my-bucket/nipype-runs'}}), not "
                f"{plugin_args!r}.")
        plugin_args = dict(plugin_args or {})
        plugin_args.update(kwargs)
        self.settings = self.settings_class.from_plugin_args(plugin_args)
        super().__init__(template="", plugin_args=plugin_args)
        self._jobs: dict[int, _Job] = {}
        self._by_job_id: dict[str, _Job] = {}
        self._write_back_lock = threading.Lock()
        self._next_taskid = 0
        self._fatal: BaseException | None = None
        #: what this controller runs: an agent that cannot match it refuses its nodes
        self._versions = runtime_versions()
        self.run_id: str | None = None
        self.layout: RunLayout | None = None
        self.stats = {"submitted": 0, "local": 0, "remote_done": 0, "polls": 0}
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._last_poll = 0.0
        self._last_scan = 0.0
        self._last_scale = 0.0
        self._busy_seconds = 0.0
        #: one entry per remote job collected: when it was submitted, taken by an agent,
        #: its node started and ended, the agent reported, and the controller saw it
        #: (seconds since the epoch; instance clocks are NTP-synchronised on EC2)
        self.timings: list[dict] = []
        self.cost_report: dict | None = None
        self.peak = 0
        self._fleets = {}
        self._shapes: dict[str, tuple[int, float]] = {}
        self._leased = False
        self._booted: set[str] = set()
        self._progress = 0.0
        self._senders: ThreadPoolExecutor | None = None
        self._reset()

    # -- run lifecycle ------------------------------------------------------------------
    def run(self, graph, config, updatehash=False):
        """Run the graph; whatever happens, terminate the run's instances."""
        try:
            self._start_run()
            # nipype's loop sleeps poll_sleep_duration (2 s by default) between rounds: a
            # round per level of the graph, seconds for a re-run with nothing to do. Its
            # rounds are cheap here (AWS is asked at the pace of _poll_interval), so the
            # loop turns fast while the graph is not huge.
            self._user_poll = float(config["execution"]["poll_sleep_duration"])
            if len(graph) <= _FAST_LOOP_NODES:
                config = dict(config, execution=dict(
                    config["execution"], poll_sleep_duration=min(self._user_poll,
                                                                 _FAST_LOOP_SLEEP)))
            try:
                result = super().run(graph, config, updatehash=updatehash)
            except RuntimeError as err:
                if self._fatal is not None:  # the infrastructure failed, not a node
                    raise self._fatal from err
                raise
            if self._fatal is not None:
                raise self._fatal
            return result
        finally:
            self._finish_run()

    # -- what a backend gives -----------------------------------------------------------
    def _agent_up(self, agent_id: str) -> bool:
        """Whether ``agent_id``, which says (signed) that it started, is one of this
        run's (the backend knows what it launched); it may note the boot time."""
        raise NotImplementedError

    @property
    def _log(self) -> logging.LoggerAdapter:
        """nipype's workflow logger, each line saying which plugin ("EC2Plugin: ...")."""
        return _Named(logger, {"plugin": type(self.settings)._PLUGIN})

    def _launched(self, agent_id: str) -> bool:
        """Whether ``agent_id`` is one this run started (events naming any other agent
        change nothing)."""
        raise NotImplementedError

    def _agent_name(self, agent_id: str) -> str:
        """How an error names an agent (with its image, if any)."""
        return f"the agent on {agent_id}"

    def _end_steps(self) -> list:
        """What the backend ends when the run ends (instances, queues), however it ends."""
        return []

    #: what an agent runs on, as a crash file names it
    _AGENT_KIND = "instance"

    def _where_ran(self, agent_id: str) -> str:
        """Lines a failed node's crash file adds about where its agent ran (the
        backend's own logs), each starting ``[nipype_s3]``; empty where there is none."""
        return ""

    def _reset(self) -> None:
        """What one run learns, forgotten before the next: one plugin object can run
        workflows one after the other, as ``Linear`` can."""
        self._jobs, self._by_job_id, self._messages = {}, {}, {}
        self._fatal = None
        self.stats = {"submitted": 0, "local": 0, "remote_done": 0, "polls": 0}
        self.timings, self.cost_report, self.peak = [], None, 0
        self._busy_seconds, self._progress = 0.0, 0.0
        self._booted = set()
        self._boot_seconds: list[float] = []
        self._last_poll = self._last_scale = 0.0
        self._last_scan = time.monotonic()  # the first LIST of done/ after one interval

    def _write_lease(self) -> None:
        # signed: an unsigned lease (anyone can write the run's prefix) cannot stop the
        # agents, nor keep them alive after the controller is gone
        body = seal(self._job_key, "lease", {
            "run_id": self.run_id, "expires": time.time() + self.settings.lease_timeout,
            "renewed": time.time()})
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.lease_key, Body=body)

    def _lease_loop(self) -> None:
        interval = max(0.5, self.settings.lease_timeout / 4)
        while not self._lease_stop.wait(interval):
            try:
                self._write_lease()
            except Exception as exc:  # keep trying: agents tolerate a missed renewal
                self._log.warning("could not renew the lease: %s", exc)

    def _finish_run(self) -> None:
        self._lease_stop.set()
        if self._senders is not None:  # jobs not yet sent are not sent...
            self._senders.shutdown(wait=False, cancel_futures=True)
        errors = []

        def step(fn):
            try:
                fn()
            except Exception as exc:
                errors.append(exc)
                self._log.error("cleanup step %s failed: %s", fn.__name__, exc)

        # independent requests at once (a re-run's teardown was seconds of round trips);
        # the cost report and the sweep of uploads once the instances are ended
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="nipype-s3-end") as pool:
            list(pool.map(step, (self._expire_lease, self._delete_job_key)
                          + tuple(self._end_steps())))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="nipype-s3-end") as pool:
            list(pool.map(step, (self._write_cost_report, self._abort_uploads)))
        errors.sort(key=lambda exc: not isinstance(exc, EC2Error))
        if self._senders is not None:
            # ...and those being sent are waited for only once the instances are ended:
            # a send stuck in retries must not keep them running (and billed)
            self._senders.shutdown(wait=True)
            self._senders = None  # the next run (the same plugin object) makes its own
        if errors and isinstance(errors[0], EC2Error):
            self._log.error("instances of run %s may still run: %s", self.run_id,
                         errors[0])

    def _expire_lease(self) -> None:
        if not self._leased:  # the run stopped before its lease was written: nothing to end
            return
        body = seal(self._job_key, "lease", {"run_id": self.run_id, "expires": 0,
                                             "finished": time.time()})
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.lease_key, Body=body)

    def _delete_job_key(self) -> None:
        if self.run_id and getattr(self, "ssm", None) is not None:
            try:
                self.ssm.delete_parameter(Name=job_key_parameter(self.run_id))
            except botocore.exceptions.ClientError:
                pass

    def _abort_uploads(self) -> None:
        """Abort the multipart uploads left below the run's prefix (an agent killed in
        the middle of storing a large file leaves its parts, billed as storage)."""
        if not self._leased:
            return
        aborted = abort_incomplete_uploads(self.s3, self.layout.bucket,
                                           self.layout.run_prefix)
        if aborted:
            self._log.info("aborted %d incomplete upload(s) below s3://%s/%s",
                        len(aborted), self.layout.bucket, self.layout.run_prefix)

    def _submit_job(self, node, updatehash=False):
        taskid = self._next_taskid
        self._next_taskid += 1
        node_dir = node.output_dir()
        self._pending[taskid] = node_dir
        self.stats["submitted"] += 1
        if self._runs_locally(node):
            job = _Job(taskid, f"local-{taskid}", node, node_dir, time.time(), 1, 0.0,
                       remote=False, done=True)
            self._jobs[taskid] = job
            self.stats["local"] += 1
            self._log.info("running %s on the controller", node.fullname)
            run_node(node, updatehash=updatehash)
            scrub_tree(node_dir, secret_values())
            return taskid
        if self._fatal is not None:  # no instance can run it: fail it as a node would
            job = _Job(taskid, f"unsent-{taskid}", node, node_dir, time.time(), 1, 0.0)
            self._jobs[taskid] = job
            self._fail_unrunnable(job)
            return taskid
        try:
            job = self._send(taskid, node, node_dir, updatehash)
        except botocore.exceptions.ClientError as exc:
            raise translate(exc, bucket=self.layout.bucket, key=self.layout.run_prefix,
                            action="submit a job to") from exc
        self._jobs[taskid] = job
        self._by_job_id[job.job_id] = job
        return taskid

    # -- polling ------------------------------------------------------------------------
    def _is_pending(self, taskid):
        job = self._jobs[taskid]
        if job.done:
            return False
        self._check_sent(job)
        self._poll()
        return not job.done

    def _poll_interval(self) -> float:
        """Seconds between looks at the events queue: quick while few jobs are out (a
        short node's result is seen at once), at most 1 s (half of nipype's poll
        interval) when many are."""
        if len(self._outstanding()) <= _FEW_JOBS:
            return _QUICK_POLL
        return max(_QUICK_POLL, min(1.0, getattr(self, "_user_poll", 1.0) / 2))

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self._poll_interval():
            return
        self._last_poll = now
        self.stats["polls"] += 1
        self._drain_events()
        if now - self._last_scan >= self.settings.done_scan_interval:
            self._last_scan = now
            self._scan_done()
        if now - self._last_scale >= self.settings.scale_interval:
            self._last_scale = now
            self._scale()

    def _outstanding(self) -> list[_Job]:
        return [j for j in self._by_job_id.values() if not j.done]

    def _stop_run(self, error: BaseException, why: str) -> None:
        self._fatal = error
        self._log.error("%s", error)
        self._fail_outstanding(why)

    def _fail_outstanding(self, why: str) -> None:
        """The run cannot go on: every job not done yet fails (those not sent yet are not
        sent)."""
        for job in self._outstanding():
            if job.sending is not None:
                job.sending.cancel()
            self._fail_unrunnable(job, why)

    def _fail_unrunnable(self, job: _Job, why: str | None = None) -> None:
        """Give a job that can never run a crash result naming the run's failure."""
        why = why or f"run {self.run_id} stopped before it could run (the error above)"
        write_failure_result(job.node, [
            f"{type(self._fatal).__name__}: {self._fatal}\n",
            f"[nipype_s3] node {job.node.fullname} was not run: {why}.\n"])
        job.done = True

    def _drain_events(self) -> None:
        """Read the events queue: agents that booted, jobs started and finished.

        An event counts only once its signature verifies with the run's key (an agent
        wrote it); any other message is logged and deleted. A finished job is then
        collected from its report, which is verified again on its own.
        """
        for _ in range(10):
            resp = self.sqs.receive_message(QueueUrl=self.events_queue,
                                            MaxNumberOfMessages=10, WaitTimeSeconds=0)
            messages = resp.get("Messages", [])
            if not messages:
                return
            finished = []
            for msg in messages:
                try:
                    event = unseal(self._job_key, msg.get("Body") or "", "event",
                                   limit=MAX_MESSAGE_BYTES)
                    if event.get("run_id") != self.run_id:
                        raise MessageRejected(f"an event of run {event.get('run_id')!r}")
                except MessageRejected as exc:
                    self._log.warning("ignored a message on the events queue: %s",
                                   exc)
                    continue
                status, iid = event.get("status"), event.get("instance_id")
                if status in ("agent-up", "agent-refused") and self._fatal is None and \
                        isinstance(iid, str) and self._launched(iid):
                    said = _versions_said(event.get("versions"))
                    why = mismatch(self._versions, said, self._agent_name(iid))
                    if why or status == "agent-refused":
                        self._stop_run(ConfigurationError(
                            why or f"the agent on {iid} refused this run's nodes (it runs "
                                   f"{said}; this controller {self._versions})"),
                            "its agents cannot run this controller's nodes")
                        continue
                if status == "agent-up":
                    # once per agent of this run (a replayed event changes nothing)
                    if isinstance(iid, str) and iid not in self._booted and \
                            self._agent_up(iid):
                        self._booted.add(iid)
                        self._progress = time.time()
                    continue
                job_id = event.get("job_id")
                job = self._by_job_id.get(job_id) if isinstance(job_id, str) else None
                if job is None or job.done:
                    continue
                self._progress = time.time()
                if status == "started":
                    job.started = job.started or time.time()
                elif status == "handed-back":  # its instance is going: it runs again
                    job.started = None
                elif job not in finished:
                    job.reported = True
                    finished.append(job)
            self._collect(finished)
            self.sqs.delete_message_batch(QueueUrl=self.events_queue, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages)])
            if len(messages) < 10:
                return


def _versions_said(versions) -> dict | None:
    """The versions an agent's event gives, each a short version string (anything else,
    "?"): they go into an error message."""
    import re

    if not isinstance(versions, dict):
        return None
    return {name: (value if isinstance(value, str) and
                   re.fullmatch(r"[0-9A-Za-z.+-]{1,40}", value) else "?")
            for name, value in versions.items()
            if name in ("python", "nipype", "nibabel", "boto3")}


class _Named(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['plugin']}: {msg}", kwargs
