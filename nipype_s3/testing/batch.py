"""LocalCloud plays AWS Batch: jobs submitted to it run, for real, as containers of this
machine's Docker engine.

moto holds Batch's compute environments, job queues and job definitions, but marks every
job SUCCEEDED at once and runs nothing. LocalCloud answers ``SubmitJob``,
``DescribeJobs``, ``ListJobs``, ``TerminateJob`` and ``CancelJob`` itself:

* a job runs its job definition's image and command (``containerOverrides`` applied:
  command, environment, resources), with ``AWS_BATCH_JOB_ID``,
  ``AWS_BATCH_JOB_ATTEMPT`` and ``AWS_BATCH_JOB_ARRAY_INDEX`` (array jobs: one child per
  index, ``<id>:<index>``), host networking and the role's stand-in (LocalCloud's
  credentials and endpoint, passed by name: values never in an argument list);
* its states are Batch's: SUBMITTED → RUNNABLE → STARTING → RUNNING → SUCCEEDED or
  FAILED, with the exit code and a status reason; an image that is not on this machine
  fails the job with ``CannotPullContainerError`` (no registry is reachable here), and
  so does every job where no Docker engine answers;
* AWS's limits are held, which moto does not: a SubmitJob body of at most 30 KiB,
  ``containerOverrides`` of at most 8,192 characters, arrays of 2 to 10,000, at most
  100 ids per DescribeJobs;
* faults, as for EC2: :meth:`reclaim` kills a running job as a spot reclaim
  (``statusReason "Host EC2 (instance i-...) terminated."``, no exit code),
  :meth:`throttle` refuses the next submits or describes with
  ``TooManyRequestsException``.

A job's output goes to ``<LocalCloud directory>/batch/<job id>.log`` (CloudWatch's
``/aws/batch/job`` stream ``nipype-s3/default/<job id>``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid

from .batch_control import ControlPlaneMixin, SandboxJobsMixin, _error, _ok

__all__ = ["LocalBatch"]

SUBMIT_LIMIT = 30 * 1024
OVERRIDES_LIMIT = 8192
ARRAY_LIMIT = 10_000
DESCRIBE_LIMIT = 100
_FINAL = ("SUCCEEDED", "FAILED")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_ROLE_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
               "AWS_DEFAULT_REGION", "AWS_SDK_UA_APP_ID", "AWS_EC2_METADATA_DISABLED")


class LocalBatch(ControlPlaneMixin, SandboxJobsMixin):
    """AWS Batch's jobs for a :class:`~nipype_s3.testing.LocalCloud` (``cloud.batch``).

    The account has one job queue ready, :attr:`QUEUE` (an unmanaged compute
    environment behind it), as ``nipype-s3 batch setup`` would make on AWS.
    """

    QUEUE = "nipype-s3-local"

    def __init__(self, cloud, *, max_running: int = 8, engine: str | None = None) -> None:
        if engine not in (None, "docker", "sandbox"):
            raise ValueError(f"LocalBatch engine must be 'docker' or 'sandbox', not {engine!r}")
        self.cloud = cloud
        self.max_running = max_running
        #: "docker", "sandbox" or None (Docker where an engine answers, else the sandbox)
        self.engine = engine
        #: images whose pull fails (CannotPullContainerError) where no engine checks them
        self.unpullable: set[str] = set()
        self._boxes: dict[str, object] = {}
        self.jobs: dict[str, dict] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._throttles: dict[str, int] = {}
        self._ce_updates: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.directory = os.path.join(cloud.directory, "batch")
        self.submitted = 0

    # -- set-up ------------------------------------------------------------------------
    def create_defaults(self) -> None:
        iam = self.cloud.client("iam", direct=True)
        batch = self.cloud.client("batch", direct=True)
        role = iam.create_role(RoleName="nipype-s3-batch-service",
                               AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        env = batch.create_compute_environment(
            computeEnvironmentName="nipype-s3-local", type="UNMANAGED", state="ENABLED",
            serviceRole=role)["computeEnvironmentArn"]
        batch.create_job_queue(jobQueueName=self.QUEUE, state="ENABLED", priority=1,
                               computeEnvironmentOrder=[{"order": 1,
                                                         "computeEnvironment": env}])
        os.makedirs(self.directory, exist_ok=True)

    # -- fault injection ---------------------------------------------------------------
    def throttle(self, operation: str = "SubmitJob", times: int = 1) -> None:
        """Refuse the next ``times`` calls of ``operation`` (``SubmitJob``,
        ``DescribeJobs``) with ``TooManyRequestsException``, as Batch does under load."""
        with self._lock:
            self._throttles[operation.lower()] = self._throttles.get(operation.lower(),
                                                                     0) + times

    def reclaim(self, job_id: str | None = None, timeout: float = 60) -> str:
        """Kill a running job (``job_id``, or the first one running) as a spot reclaim:
        FAILED, ``Host EC2 (instance i-...) terminated.``, no exit code. Returns its id."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                running = [j for j in self.jobs.values() if j["status"] == "RUNNING" and (
                    job_id is None or j["jobId"] == job_id)]
            if running:
                job = running[0]
                reason = f"Host EC2 (instance i-{uuid.uuid4().hex[:17]}) terminated."
                self._stop(job, reason, exit_code=None)
                return job["jobId"]
            time.sleep(0.1)
        raise TimeoutError(f"no running Batch job to reclaim within {timeout} s")

    # -- the API -----------------------------------------------------------------------
    def respond(self, request, body: bytes):
        """The answer to a Batch call LocalCloud plays (None: moto answers it)."""
        path = request.path.rstrip("/").lower()
        ops = {"/v1/submitjob": self._submit, "/v1/describejobs": self._describe,
               "/v1/listjobs": self._list, "/v1/terminatejob": self._terminate,
               "/v1/canceljob": self._terminate}
        if request.method == "POST" and path in ("/v1/deletejobqueue",
                                                 "/v1/deletecomputeenvironment"):
            return self._refused_delete(path, body)
        if request.method == "POST" and path in ("/v1/updatecomputeenvironment",
                                                 "/v1/describecomputeenvironments"):
            return self._compute_environments(path, body)
        handler = ops.get(path)
        if handler is None or request.method != "POST":
            return None
        op = path.rsplit("/", 1)[1]
        with self._lock:
            if self._throttles.get(op):
                self._throttles[op] -= 1
                return _error("TooManyRequestsException", "Too Many Requests (LocalCloud)",
                              429)
        if op == "submitjob" and len(body) > SUBMIT_LIMIT:
            return _error("ClientException", f"SubmitJob request of {len(body)} bytes: "
                                             f"AWS Batch accepts at most {SUBMIT_LIMIT}.")
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            return _error("ClientException", "the request is not JSON")
        return handler(params)

    def _job_definition(self, name: str) -> dict | None:
        batch = self.cloud.client("batch", direct=True)
        if name.startswith("arn:"):
            found = batch.describe_job_definitions(jobDefinitions=[name])["jobDefinitions"]
        else:
            base, _, revision = name.partition(":")
            found = [d for d in batch.describe_job_definitions(
                jobDefinitionName=base, status="ACTIVE")["jobDefinitions"]
                if not revision or str(d["revision"]) == revision]
        return max(found, key=lambda d: d["revision"]) if found else None

    def _submit(self, p: dict):
        name, queue, definition = p.get("jobName"), p.get("jobQueue"), p.get("jobDefinition")
        if not (isinstance(name, str) and isinstance(queue, str) and
                isinstance(definition, str)):
            return _error("ClientException", "jobName, jobQueue and jobDefinition are "
                                             "required")
        overrides = p.get("containerOverrides") or {}
        if len(json.dumps(overrides, separators=(",", ":"))) > OVERRIDES_LIMIT:
            return _error("ClientException", "Container Overrides length must be at most "
                                             f"{OVERRIDES_LIMIT}")
        if p.get("dependsOn") and len(p["dependsOn"]) > 20:
            return _error("ClientException", "a job may depend on at most 20 jobs")
        size = (p.get("arrayProperties") or {}).get("size")
        if size is not None and not (isinstance(size, int) and 2 <= size <= ARRAY_LIMIT):
            return _error("ClientException", f"array size must be 2 to {ARRAY_LIMIT}, not "
                                             f"{size!r}")
        batch = self.cloud.client("batch", direct=True)
        queues = batch.describe_job_queues(jobQueues=[queue])["jobQueues"]
        if not queues:
            return _error("ClientException", f"JobQueue {queue} not found")
        if queues[0].get("state") == "DISABLED":
            return _error("ClientException", f"Job queue {queue} is DISABLED: it takes no "
                                             "new jobs")
        jobdef = self._job_definition(definition)
        if jobdef is None:
            return _error("ClientException", f"Job definition {definition} not found")
        job_id = str(uuid.uuid4())
        now = int(time.time() * 1000)
        job = {"jobId": job_id, "jobName": name, "jobQueue": queues[0]["jobQueueArn"],
               "jobArn": f"arn:aws:batch:{self.cloud.region}:123456789012:job/{job_id}",
               "jobDefinition": jobdef["jobDefinitionArn"], "status": "SUBMITTED",
               "createdAt": now, "attempts": [], "dependsOn": [], "parameters": {},
               "tags": p.get("tags") or {}, "_def": jobdef, "_overrides": overrides,
               "container": {"image": jobdef["containerProperties"].get("image")}}
        with self._lock:
            self.submitted += 1
            if size:
                job["arrayProperties"] = {"size": size, "statusSummary": {}}
                self.jobs[job_id] = job
                for index in range(size):
                    child = dict(job, jobId=f"{job_id}:{index}", jobArn=f"{job['jobArn']}:"
                                 f"{index}", arrayProperties={"index": index},
                                 container=dict(job["container"]), attempts=[])
                    child["status"] = "RUNNABLE"
                    self.jobs[child["jobId"]] = child
                job["status"] = "PENDING"
            else:
                job["status"] = "RUNNABLE"
                self.jobs[job_id] = job
        return _ok({"jobArn": job["jobArn"], "jobName": name, "jobId": job_id})

    def _public(self, job: dict) -> dict:
        out = {k: v for k, v in job.items() if not k.startswith("_")}
        if "arrayProperties" in job and "size" in job["arrayProperties"]:
            kids = [j for j in self.jobs.values()
                    if j["jobId"].startswith(job["jobId"] + ":")]
            summary: dict[str, int] = {}
            for kid in kids:
                summary[kid["status"]] = summary.get(kid["status"], 0) + 1
            out["arrayProperties"] = {"size": job["arrayProperties"]["size"],
                                      "statusSummary": summary}
            if kids and all(k["status"] in _FINAL for k in kids):
                out["status"] = "FAILED" if any(k["status"] == "FAILED" for k in kids) \
                    else "SUCCEEDED"
            elif any(k["status"] != "RUNNABLE" for k in kids):
                out["status"] = "RUNNING"
        return out

    def _describe(self, p: dict):
        ids = p.get("jobs") or []
        if len(ids) > DESCRIBE_LIMIT:
            return _error("ClientException", f"DescribeJobs takes at most {DESCRIBE_LIMIT} "
                                             f"job ids, not {len(ids)}")
        with self._lock:
            return _ok({"jobs": [self._public(self.jobs[i]) for i in ids if i in self.jobs]})

    def _list(self, p: dict):
        status = p.get("jobStatus") or "RUNNING"
        with self._lock:
            if p.get("arrayJobId"):
                found = [j for j in self.jobs.values()
                         if j["jobId"].startswith(p["arrayJobId"] + ":")]
            else:
                queue = p.get("jobQueue") or ""
                found = [j for j in self.jobs.values() if ":" not in j["jobId"] and (
                    j["jobQueue"] == queue or j["jobQueue"].endswith("/" + queue))]
            for rule in p.get("filters") or []:  # JOB_NAME: a name, or a prefix and '*'
                if rule.get("name") == "JOB_NAME":
                    want = (rule.get("values") or [""])[0]
                    found = [j for j in found if (j["jobName"].startswith(want[:-1])
                                                  if want.endswith("*")
                                                  else j["jobName"] == want)]
            jobs = [self._public(j) for j in found]
        return _ok({"jobSummaryList": [
            {"jobId": j["jobId"], "jobArn": j["jobArn"], "jobName": j["jobName"],
             "status": j["status"], "createdAt": j["createdAt"]}
            for j in jobs if j["status"] == status or p.get("filters")]})

    def _terminate(self, p: dict):
        job_id, reason = p.get("jobId"), p.get("reason")
        if not (isinstance(job_id, str) and isinstance(reason, str)):
            return _error("ClientException", "jobId and reason are required")
        with self._lock:
            known = job_id in self.jobs
            targets = [j for j in self.jobs.values()
                       if j["jobId"] == job_id or j["jobId"].startswith(job_id + ":")]
        if not known:
            return _error("ClientException", f"Job {job_id} not found")
        for job in targets:
            self._stop(job, reason, exit_code=None)
        return _ok({})

    # -- running jobs ------------------------------------------------------------------
    def step(self) -> None:
        """Start what is runnable, note what ended (called by LocalCloud's watcher)."""
        keep: list = []
        with self._lock:
            for job_id, proc in list(self._procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                del self._procs[job_id]
                box = self._boxes.pop(job_id, None)
                if box is not None and code == 0:
                    keep.append(box)
                job = self.jobs[job_id]
                if job["status"] in _FINAL:
                    continue
                self._finish(job, code)
            running = sum(1 for j in self.jobs.values()
                          if j["status"] in ("STARTING", "RUNNING"))
            todo = [j for j in self.jobs.values() if j["status"] == "RUNNABLE"]
            if not shutil.which("nvidia-smi"):  # no GPU here: as a compute environment
                # without GPU instances, Batch holds a job that asks for one, RUNNABLE
                for job in [j for j in todo if _gpus(j)]:
                    job["statusReason"] = ("LocalCloud: this machine has no GPU; the job "
                                           "waits, as on a queue without GPU instances")
                todo = [j for j in todo if not _gpus(j)]
            for parent in [j for j in self.jobs.values() if j["status"] not in _FINAL
                           and "size" in j.get("arrayProperties", {})]:
                kids = [self.jobs.get(f"{parent['jobId']}:{i}")
                        for i in range(parent["arrayProperties"]["size"])]
                if all(k is not None and k["status"] in _FINAL for k in kids):
                    failed = any(k["status"] == "FAILED" for k in kids)
                    parent.update(status="FAILED" if failed else "SUCCEEDED",
                                  stoppedAt=max(k.get("stoppedAt", 0) for k in kids))
        for box in keep:
            box.save_environment()  # the environment it built, for later jobs and instances
        for job in todo[:max(0, self.max_running - running)]:
            self._start(job)

    def _env_file_gone(self, job_id: str) -> None:
        try:
            os.unlink(os.path.join(self.directory, f"{job_id}.env"))
        except OSError:
            pass

    def _finish(self, job: dict, code: int) -> None:
        self._env_file_gone(job["jobId"])
        log = self._log(job["jobId"])
        attempt = job["attempts"][-1] if job["attempts"] else {}
        now = int(time.time() * 1000)
        if code == 125 and ("No such image" in log or "Unable to find image" in log):
            reason = (f"CannotPullContainerError: pull image {job['container']['image']}: "
                      "not found (LocalCloud reaches no registry: build or load it into "
                      "this machine's Docker engine)")
            job["container"].pop("exitCode", None)
        else:
            reason = "Essential container in task exited"
            job["container"]["exitCode"] = code
            attempt.setdefault("container", {})["exitCode"] = code
        job.update(status="SUCCEEDED" if code == 0 else "FAILED", statusReason=reason,
                   stoppedAt=now)
        attempt.update(stoppedAt=now, statusReason=reason)

    def _log(self, job_id: str) -> str:
        try:
            with open(os.path.join(self.directory, f"{job_id}.log"), errors="replace") as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    def _stop(self, job: dict, reason: str, exit_code) -> None:
        with self._lock:
            if job["status"] in _FINAL:
                return
            proc = self._procs.pop(job["jobId"], None)
            now = int(time.time() * 1000)
            job.update(status="FAILED", statusReason=reason, stoppedAt=now)
            if job["attempts"]:
                job["attempts"][-1].update(stoppedAt=now, statusReason=reason)
        if proc is None:
            return
        self._env_file_gone(job["jobId"])
        if self._boxes.pop(job["jobId"], None) is not None:  # a sandboxed process
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
            return
        # 'docker run' may not have made its container yet when the job is RUNNING: a
        # removal that finds none is repeated until the client process ends.
        deadline = time.monotonic() + 90
        while True:
            subprocess.run(["docker", "rm", "-f", _container(job["jobId"])],
                           capture_output=True, timeout=60)
            try:
                proc.wait(2)
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait(10)
                    raise TimeoutError(f"LocalCloud could not stop Batch job "
                                       f"{job['jobId']}'s container") from None

    def _start(self, job: dict) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            if job["status"] != "RUNNABLE":
                return
            job["status"] = "STARTING"
        props = job["_def"]["containerProperties"]
        over = job["_overrides"]
        command = over.get("command") or props.get("command") or []
        env = {e["name"]: e["value"] for e in props.get("environment") or []}
        env.update({e["name"]: e["value"] for e in over.get("environment") or []})
        index = job.get("arrayProperties", {}).get("index")
        env.update(AWS_BATCH_JOB_ID=job["jobId"], AWS_BATCH_JOB_ATTEMPT=str(
            len(job["attempts"]) + 1), AWS_BATCH_JQ_NAME=self.QUEUE,
            AWS_BATCH_CE_NAME="nipype-s3-local")
        if index is not None:
            env["AWS_BATCH_JOB_ARRAY_INDEX"] = str(index)
        resources = {r["type"]: r["value"] for r in props.get("resourceRequirements") or []}
        resources.update({r["type"]: r["value"]
                          for r in over.get("resourceRequirements") or []})
        stream = f"nipype-s3/default/{job['jobId'].replace(':', '-')}"
        attempt = {"startedAt": now, "container": {"logStreamName": stream}}
        job["attempts"].append(attempt)
        job["container"].update(command=command, logStreamName=stream,
                                vcpus=int(float(resources.get("VCPU", 1))),
                                memory=int(float(resources.get("MEMORY", 2048))))
        if resources.get("GPU"):
            job["container"]["gpus"] = int(float(resources["GPU"]))
        log_path = os.path.join(self.directory, f"{job['jobId']}.log")
        engine, why = self._engine()
        if engine is None:
            with open(log_path, "w") as fobj:
                fobj.write(f"LocalCloud: {why}\n")
            with self._lock:
                reason = ("CannotPullContainerError: LocalCloud cannot run "
                          f"{job['container']['image']}: {why}")
                job.update(status="FAILED", statusReason=reason, stoppedAt=now)
                attempt.update(stoppedAt=now, statusReason=reason)
            return
        from ..exceptions import ConfigurationError
        from ..remote.settings import checked_image

        bad = [n for n in env if not _ENV_NAME.fullmatch(n)]
        try:
            checked_image(props.get("image"), "the job definition's image")
        except ConfigurationError as exc:
            bad.append(str(exc))
        if bad:  # as Batch refuses them: the job fails, holding no slot
            with self._lock:
                reason = f"ClientException: invalid job: {bad[0]}"
                job.update(status="FAILED", statusReason=reason, stoppedAt=now)
                attempt.update(stoppedAt=now, statusReason=reason)
            return
        if engine == "sandbox":
            self._start_sandboxed(job, env, command, log_path, now)
            return
        role = {n: v for n, v in self.cloud.agent_env().items() if n in _ROLE_NAMES}
        values = dict(role, **env)  # the job's own variables win, as in Batch
        if any("\n" in v for v in values.values()):
            with self._lock:
                reason = ("ClientException: LocalCloud cannot pass a variable holding a "
                          "newline to a container (docker's env-file)")
                job.update(status="FAILED", statusReason=reason, stoppedAt=now)
                attempt.update(stoppedAt=now, statusReason=reason)
            return
        # in a file only the container reads (not the docker client's own environment,
        # where a job's PATH, LD_PRELOAD or DOCKER_HOST would steer this machine's docker)
        env_file = os.path.join(self.directory, f"{job['jobId']}.env")
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fobj:
            fobj.writelines(f"{name}={value}\n" for name, value in sorted(values.items()))
        argv = ["docker", "run", "--rm", "--pull", "never", "--name", _container(job["jobId"]),
                "--label", f"nipype-s3-localcloud={job['jobId']}", "--network", "host",
                "--memory", f"{job['container']['memory']}m", "--env-file", env_file]
        if _gpus(job):
            argv += ["--gpus", str(_gpus(job))]
        argv += [props["image"], *command]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            self._procs[job["jobId"]] = proc
            if job["status"] == "STARTING":
                job.update(status="RUNNING", startedAt=now)

    def stop_all(self) -> None:
        """End every job still running (LocalCloud's exit)."""
        with self._lock:
            live = [j for j in self.jobs.values() if j["status"] not in _FINAL]
        for job in live:
            self._stop(job, "LocalCloud stopped", exit_code=None)


def _gpus(job: dict) -> int:
    """The GPUs a job asks for (its definition's, or its overrides')."""
    wanted = {r["type"]: r["value"] for r in
              (job["_def"]["containerProperties"].get("resourceRequirements") or [])
              + (job["_overrides"].get("resourceRequirements") or [])}
    return int(float(wanted.get("GPU", 0) or 0))


def _container(job_id: str) -> str:
    return "nipype-s3-batch-" + job_id.replace(":", "-")
