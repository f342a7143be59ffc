"""BatchPlugin: run a Nipype workflow's nodes on AWS Batch, its agents as Batch jobs.

::

    wf.run(plugin=BatchPlugin(plugin_args={
        "s3_prefix": "s3://my-bucket/runs", "job_queue": "neuro-spot",
        "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/my-pipeline:1.4"}))

Batch owns capacity, spot and quotas; nipype_s3's core does the rest as for EC2Plugin
(the same agent, staging, signed reports, collection and write-back). Each agent is a
Batch job (an array job when several are wanted at once, up to ``max_agents``) running
the image with the controller's own code, fetched from the content store and run only
when its SHA-256 is the one the controller sent; it takes nodes from the run's queue
until it has been idle ``idle_timeout`` seconds, so a short node costs about a second
of dispatch, not Batch's tens of seconds from SUBMITTED to RUNNING. Scheduling stays on
the client, as nipype does it: no ``dependsOn``.

The truth is the signed report in S3: Batch's status is polled (100 ids a call) only
to see agent jobs that die before they start (an image that cannot be pulled) and to
end them all however the run ends (``TerminateJob``, the reason naming the run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time

import botocore.exceptions

from ...agent.config import AgentConfig
from ...exceptions import BatchError, ConfigurationError
from ...remote.collect import plain
from ...remote.plugin import RemotePlugin
from .checks import ChecksMixin
from .jobs import _BOOT, _AgentFleet, _holds
from .settings import BatchSettings

logger = logging.getLogger("nipype.workflow")

__all__ = ["BatchPlugin"]

_FINAL = ("SUCCEEDED", "FAILED")
#: AWS's limits, held before calling (moto holds none)
OVERRIDES_LIMIT = 8192
DESCRIBE_LIMIT = 100
ARRAY_LIMIT = 10_000
#: seconds between two SubmitJob calls of a run (at most 20 a second)
SUBMIT_GAP = 0.05

class BatchPlugin(ChecksMixin, RemotePlugin):
    """Execute a workflow's nodes on AWS Batch (see the module docstring)."""

    settings_class = BatchSettings

    # -- before anything is submitted ---------------------------------------------------
    def run(self, graph, config, updatehash=False):
        self._prerun_check(graph)  # before any AWS call: a bad node makes nothing
        return super().run(graph, config, updatehash=updatehash)

    def _start_run(self) -> None:
        s = self.settings
        session = self._open_run()
        self.batch = self._client(session, "batch")
        queues = self._call(self.batch.describe_job_queues, jobQueues=[s.job_queue])
        if not queues.get("jobQueues"):
            raise ConfigurationError(
                f"There is no Batch job queue {s.job_queue!r} in {self.region}: create one "
                "(nipype-s3 batch setup, or the console), or name yours in "
                "plugin_args['job_queue']. Nothing was submitted.")
        queue = queues["jobQueues"][0]
        if queue.get("state") != "ENABLED" or queue.get("status") not in ("VALID", None):
            raise ConfigurationError(
                f"The Batch job queue {s.job_queue!r} is {queue.get('state')} and "
                f"{queue.get('status')} ({plain(queue.get('statusReason', ''), 200)}): it "
                "takes no jobs. Enable it (aws batch update-job-queue --state ENABLED), or "
                "name another in plugin_args['job_queue']. Nothing was submitted.")
        if s.job_definition:
            self._check_job_definition(s.job_definition)
        self._check_capacity(queue)
        logger.info("BatchPlugin: run %s, files in s3://%s/%s, up to %d agents on %s",
                    self.run_id, self.layout.bucket, self.layout.run_prefix, s.max_agents,
                    s.job_queue)
        self._open_queues()
        self._fleets: dict[str, _AgentFleet] = {}
        self._last_describe = self._last_submit = 0.0
        self._fleet(s.instance_type, s.image)
        self._start_lease()

    # -- where a job goes --------------------------------------------------------------
    def _fleet(self, instance_type: str, image: str | None = None) -> _AgentFleet:
        fleet = self._fleets.get(image or "")
        if fleet is not None:
            return fleet
        s = self.settings
        kind = "jobs" if image == s.image else \
            "jobs-" + hashlib.sha256(str(image).encode()).hexdigest()[:10]
        queue = self._jobs_queue(kind)
        config = self._agent_config(queue, s.vcpus, s.mem_gb)
        definition = s.job_definition if s.job_definition and image == s.image else \
            self._job_definition(image)
        fleet = _AgentFleet(image, queue, definition, config.to_json(), s.vcpus, s.mem_gb)
        self._fleets[fleet.key] = fleet
        return fleet

    def _fleet_for(self, node, node_args: dict, n_procs: int, mem_gb: float):
        """A node that asks (``{"batch": "job"}``) gets a Batch job of its own, sized
        for it, whose agent runs that one node and stops: Batch's own scheduling, spot
        placement and limits then apply to it."""
        if node_args.get("batch") != "job":
            return super()._fleet_for(node, node_args, n_procs, mem_gb)
        s = self.settings
        image = node_args.get("image") or s.image
        base = self._fleet(s.instance_type, image)
        name = f"{node.fullname}-{len(self._fleets)}"
        kind = "node-" + hashlib.sha256(name.encode()).hexdigest()[:12]
        queue = self._jobs_queue(kind)
        config = AgentConfig.from_json(base.config_json)
        config.jobs_queue_url, config.vcpus = queue, n_procs
        config.mem_gb = max(mem_gb, 0.5)
        config.extra = dict(config.extra, one_node=True)  # its one node, then it stops
        fleet = _AgentFleet(image, queue, base.job_definition, config.to_json(), n_procs,
                            config.mem_gb, node=name, gpus=int(node_args.get("gpus", 0)))
        self._fleets[fleet.key] = fleet
        return fleet

    def _job_definition(self, image: str | None) -> str:
        """The job definition for agents of ``image``, named by the digest of what it
        holds (image, resources, role): registered once, reused by later runs."""
        if not image:
            raise ConfigurationError("BatchPlugin: a node without an image needs the run's "
                                     "plugin_args['image'] (or 'job_definition').")
        s = self.settings
        props = {"image": image, "command": ["python3", "-c", _BOOT],
                 "resourceRequirements": [
                     {"type": "VCPU", "value": str(s.vcpus)},
                     {"type": "MEMORY", "value": str(int(s.mem_gb * 1024))}]}
        if s.job_role_arn:
            props["jobRoleArn"] = s.job_role_arn
        name = "nipype-s3-" + hashlib.sha256(json.dumps(
            props, sort_keys=True).encode()).hexdigest()[:16]
        found = self._call(self.batch.describe_job_definitions, jobDefinitionName=name,
                           status="ACTIVE").get("jobDefinitions", [])
        # a revision is reused only when it holds exactly this (anyone who may register
        # job definitions can add a revision under a name they can work out)
        same = [d for d in found if _holds(d, props)]
        if same:
            return max(same, key=lambda d: d["revision"])["jobDefinitionArn"]
        made = self._call(self.batch.register_job_definition, jobDefinitionName=name,
                          type="container", containerProperties=props,
                          tags={"nipype-s3:image": image[:256]})
        logger.info("BatchPlugin: registered job definition %s for %s", name, image)
        return made["jobDefinitionArn"]

    # -- AWS, politely ---------------------------------------------------------------
    def _call(self, method, **kwargs):
        """One Batch call, backed off with jitter while Batch says TooManyRequests."""
        delay = 0.5
        for attempt in range(8):
            try:
                return method(**kwargs)
            except botocore.exceptions.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "")
                if code not in ("TooManyRequestsException", "ThrottlingException") or \
                        attempt == 7:
                    raise
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    # -- agents -----------------------------------------------------------------------
    def _scale(self) -> None:
        now = time.time()
        if now - self._last_describe >= 3.0:
            self._last_describe = now
            self._describe_agents()
            if self._check_agent_failures():
                return
        waiting = self._outstanding()
        if not waiting:
            return
        live_all = sum(1 for f in self._fleets.values() if not f.node
                       for info in f.jobs.values() if info["status"] not in _FINAL)
        for fleet in list(self._fleets.values()):
            mine = [j for j in waiting if (j.fleet or "") == fleet.key]
            if not mine:
                continue
            live = sum(1 for info in fleet.jobs.values() if info["status"] not in _FINAL)
            if fleet.node:  # a node's own job: one at a time, whatever max_agents says
                if not live:
                    self._submit(fleet, 1)
                continue
            cpus = sum(j.n_procs for j in mine)
            wanted = min(int(self.settings.max_agents) - live_all,
                         max(1, math.ceil(cpus / fleet.vcpus)) - live)
            if wanted > 0:
                self._submit(fleet, wanted)
                live_all += wanted

    def _submit(self, fleet: _AgentFleet, count: int) -> None:
        """Submit ``count`` agents of ``fleet``; a refusal stops the run saying why."""
        try:
            self._submit_now(fleet, count)
        except botocore.exceptions.ClientError as exc:
            err = exc.response.get("Error", {})
            self._stop_run(BatchError(
                f"AWS Batch refused to submit the agents of run {self.run_id} to job queue "
                f"{self.settings.job_queue}: {plain(err.get('Code'))}: "
                f"{plain(err.get('Message'), 300)}. Check the job queue (enabled, its "
                "compute environments valid) and the job definition "
                f"({fleet.job_definition}), and that these credentials may submit to them "
                "(nipype-s3 policy batch-controller)."), "Batch refused to run its agents")

    def _submit_now(self, fleet: _AgentFleet, count: int) -> None:
        env = [{"name": "NIPYPE_S3_AGENT_CONFIG", "value": fleet.config_json},
               {"name": "NIPYPE_NO_ET", "value": "1"},
               {"name": "OMP_NUM_THREADS", "value": "1"}]
        if self._package_uri:
            env += [{"name": "NIPYPE_S3_PACKAGE", "value": self._package_uri},
                    {"name": "NIPYPE_S3_PACKAGE_SHA256", "value": self._package_sha256}]
        overrides = {"environment": env}
        if fleet.node:  # sized for its node
            overrides["resourceRequirements"] = [
                {"type": "VCPU", "value": str(fleet.vcpus)},
                {"type": "MEMORY", "value": str(int(fleet.mem_gb * 1024))}] + (
                [{"type": "GPU", "value": str(fleet.gpus)}] if fleet.gpus else [])
        size = len(json.dumps(overrides, separators=(",", ":")))
        if size > OVERRIDES_LIMIT:
            raise ConfigurationError(
                f"The agents' containerOverrides would be {size} characters; AWS Batch "
                f"takes {OVERRIDES_LIMIT}. Shorten the s3_prefix or the queue names.")
        what = "node" if fleet.node else "agents"
        kwargs = {"jobName": f"nipype-s3-{self.run_id}-{what}", "jobQueue":
                  self.settings.job_queue, "jobDefinition": fleet.job_definition,
                  "containerOverrides": overrides,
                  "tags": dict(self.settings.tags, **{"nipype-s3:run": self.run_id})}
        count = min(count, ARRAY_LIMIT)
        if count >= 2:
            kwargs["arrayProperties"] = {"size": count}
        wait = self._last_submit + SUBMIT_GAP - time.monotonic()
        if wait > 0:  # paced: far below Batch's SubmitJob rate, whatever the burst
            time.sleep(wait)
        self._last_submit = time.monotonic()
        job_id = self._call(self.batch.submit_job, **kwargs)["jobId"]
        ids = [f"{job_id}:{i}" for i in range(count)] if count >= 2 else [job_id]
        now = time.time()
        for agent in ids:
            fleet.jobs[agent] = {"status": "SUBMITTED", "submitted": now, "parent": job_id}
        self.peak = max(self.peak, sum(1 for f in self._fleets.values()
                                       for i in f.jobs.values() if i["status"] not in _FINAL))
        logger.info("BatchPlugin: SubmitJob %s x%d on %s%s", job_id, count,
                    self.settings.job_queue, f" ({fleet.image})" if fleet.image else "")

    def _describe_agents(self) -> None:
        """Batch's word on the agent jobs not yet over (100 ids a call)."""
        infos = {agent: info for f in self._fleets.values() for agent, info in f.jobs.items()
                 if info["status"] not in _FINAL}
        ids = sorted(infos)
        for start in range(0, len(ids), DESCRIBE_LIMIT):
            found = self._call(self.batch.describe_jobs,
                               jobs=ids[start:start + DESCRIBE_LIMIT]).get("jobs", [])
            for job in found:
                info = infos.get(job["jobId"])
                if info is None:
                    continue
                info["status"] = job.get("status", info["status"])
                info["reason"] = plain(job.get("statusReason", ""), 300)  # anyone's text
                info["stream"] = (job.get("container") or {}).get("logStreamName") or \
                    info.get("stream")
                for mark in ("startedAt", "stoppedAt"):
                    if job.get(mark):
                        info[mark[:-2]] = job[mark] / 1000.0

    def _check_agent_failures(self) -> bool:
        """Stop when agent jobs keep ending before their agent started (an image that
        cannot be pulled, a role that may not read the run), saying what Batch said."""
        dead = [(agent, info) for f in self._fleets.values() for agent, info in f.jobs.items()
                if info["status"] in _FINAL and agent not in self._booted]
        if len(dead) < self.settings.max_boot_failures or self._fatal is not None:
            return False
        images = sorted({f.image for f in self._fleets.values() if f.image})
        reasons = sorted({info.get("reason") or "no reason given" for _, info in dead})
        self._stop_run(BatchError(
            f"{len(dead)} agent jobs of run {self.run_id} ended before their agent started "
            f"({', '.join(a for a, _ in dead[:3])}); Batch says: {'; '.join(reasons[:3])}. "
            f"Check the image ({', '.join(images) or 'the job definition'}: nipype-s3 "
            "check-image IMAGE), that the job queue's compute environments can run it, "
            "and that the job role may read the run's files, queues and key (nipype-s3 "
            "policy agent)."), "its agent jobs ended before their agent started")
        return True

    # -- what the core asks -------------------------------------------------------------
    def _launched(self, agent_id: str) -> bool:
        return any(agent_id in fleet.jobs for fleet in self._fleets.values())

    def _agent_up(self, agent_id: str) -> bool:
        for fleet in self._fleets.values():
            info = fleet.jobs.get(agent_id)
            if info is not None:
                self._boot_seconds.append(time.time() - info["submitted"])
                return True
        return False

    def _agent_name(self, agent_id: str) -> str:
        for fleet in self._fleets.values():
            if agent_id in fleet.jobs and fleet.image:
                return f"the agent job {agent_id} (image {fleet.image})"
        return f"the agent job {agent_id}"

    def _end_steps(self) -> list:
        return [self._terminate_agents, self._delete_queues]

    _AGENT_KIND = "Batch job"

    def _where_ran(self, agent_id: str) -> str:
        """The agent's Batch job and its CloudWatch log stream (only for this run's own
        agent jobs: the id in a report is only a claim)."""
        info = next((f.jobs[agent_id] for f in self._fleets.values()
                     if agent_id in f.jobs), None)
        if info is None:
            return ""
        if not info.get("stream"):
            try:  # one call: a crash file is not worth waiting on Batch for
                found = self.batch.describe_jobs(jobs=[agent_id]).get("jobs", [])
                info["stream"] = (found[0].get("container") or {}).get("logStreamName") \
                    if found else None
            except (botocore.exceptions.BotoCoreError,
                    botocore.exceptions.ClientError) as exc:
                self._log.debug("DescribeJobs %s: %s", agent_id, exc)
        stream = plain(info.get("stream"), 300) if info.get("stream") else None
        log = (f"CloudWatch Logs group /aws/batch/job, stream {stream}" if stream else
               "its CloudWatch log stream is not known yet (DescribeJobs gives it)")
        return f"[nipype_s3] job queue {self.settings.job_queue}; {log}\n"

    def _terminate_agents(self) -> None:
        """End every job of the run not yet over, whatever ended the run: those it
        submitted, and any other job of the run's names in its queue (a submit that
        failed after Batch took it, or was sent twice)."""
        from ...ops import run_batch_jobs

        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if not fleets:
            return
        try:
            self._describe_agents()
        except botocore.exceptions.ClientError as exc:  # end them all, then
            logger.warning("BatchPlugin: could not describe the agent jobs: %s", exc)
        parents = {info["parent"] for f in fleets for info in f.jobs.values()
                   if info["status"] not in _FINAL}
        parents |= set(run_batch_jobs(self.batch, self.run_id, [self.settings.job_queue]))
        failed = []
        for parent in sorted(parents):
            try:  # each on its own: one refusal must not keep the others running
                self._call(self.batch.terminate_job, jobId=parent,
                           reason=f"nipype-s3 run {self.run_id} ended")
            except botocore.exceptions.ClientError as exc:
                failed.append(f"{parent} ({exc.response.get('Error', {}).get('Code')})")
        if parents:
            logger.info("BatchPlugin: TerminateJob (run %s): %s", self.run_id,
                        ", ".join(sorted(parents)))
        now = time.time()
        for fleet in fleets:
            for info in fleet.jobs.values():
                if info["status"] not in _FINAL:
                    info["status"], info["stopped"] = "FAILED", now
        if failed:
            raise BatchError(
                f"BatchPlugin could not terminate {len(failed)} job(s) of run {self.run_id}: "
                f"{', '.join(failed[:5])}. They stop when the run's lease expires; end "
                f"them now with: nipype-s3 cleanup --run {self.run_id}")

    def _write_cost_report(self) -> None:
        """vCPU-seconds and GiB-seconds of the agent jobs (from Batch's start and stop
        times), as EC2Plugin's report gives instance-seconds."""
        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if not fleets:
            return
        end = time.time()
        jobs, vcpu_s, gib_s = [], 0.0, 0.0
        for fleet in fleets:
            for agent, info in sorted(fleet.jobs.items()):
                seconds = max(0.0, info.get("stopped", end) - info["started"]) \
                    if info.get("started") else 0.0
                vcpu_s += seconds * fleet.vcpus
                gib_s += seconds * fleet.mem_gb
                jobs.append({"job_id": agent, "status": info["status"],
                             "seconds": round(seconds, 1), "vcpus": fleet.vcpus,
                             "image": fleet.image})
        self._store_cost_report(end, {
            "backend": "batch", "agent_jobs": jobs, "vcpu_seconds": round(vcpu_s, 1),
            "gib_seconds": round(gib_s, 1), "peak_agents": self.peak,
            "note": "vCPU- and GiB-seconds of the agent jobs (Batch's start and stop "
                    "times); the compute environment's instances are billed by EC2",
        })
        logger.info("BatchPlugin: run %s: %d agent jobs, %.0f vCPU-s, %.0f s busy (s3://%s/%s)",
                    self.run_id, len(jobs), vcpu_s, self._busy_seconds, self.layout.bucket,
                    self.layout.cost_key)
