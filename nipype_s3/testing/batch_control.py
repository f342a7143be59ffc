"""LocalBatch's control plane and its jobs without Docker (see
:mod:`nipype_s3.testing.batch`): what Batch refuses or keeps that moto does not, and a
job's command in the instances' sandbox where no Docker engine runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

__all__ = ["ControlPlaneMixin", "SandboxJobsMixin"]

_FINAL = ("SUCCEEDED", "FAILED")


def _error(code: str, message: str, status: int = 400):
    body = json.dumps({"__type": code, "message": message}).encode()
    return status, body, "application/json"


def _ok(data: dict):
    return 200, json.dumps(data).encode(), "application/json"


class ControlPlaneMixin:
    """Compute environments and job queues as Batch manages them."""

    def _compute_environments(self, path: str, body: bytes):
        """moto's UpdateComputeEnvironment changes only the state and service role: the
        compute resources it is given (maxvCpus, ...) are kept here and shown in
        DescribeComputeEnvironments, as Batch would."""
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return _error("ClientException", "the request is not JSON")
        batch = self.cloud.client("batch", direct=True)
        if path.endswith("describecomputeenvironments"):
            kwargs = {k: v for k, v in params.items()
                      if k in ("computeEnvironments", "maxResults", "nextToken")}
            found = batch.describe_compute_environments(**kwargs)
            found.pop("ResponseMetadata", None)
            for env in found.get("computeEnvironments", []):
                env.setdefault("computeResources", {}).update(
                    self._ce_updates.get(env["computeEnvironmentName"], {}))
            return _ok(found)
        name = str(params.get("computeEnvironment", "")).rsplit("/", 1)[-1]
        found = batch.describe_compute_environments(
            computeEnvironments=[name])["computeEnvironments"]
        if not found:
            return _error("ClientException", f"Compute environment {name} does not exist")
        rest = {k: v for k, v in params.items() if k in ("state", "serviceRole")}
        if rest:
            batch.update_compute_environment(computeEnvironment=name, **rest)
        if params.get("computeResources"):
            with self._lock:
                self._ce_updates.setdefault(name, {}).update(params["computeResources"])
        return _ok({"computeEnvironmentName": name,
                    "computeEnvironmentArn": found[0]["computeEnvironmentArn"]})

    def _refused_delete(self, path: str, body: bytes):
        """Batch deletes a job queue or compute environment only once it is DISABLED, and
        a compute environment only once no job queue uses it; moto deletes either at
        once. The refusal, or None (moto then deletes)."""
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return None
        batch = self.cloud.client("batch", direct=True)
        if path.endswith("deletejobqueue"):
            name = params.get("jobQueue", "")
            found = batch.describe_job_queues(jobQueues=[name])["jobQueues"]
            if found and found[0].get("state") != "DISABLED":
                return _error("ClientException", f"Cannot delete, job queue {name} is "
                                                 "ENABLED: disable it first")
            if found:  # Batch ends the jobs still in a queue it deletes
                arn = found[0]["jobQueueArn"]
                with self._lock:
                    live = [j for j in self.jobs.values()
                            if j["jobQueue"] == arn and j["status"] not in _FINAL]
                for job in live:
                    self._stop(job, f"Job queue {found[0]['jobQueueName']} was deleted",
                               exit_code=None)
            return None
        name = params.get("computeEnvironment", "")
        found = batch.describe_compute_environments(
            computeEnvironments=[name])["computeEnvironments"]
        if not found:
            return None
        if found[0].get("state") != "DISABLED":
            return _error("ClientException", f"Cannot delete, compute environment {name} "
                                             "is ENABLED: disable it first")
        arn = found[0]["computeEnvironmentArn"]
        users = [q["jobQueueName"] for q in batch.describe_job_queues()["jobQueues"]
                 if any(o["computeEnvironment"] in (arn, name)
                        for o in q.get("computeEnvironmentOrder", []))]
        if users:
            return _error("ClientException", "Cannot delete, found existing JobQueue "
                                             f"relationship ({', '.join(users)})")
        with self._lock:
            self._ce_updates.pop(found[0]["computeEnvironmentName"], None)
        return None


class SandboxJobsMixin:
    """What runs a job: Docker, or the sandbox where there is none."""

    def _engine(self) -> tuple[str | None, str]:
        """(what runs the jobs now, why nothing can). The engine is asked at most every
        10 s, not once per job."""
        seen, docker = getattr(self, "_docker_seen", (0.0, False))
        if time.monotonic() - seen > 10:
            docker = shutil.which("docker") is not None and subprocess.run(
                ["docker", "info"], capture_output=True, timeout=60).returncode == 0
            self._docker_seen = (time.monotonic(), docker)
        if self.engine in (None, "docker") and docker:
            return "docker", ""
        if self.engine == "docker":
            return None, "no Docker engine answers 'docker info'"
        from .sandbox import sandbox_available

        why = sandbox_available()
        if why is None:
            return "sandbox", ""
        return None, f"no Docker engine answers 'docker info', and {why}"

    def _start_sandboxed(self, job: dict, env: dict, command: list, log_path: str,
                         now: int) -> None:
        """Without a Docker engine: the job's command as a process in a sandbox that plays
        the image (see :mod:`nipype_s3.testing.sandbox`), its ``python3`` the
        controller's Python and pinned packages, built by the EC2 bootstrap's own steps
        (pip from the package index; kept for later jobs and instances). The image's own
        tools do not exist there."""
        import shlex

        from ..ec2.userdata import render_user_data
        from ..remote.staging import _requirements
        from .sandbox import Sandbox

        image = job["container"]["image"]
        attempt = job["attempts"][-1]
        if image in self.unpullable:
            with self._lock:
                reason = (f"CannotPullContainerError: pull image {image}: not found "
                          "(LocalCloud: made to fail)")
                job.update(status="FAILED", statusReason=reason, stoppedAt=now)
                attempt.update(stoppedAt=now, statusReason=reason)
            return
        name = job["jobId"].replace(":", "-")
        root = os.path.join(self.directory, "sandboxes", f"{name}-{len(job['attempts'])}")
        os.makedirs(os.path.join(root, "log"), exist_ok=True)
        # the bootstrap's header sets a few variables of its own: the job's win
        run = "\n".join([f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())] + [
            'export PATH="/opt/nipype-s3/bin:$PATH"', "mkdir -p /tmp/job && cd /tmp/job",
            shlex.join(str(c) for c in command), "exit $?"])
        script = render_user_data(
            run_id=f"LocalCloud Batch job {name}", config_json="{}",
            region=self.cloud.region, worker_root="/tmp/nipype-s3-work",
            requirements=_requirements([], False), setup_commands=run)
        box = Sandbox(root, f"batch-{name}", dict(self.cloud.agent_env(), NIPYPE_NO_ET="1"))
        argv = box.prepare(script)
        if not os.path.lexists(log_path):
            os.symlink(os.path.join(root, "log", "nipype-s3-agent.log"), log_path)
        with open(os.path.join(root, "sandbox.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=root,
                                    env=box.environment(), start_new_session=True)
        with self._lock:
            self._procs[job["jobId"]] = proc
            self._boxes[job["jobId"]] = box
            if job["status"] == "STARTING":
                job.update(status="RUNNING", startedAt=now)
