"""LocalCloud: a whole AWS account on loopback, whose instances boot for real.

::

    from nipype_s3 import EC2Plugin
    from nipype_s3.testing import LocalCloud

    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="my-bucket")
        wf.run(plugin=EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/runs"}))

Inside the block a moto server on 127.0.0.1 answers S3, EC2, SQS, SSM, IAM, STS and
Batch (``AWS_ENDPOINT_URL`` and fake credentials exported, restored after; the
``nipype-s3-agent`` instance profile and a Batch job queue exist). moto runs neither
user-data nor Batch's jobs: LocalCloud boots each launched instance from its user-data
in a sandbox that plays Amazon Linux (:mod:`nipype_s3.testing.sandbox`; terminated with
its instance, which ends when its bootstrap does) and runs Batch's jobs as containers
(``cloud.batch``, :mod:`nipype_s3.testing.batch`). The controller's requests pass
through a recording proxy (``cloud.proxy``) where faults are injected:
:meth:`kill_agent`, :meth:`fail_launches`, :meth:`spot_notice` and more.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

from ..ec2.userdata import agent_config_from_user_data
from .batch import LocalBatch
from .instances import (
    AGENT_APP_ID,
    LocalInstance,
    _running_jobs,
    _transient,
    keep_environment,
    remove_containers,
    serve_metadata,
)
from .proxy import RecordingProxy
from .sandbox import Sandbox, sandbox_available
from .servers import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, MotoServer

__all__ = ["LocalCloud", "LocalInstance"]

_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
             "AWS_EC2_METADATA_DISABLED", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EC2",
             "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_SSM")


class LocalCloud:
    """An AWS account on 127.0.0.1 for tests, demos and trying pipelines for free.

    Parameters
    ----------
    region : str
        The region everything lives in.
    directory : str, optional
        Where instance roots and logs go (a temporary folder by default, removed at exit
        unless ``keep``).
    record : bool
        Put the recording proxy between the controller and moto.
    agents_via_proxy : bool
        Send the agents' requests through the proxy too (to count every call of a run).
    boot : {"user-data", "direct"}
        ``"user-data"`` (the default where it can work: Linux, root, ``unshare``): each
        instance runs the exact user-data EC2 would run, in a sandbox that plays Amazon
        Linux (see :mod:`nipype_s3.testing.sandbox`): an older ``python3``, the
        controller's files and packages out of reach, ``pip`` from the package index.
        ``"direct"``: the agent starts at once as a process of this machine's Python
        (faster; for tests of the agent itself). Where the sandbox cannot work, the
        default is ``"direct"``, with a warning saying why.
    batch_engine : {"docker", "sandbox"}, optional
        What runs AWS Batch's jobs (:attr:`batch`): this machine's Docker engine, their
        image for real; or, where there is none (the default picks), their command in
        the instances' sandbox, the image played by the controller's Python and pinned
        packages (its own tools do not exist there).
    """

    INSTANCE_PROFILE = "nipype-s3-agent"

    def __init__(self, region: str = "us-east-1", directory: str | None = None,
                 record: bool = True, keep: bool = False,
                 agents_via_proxy: bool = False, boot: str | None = None,
                 batch_engine: str | None = None) -> None:
        if boot not in (None, "user-data", "direct"):
            raise ValueError(f"LocalCloud boot must be 'user-data' or 'direct', not {boot!r}")
        if boot is None:
            why = sandbox_available()
            if why:
                warnings.warn(f"LocalCloud: instances start their agent directly, not from "
                              f"their user-data: {why}", stacklevel=2)
            boot = "direct" if why else "user-data"
        elif boot == "user-data":
            why = sandbox_available()
            if why:
                raise RuntimeError(f"LocalCloud(boot='user-data') cannot work here: {why}")
        self.boot = boot
        self.region = region
        self.agents_via_proxy = agents_via_proxy
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="nipype-s3-localcloud-")
        os.makedirs(self.directory, exist_ok=True)
        self.keep = keep
        self.record = record
        self.server = MotoServer(log_path=os.path.join(self.directory, "moto.log"))
        self.proxy: RecordingProxy | None = None
        self.instances: dict[str, LocalInstance] = {}
        self.peak_alive = 0
        self._launch_faults: list[str] = []
        self._boot_faults = 0
        self._boot_hangs = 0
        self._denied: list[str] = []
        self._notices: dict[str, str] = {}
        self._metadata = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}
        self._seen_commands: set[str] = set()
        self.errors: list[str] = []
        #: AWS Batch's jobs, run as containers (see nipype_s3.testing.batch)
        self.batch = LocalBatch(self, engine=batch_engine)

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Where the controller talks to (the proxy when recording)."""
        return self.proxy.url if self.proxy else self.server.url

    def __enter__(self) -> LocalCloud:
        self.server.start()
        try:
            if self.record:
                self.proxy = RecordingProxy(self.server.url, responder=self._respond).start()
            self._saved_env = {k: os.environ.get(k) for k in _ENV_KEYS}
            for key in _ENV_KEYS:
                os.environ.pop(key, None)
            os.environ.update(AWS_ENDPOINT_URL=self.url, AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY,
                              AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
                              AWS_DEFAULT_REGION=self.region,
                              AWS_EC2_METADATA_DISABLED="true")
            self._create_defaults()
            self._metadata = serve_metadata(self._notices)
            self._thread = threading.Thread(target=self._watch, daemon=True,
                                            name="nipype-s3-localcloud")
            self._thread.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for inst in self.instance_list():
            self._kill(inst)
        self.batch.stop_all()
        if self.proxy is not None:
            self.proxy.stop()
        if self._metadata is not None:
            self._metadata.shutdown()
            self._metadata.server_close()
        self.server.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._own_dir and not self.keep:
            shutil.rmtree(self.directory, ignore_errors=True)

    def agent_env(self) -> dict[str, str]:
        """What stands in for an instance role in the environment of what LocalCloud
        runs (agents, Batch jobs): fake credentials and the endpoint."""
        url = self.proxy.url if self.agents_via_proxy and self.proxy else self.server.url
        return {"AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
                "AWS_DEFAULT_REGION": self.region, "AWS_ENDPOINT_URL": url,
                "AWS_SDK_UA_APP_ID": AGENT_APP_ID, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, service: str, *, direct: bool = False):
        """A boto3 client of this account (``direct``: bypassing the recording proxy)."""
        import boto3

        return boto3.client(service, region_name=self.region,
                            endpoint_url=self.server.url if direct else self.url,
                            aws_access_key_id=FAKE_ACCESS_KEY,
                            aws_secret_access_key=FAKE_SECRET_KEY)

    def _create_defaults(self) -> None:
        iam = self.client("iam", direct=True)
        trust = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole"}]}
        iam.create_role(RoleName=self.INSTANCE_PROFILE,
                        AssumeRolePolicyDocument=json.dumps(trust))
        iam.create_instance_profile(InstanceProfileName=self.INSTANCE_PROFILE)
        iam.add_role_to_instance_profile(InstanceProfileName=self.INSTANCE_PROFILE,
                                         RoleName=self.INSTANCE_PROFILE)
        self.batch.create_defaults()

    # -- fault injection ----------------------------------------------------------------
    def fail_launches(self, code: str = "InsufficientInstanceCapacity", times: int = 1) -> None:
        """Make the next ``times`` RunInstances calls fail with ``code``."""
        with self._lock:
            self._launch_faults.extend([code] * times)

    def fail_boots(self, times: int = 1) -> None:
        """Make the next ``times`` instances' bootstrap fail (the agent never starts)."""
        with self._lock:
            self._boot_faults += times

    def hang_boots(self, times: int = 1) -> None:
        """Make the next ``times`` instances' bootstrap hang (the instance runs, its agent
        never starts), as one stuck on an unreachable package index does."""
        with self._lock:
            self._boot_hangs += times

    def deny_agents(self, path_contains: str) -> None:
        """Refuse (403 AccessDenied) every request of an agent whose path holds
        ``path_contains``, as a role without that permission (or a KMS key it may not
        use) would. Needs ``agents_via_proxy=True``."""
        if not (self.agents_via_proxy and self.record):
            raise ValueError("deny_agents needs LocalCloud(agents_via_proxy=True)")
        with self._lock:
            self._denied.append(path_contains)

    def _respond(self, request, body: bytes = b""):
        played = self.batch.respond(request, body)
        if played is not None:  # AWS Batch's jobs: LocalCloud runs them (moto would not)
            return played
        if self._denied and AGENT_APP_ID in (request.header("user-agent") or "") and any(
                part in request.path for part in self._denied):
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                    b'<Message>Access Denied (LocalCloud)</Message></Error>')
            return 403, body, "application/xml"
        if request.action != "RunInstances":
            return None
        with self._lock:
            if not self._launch_faults:
                return None
            code = self._launch_faults.pop(0)
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}'
                f'</Code><Message>LocalCloud injected {code}</Message></Error></Errors>'
                '<RequestID>localcloud</RequestID></Response>').encode()
        return 500 if code == "InternalError" else 400, body, "text/xml"

    def kill_agent(self, instance_id: str | None = None, *, busy: bool = True) -> str:
        """SIGKILL one agent (and its jobs) and terminate its instance, as if the instance
        vanished; return its id.

        Without ``instance_id``, an agent with a running job is chosen (``busy``).
        """
        inst = self._pick_instance(instance_id, busy, "agent to kill")
        inst.killed = True
        self._kill(inst)
        if not inst.via_ssm:  # the instance is lost with its agent
            self.client("ec2", direct=True).terminate_instances(
                InstanceIds=[inst.instance_id])
        return inst.instance_id

    def _pick_instance(self, instance_id: str | None, busy: bool, what: str) -> LocalInstance:
        """A live instance: ``instance_id``, or one whose agent runs a job (``busy``),
        waited for up to 60 s."""
        deadline = time.time() + 60
        while time.time() < deadline:
            with self._lock:
                candidates = [i for i in self.instances.values() if i.alive and (
                    instance_id is None or i.instance_id == instance_id)]
            if busy and instance_id is None:
                candidates = [i for i in candidates if _running_jobs(i)]
            if candidates:
                return candidates[0]
            time.sleep(0.1)
        raise TimeoutError(f"no (busy) {what} within 60 s")

    def spot_notice(self, instance_id: str | None = None, *, busy: bool = True,
                    action: str = "terminate") -> str:
        """Post a spot interruption notice to one instance's metadata service, as EC2
        does two minutes before it reclaims the instance; return its id. The agent
        hands its jobs back and stops; its instance then ends.

        Without ``instance_id``, an instance whose agent runs a job is chosen (``busy``).
        """
        iid = self._pick_instance(instance_id, busy, "instance to send a spot notice to")\
            .instance_id
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
        self._notices[iid] = json.dumps({"action": action, "time": when})
        return iid

    # -- what a test looks at -----------------------------------------------------------
    def live_instances(self) -> list[str]:
        """Pending or running instances, as EC2 reports them."""
        ec2 = self.client("ec2", direct=True)
        out = []
        for res in ec2.describe_instances(Filters=[{
                "Name": "instance-state-name", "Values": ["pending", "running"]}])[
                "Reservations"]:
            out.extend(i["InstanceId"] for i in res["Instances"])
        return out

    def alive_agents(self) -> list[str]:
        """Instance ids whose agent process runs."""
        with self._lock:
            return [i.instance_id for i in self.instances.values() if i.alive]

    def busy_agents(self) -> list[str]:
        """Instance ids whose agent is running at least one job right now."""
        with self._lock:
            alive = [i for i in self.instances.values() if i.alive]
        return [i.instance_id for i in alive if _running_jobs(i)]

    def instance_list(self) -> list[LocalInstance]:
        """A snapshot of every instance seen so far."""
        with self._lock:
            return list(self.instances.values())

    def wait_idle(self, timeout: float = 30) -> bool:
        """Wait until no agent runs and no instance is live."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive_agents() and not self.live_instances():
                return True
            time.sleep(0.2)
        return False

    # -- the instance runtime -----------------------------------------------------------
    def _watch(self) -> None:
        ec2 = self.client("ec2", direct=True)
        ssm = self.client("ssm", direct=True)
        failing = 0
        while not self._stop.is_set():
            try:
                self._step(ec2)
                self._ssm_step(ec2, ssm)
                self._keep_environments()
                self.batch.step()
                failing = 0
            except Exception as exc:  # keep watching; record for tests
                # moto answers an odd request with a 500 page under load: looked at again
                # at the next tick; recorded when it goes on
                failing += 1
                if failing >= 5 or not _transient(exc):
                    self.errors.append(repr(exc))
            self._stop.wait(0.2)

    def _ssm_step(self, ec2, ssm) -> None:
        """Play the SSM agent: run commands sent to our instances (moto only records them)."""
        for command in ssm.list_commands().get("Commands", []):
            cid = command["CommandId"]
            if cid in self._seen_commands:
                continue
            if any(iid not in self.instances for iid in command.get("InstanceIds", [])):
                continue  # sent to an instance launched since _step looked: next time
            self._seen_commands.add(cid)
            script = "\n".join(command.get("Parameters", {}).get("commands", []))
            for iid in command.get("InstanceIds", []):
                inst = self.instances.get(iid)
                if inst is None or inst.alive:
                    continue
                self._start_agent(iid, script, via_ssm=True)

    def _step(self, ec2) -> None:
        states = {}
        for res in ec2.describe_instances()["Reservations"]:
            for inst in res["Instances"]:
                states[inst["InstanceId"]] = inst["State"]["Name"]
        for iid, state in states.items():
            known = self.instances.get(iid)
            if known is None and state in ("pending", "running"):
                self._boot(ec2, iid)
            elif known is not None and state in ("shutting-down", "terminated", "stopping",
                                                 "stopped") and known.alive:
                self._kill(known)
        for inst in self.instance_list():
            if inst.proc is not None and not inst.alive and inst.ended is None:
                inst.ended = time.time()
                if not inst.via_ssm and states.get(inst.instance_id) in ("pending", "running"):
                    # the bootstrap shuts the instance down when the agent exits
                    ec2.terminate_instances(InstanceIds=[inst.instance_id])
        alive = sum(1 for i in self.instance_list() if i.alive)
        self.peak_alive = max(self.peak_alive, alive)

    def _boot(self, ec2, iid: str) -> None:
        attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
        raw = attr.get("UserData", {}).get("Value")
        text = ""
        if raw:
            import base64

            text = base64.b64decode(raw).decode("utf-8", "replace")
        self._start_agent(iid, text, via_ssm=False)

    def _start_agent(self, iid: str, script: str, *, via_ssm: bool) -> None:
        root = os.path.join(self.directory, "instances", iid)
        os.makedirs(root, exist_ok=True)
        log_path = os.path.join(root, "agent.log")
        config_json = None
        if script:
            name = "ssm-command.sh" if via_ssm else "user-data.sh"
            with open(os.path.join(root, name), "w") as fobj:
                fobj.write(script)
            config_json = agent_config_from_user_data(script)
        if not config_json:
            with self._lock:
                self.instances.setdefault(iid, LocalInstance(iid, root, None, log_path,
                                                             time.time()))
            return
        config = json.loads(config_json)
        # agents reach moto directly, or through the proxy to have their calls counted too
        # (their botocore requests then say "app/nipype-s3-agent" in the User-Agent)
        agent_url = self.proxy.url if self.agents_via_proxy and self.proxy else \
            self.server.url
        config["endpoint_url"] = agent_url
        imds = f"http://127.0.0.1:{self._metadata.server_port}/{iid}"
        if self.boot == "user-data":
            self._boot_sandbox(iid, root, script, config, agent_url, imds, via_ssm=via_ssm)
            return
        config["worker_root"] = os.path.join(root, "work")
        config_path = os.path.join(root, "agent.json")
        with open(config_path, "w") as fobj:
            json.dump(config, fobj)
        env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
        env.update(AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
                   AWS_DEFAULT_REGION=self.region, AWS_ENDPOINT_URL=agent_url,
                   AWS_SDK_UA_APP_ID=AGENT_APP_ID,
                   # as the EC2 bootstrap does: one numeric thread in the agent itself,
                   # whose one-CPU jobs are forks of it
                   OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   AWS_EC2_METADATA_DISABLED="true", NIPYPE_NO_ET="1",
                   NIPYPE_S3_INSTANCE_ID=iid, NIPYPE_S3_WORKER_ROOT=config["worker_root"],
                   NIPYPE_S3_IMDS_URL=imds)
        argv = [sys.executable, "-m", "nipype_s3.agent", "--config", config_path]
        with self._lock:
            if self._boot_faults and not via_ssm:
                self._boot_faults -= 1
                argv = [sys.executable, "-c", "import sys; print('bootstrap failed: pip could "
                        "not reach the package index'); sys.exit(1)"]
            elif self._boot_hangs and not via_ssm:
                self._boot_hangs -= 1
                argv = [sys.executable, "-c", "import time; print('bootstrap: waiting for the "
                        "package index', flush=True); time.sleep(3600)"]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=root, env=env,
                                    start_new_session=True)
        with self._lock:
            self.instances[iid] = LocalInstance(iid, root, proc, log_path, time.time(),
                                                via_ssm=via_ssm)

    def _boot_sandbox(self, iid: str, root: str, script: str, config: dict, agent_url: str,
                      imds: str, *, via_ssm: bool) -> None:
        """Run the instance's user-data itself, in a sandbox that plays Amazon Linux."""
        from ..ec2.userdata import with_agent_config

        script = with_agent_config(script, json.dumps(config, sort_keys=True))
        head = "#!/bin/bash\nexec >>/var/log/nipype-s3-agent.log 2>&1\n"
        with self._lock:
            if self._boot_faults and not via_ssm:
                self._boot_faults -= 1
                script = head + ("echo 'bootstrap failed: pip could not reach the package "
                                 "index'\nexit 1\n")
            elif self._boot_hangs and not via_ssm:
                self._boot_hangs -= 1
                script = head + "echo 'bootstrap: waiting for the package index'\nsleep 3600\n"
        box = Sandbox(root, iid, dict(self.agent_env(), AWS_ENDPOINT_URL=agent_url,
                                      NIPYPE_S3_IMDS_URL=imds, NIPYPE_NO_ET="1"))
        argv = box.prepare(script)
        log_path = os.path.join(root, "log", "nipype-s3-agent.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(os.path.join(root, "sandbox.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=root,
                                    env=box.environment(), start_new_session=True)
        inst = LocalInstance(iid, root, proc, log_path, time.time(), via_ssm=via_ssm)
        inst.sandbox = box
        with self._lock:
            self.instances[iid] = inst

    def _keep_environments(self) -> None:
        """Instances whose agent runs built a working environment: kept for later ones
        (see :mod:`nipype_s3.testing.sandbox`)."""
        for inst in self.instance_list():
            keep_environment(inst, self.errors)

    def _kill(self, inst: LocalInstance) -> None:
        if inst.sandbox is not None:  # its containers: the engine is not in its namespaces
            remove_containers(inst.instance_id)
        if inst.proc is None or inst.proc.poll() is not None:
            return
        try:
            os.killpg(inst.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        inst.proc.wait(10)
        inst.ended = inst.ended or time.time()
