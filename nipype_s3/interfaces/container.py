"""EC2ContainerRun: one container (or command), next to the data, on an EC2 instance."""

from __future__ import annotations

import json
import re
import time

import botocore.exceptions
from nipype.interfaces.base import (
    BaseInterface,
    BaseInterfaceInputSpec,
    Str,
    TraitedSpec,
    traits,
)
from nipype.interfaces.base.traits_extension import isdefined

from ..agent.command import PLACEHOLDERS, check_env_names
from ..agent.config import DEFAULT_WORKER_ROOT, AgentConfig
from ..config import env_endpoint_url
from ..ec2.instances import InstancePool, LaunchSpec, default_ami, terminate_run
from ..ec2.jobs import (
    MAX_REPORT_BYTES,
    MessageRejected,
    RunLayout,
    data_credentials_parameter,
    job_key_parameter,
    new_job_key,
    new_run_id,
    read_bounded,
    sign,
    unseal,
)
from ..ec2.pricing import estimate_cost
from ..ec2.userdata import render_user_data
from ..exceptions import (
    ConfigurationError,
    EC2Error,
    InstanceTimeout,
    RemoteNodeError,
    S3AccessDenied,
    S3ObjectNotFound,
)
from ..s3.credentials import resolve_session
from ..s3.errors import s3_errors
from ..s3.session import bucket_region, make_s3_client
from ..s3.uri import parse_s3_uri
from ._base import S3InterfaceMixin, iflogger

__all__ = ["EC2ContainerRun", "ssm_script"]

_JOB = "container"


class _EC2ContainerRunInputSpec(BaseInterfaceInputSpec):
    image = Str(desc="container image (docker reference, or a .sif / URI for apptainer)")
    runtime = traits.Enum("docker", "apptainer", "singularity", "none", usedefault=True,
                          desc="how to run: a container engine, or 'none' for a command on "
                               "an AMI that has the tool")
    command = Str(mandatory=True,
                  desc="the command, with {input} (the staged input file, or folder when "
                       "input_s3 ends in '/') and {output_dir}; inside a container these are "
                       "the mounted paths. They reach the command as the variables "
                       "NIPYPE_S3_INPUT and NIPYPE_S3_OUTPUT_DIR (or as arguments), never "
                       "as shell text; every other brace is literal")
    input_s3 = Str(mandatory=True, desc="s3:// object, or prefix ending in '/', to stage")
    output_s3 = Str(mandatory=True, desc="s3:// prefix the output folder is uploaded to")
    staging_s3 = Str(desc="s3:// prefix for the job spec, log and report (default: "
                          "'.nipype-s3/' in the output bucket)")
    instance_type = Str("c6i.large", usedefault=True, desc="EC2 instance type")
    ami = Str(desc="AMI id (default: Amazon Linux 2023)")
    instance_id = Str(desc="run on this existing instance: start it if stopped, run, "
                           "stop it again if it was stopped (a running one stays running)")
    spot = traits.Bool(False, usedefault=True, desc="a spot instance (one attempt)")
    gpu = traits.Bool(False, usedefault=True, desc="pass GPUs to the container "
                                                   "(--gpus all / --nv)")
    volume_gb = traits.Int(desc="root volume size in GiB")
    env = traits.Dict(traits.Str, traits.Str,
                      desc="environment variables for the command (licences, tokens): "
                           "passed in the environment, never on a command line, and "
                           "masked in the log")
    timeout = traits.Float(3600.0, usedefault=True,
                           desc="seconds the command may run; then it is stopped and the "
                                "instance terminated")
    boot_timeout = traits.Float(900.0, usedefault=True, nohash=True,
                                desc="seconds allowed for the instance to boot and install")
    iam_instance_profile = Str("nipype-s3-agent", usedefault=True,
                               desc="instance profile (name or ARN) of the instance")
    subnet_id = Str(desc="subnet to launch in")
    security_group_ids = traits.List(traits.Str, desc="security groups")
    region = Str(desc="region of the instance (default: the output bucket's)")
    profile = Str(desc="AWS profile for the compute account (EC2, SSM, staging)")
    creds_path = Str(desc="key file for the compute account")
    data_profile = Str(desc="AWS profile whose credentials fetch input_s3 (e.g. a data "
                            "provider's temporary session)")
    data_creds_path = Str(desc="key file whose credentials fetch input_s3")
    setup_commands = Str(desc="shell lines run on the instance before the job "
                              "(e.g. 'dnf install -y docker && systemctl start docker')")
    poll_interval = traits.Float(2.0, usedefault=True, nohash=True,
                                 desc="seconds between checks for the result")


class _EC2ContainerRunOutputSpec(TraitedSpec):
    output_uris = traits.List(traits.Str, desc="every s3:// object written")
    exit_code = traits.Int(desc="the command's exit code")
    log_uri = Str(desc="s3:// URI of the job's log (stdout and stderr)")
    instance_id = Str(desc="the instance it ran on")
    runtime_seconds = traits.Float(desc="how long the command ran")
    cost_estimate = traits.Float(desc="estimated USD for the instance time (list price)")


class EC2ContainerRun(S3InterfaceMixin, BaseInterface):
    """Run one container (or command) on an EC2 instance, next to the data in S3.

    The recipe of the hand-written scripts, as one node: launch an instance (or start an
    existing one), stage ``input_s3`` onto it, run ``docker run`` / ``apptainer exec`` /
    the plain command with the input and an output folder, upload the folder to
    ``output_s3`` and the log beside the job, then terminate the instance (or stop the
    existing one again, if it was stopped) — in a ``finally``, whatever happened.

    Examples
    --------
    >>> from nipype_s3 import EC2ContainerRun
    >>> run = EC2ContainerRun(image="neuronets/kwyk:latest-cpu", runtime="docker")
    >>> run.inputs.command = "kwyk {input} {output_dir}/kwyk"
    >>> run.inputs.input_s3 = "s3://abcd-data/sub-01/anat/sub-01_T1w.nii.gz"
    >>> run.inputs.output_s3 = "s3://my-results/kwyk/sub-01/"
    >>> run.run()  # doctest: +SKIP
    """

    #: for the remote plugins: it launches an instance of its own, so it runs on the
    #: controller (on an instance it would bill two instances for one container's work)
    _nipype_s3_launches_instances = True
    input_spec = _EC2ContainerRunInputSpec
    output_spec = _EC2ContainerRunOutputSpec

    def _check(self):
        inputs = self.inputs
        if inputs.runtime != "none" and not isdefined(inputs.image):
            raise ConfigurationError(
                f"EC2ContainerRun with runtime={inputs.runtime!r} needs an image (e.g. "
                "'neuronets/kwyk:latest-cpu'), or runtime='none' to run the command as is.")
        for name, variable in PLACEHOLDERS.items():
            if name not in inputs.command and variable not in inputs.command:
                iflogger.warning("EC2ContainerRun: the command does not use %s", name)
        try:
            check_env_names(dict(inputs.env) if isdefined(inputs.env) else {},
                            inputs.runtime)
        except ValueError as exc:
            raise ConfigurationError(f"EC2ContainerRun: {exc}") from None
        parse_s3_uri(inputs.input_s3, require_key=False)
        parse_s3_uri(inputs.output_s3)

    def _run_interface(self, runtime):
        self._check()
        inputs = self.inputs
        out = parse_s3_uri(inputs.output_s3)
        staging = parse_s3_uri(inputs.staging_s3) if isdefined(inputs.staging_s3) else \
            parse_s3_uri(f"s3://{out.bucket}/.nipype-s3")
        run_id = f"container-{new_run_id()}"
        layout = RunLayout(staging.bucket, staging.key.strip("/"), run_id)
        session = resolve_session(creds_path=self._opt("creds_path"),
                                  profile=self._opt("profile"))
        endpoint = env_endpoint_url()
        region = self._opt("region") or session.region_name or \
            bucket_region(out.bucket, session, endpoint_url=endpoint)
        kw = {"region_name": region, **({"endpoint_url": endpoint} if endpoint else {})}
        s3 = make_s3_client(session, endpoint_url=endpoint, region=region)
        ec2 = session.client("ec2", **kw)
        ssm = session.client("ssm", **kw)
        self._warn_cross_region(session, endpoint, region)
        self._check_input(session, endpoint)

        params = [job_key_parameter(run_id)]
        try:
            return self._run_job(runtime, run_id, layout, region, endpoint, s3, ec2, ssm,
                                 params)
        finally:  # whatever happened, no key or credentials are left in SSM
            for name in params:
                try:
                    ssm.delete_parameter(Name=name)
                except botocore.exceptions.ClientError:
                    pass

    def _run_job(self, runtime, run_id, layout, region, endpoint, s3, ec2, ssm, params):
        """Store the key and spec, start the instance, wait for its report (``params``:
        the SSM parameters made, which the caller deletes)."""
        inputs = self.inputs
        key = self._run_key = new_job_key()
        ssm.put_parameter(Name=params[0], Type="SecureString", Value=key.hex(),
                          Overwrite=True)
        data_param = self._store_data_credentials(ssm, run_id)
        if data_param:
            params.append(data_param)
        spec = {"job_id": _JOB, "runtime": inputs.runtime, "image": self._opt("image"),
                "command": inputs.command, "input_s3": inputs.input_s3,
                "output_s3": inputs.output_s3, "gpu": bool(inputs.gpu),
                "env": dict(inputs.env) if isdefined(inputs.env) else {},
                "timeout": float(inputs.timeout), "data_credentials_parameter": data_param}
        spec_bytes = json.dumps(spec, sort_keys=True).encode()
        with s3_errors(bucket=layout.bucket, key=layout.spec_key(_JOB),
                       action="write the job's spec to", endpoint=endpoint):
            s3.put_object(Bucket=layout.bucket, Key=layout.spec_key(_JOB), Body=spec_bytes)
            s3.put_object(Bucket=layout.bucket, Key=layout.spec_key(_JOB) + ".hmac",
                          Body=sign(key, spec_bytes).encode())
        cfg = AgentConfig(bucket=layout.bucket, prefix=layout.prefix, run_id=run_id,
                          region=region, jobs_queue_url="", events_queue_url="",
                          job_key_parameter=params[0], endpoint_url=endpoint,
                          max_lifetime=float(inputs.timeout) + float(inputs.boot_timeout),
                          worker_root=DEFAULT_WORKER_ROOT, extra={"one_job": _JOB})
        from ..remote.staging import _requirements, ship_package
        from ..s3.cas import ContentStore

        # the agent runs this very code (pip cannot install nipype_s3 as it is here)
        package_uri, package_sha256 = ship_package(
            s3, ContentStore(s3, layout.bucket, layout.prefix), layout.bucket)
        script = render_user_data(run_id=run_id, config_json=cfg.to_json(), region=region,
                                  worker_root=DEFAULT_WORKER_ROOT,
                                  requirements=_requirements([], False),
                                  package_s3_uri=package_uri, package_sha256=package_sha256,
                                  setup_commands=self._opt("setup_commands") or "")
        existing = self._opt("instance_id")
        instance_id = existing
        # an instance that was running before the job is running after it
        was_running = bool(existing) and _state(ec2, existing) in ("pending", "running")
        fate = ("left running, as it was before the job" if was_running else
                "stopped" if existing else "terminated")
        launched_at = time.time()
        report = None
        try:
            if existing:
                self._start_existing(ec2, ssm, existing, ssm_script(script), was_running)
            else:
                instance_id = self._launch(ec2, ssm, run_id, script)
            report = self._wait(s3, ec2, layout, instance_id)
        finally:
            ended_at = time.time()
            if was_running:
                iflogger.info("EC2ContainerRun: %s left running (it was running before "
                              "the job)", existing)
            elif existing:
                ec2.stop_instances(InstanceIds=[existing])
                iflogger.info("EC2ContainerRun: StopInstances %s", existing)
            else:
                terminate_run(ec2, run_id)
        log_uri = f"s3://{layout.bucket}/{report.get('log_key', '')}"
        tail = report.get("log_tail") or ""
        if report.get("status") == "timeout":
            raise InstanceTimeout(
                f"EC2ContainerRun: the command ran longer than timeout={inputs.timeout:.0f} s "
                f"and was stopped; instance {instance_id} was {fate}. Log: {log_uri}\n{tail}")
        if report.get("status") != "ok":  # a failed upload after exit code 0 included
            what = (f"the command failed (exit code {report['exit_code']})"
                    if report.get("exit_code") not in (None, 0) else
                    f"the job failed while {report.get('stage') or 'running'}"
                    + (f": {report['error']}" if report.get("error") else ""))
            raise RemoteNodeError(
                f"EC2ContainerRun: {what} on instance {instance_id}; the instance was "
                f"{fate}. Log: {log_uri}\n"
                f"--- log tail ---\n{tail}", instance_id=instance_id, log_uri=log_uri,
                remote_traceback=tail)
        seconds = float(report.get("finished", 0)) - float(report.get("started", 0))
        self._results = {
            "output_uris": list(report.get("outputs", [])), "exit_code": 0,
            "log_uri": log_uri, "instance_id": instance_id or "",
            "runtime_seconds": max(0.0, seconds),
            "cost_estimate": estimate_cost(inputs.instance_type, ended_at - launched_at,
                                           spot=bool(inputs.spot)) or 0.0}
        return runtime

    def _list_outputs(self):
        return dict(getattr(self, "_results", {}) or {})

    # -- pieces ---------------------------------------------------------------------
    def _check_input(self, session, endpoint) -> None:
        """Make sure ``input_s3`` holds something before paying for an instance.

        One HEAD (an object) or a one-key LIST (a prefix), with the credentials the
        instance will fetch it with when they are given here (``data_profile``,
        ``data_creds_path``). A refusal is not an answer: the instance's own role may
        read what the controller may not.
        """
        uri = parse_s3_uri(self.inputs.input_s3)
        data = session
        if self._opt("data_profile") or self._opt("data_creds_path"):
            data = resolve_session(creds_path=self._opt("data_creds_path"),
                                   profile=self._opt("data_profile"))
        try:
            client = make_s3_client(data, bucket=uri.bucket, endpoint_url=endpoint)
            folder = not uri.key or uri.key.endswith("/")
            with s3_errors(bucket=uri.bucket, key=uri.key or None,
                           action="find", endpoint=endpoint):
                if not folder:
                    client.head_object(Bucket=uri.bucket, Key=uri.key)
                    return
                listed = client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.key, MaxKeys=1)
        except S3AccessDenied as exc:
            iflogger.debug("EC2ContainerRun: input not checked before launching: %s", exc)
            return
        if not listed.get("KeyCount") and not listed.get("Contents"):
            raise S3ObjectNotFound(
                f"EC2ContainerRun input_s3 {self.inputs.input_s3!r} holds no objects: nothing "
                "to run the command on. Check the prefix (a prefix ends in '/'; without "
                "it input_s3 names one object).", bucket=uri.bucket, key=uri.key)

    def _warn_cross_region(self, session, endpoint, region) -> None:
        if endpoint:
            return
        try:
            data_bucket = parse_s3_uri(self.inputs.input_s3).bucket
            data_region = bucket_region(data_bucket, session, anon=False)
        except Exception:
            return
        if data_region != region:
            iflogger.warning(
                "EC2ContainerRun: the input bucket %s is in %s but the instance runs in %s: "
                "cross-region transfer is slower and costs money. Set region=%r.",
                data_bucket, data_region, region, data_region)

    def _store_data_credentials(self, ssm, run_id: str) -> str | None:
        if not (self._opt("data_profile") or self._opt("data_creds_path")):
            return None
        data = resolve_session(creds_path=self._opt("data_creds_path"),
                               profile=self._opt("data_profile"))
        creds = data.get_credentials()
        if creds is None:
            raise ConfigurationError("EC2ContainerRun: no credentials found for "
                                     "data_profile/data_creds_path.")
        frozen = creds.get_frozen_credentials()
        name = data_credentials_parameter(run_id)
        ssm.put_parameter(Name=name, Type="SecureString", Overwrite=True, Value=json.dumps(
            {"access_key": frozen.access_key, "secret_key": frozen.secret_key,
             "token": frozen.token}))
        return name

    def _launch(self, ec2, ssm, run_id: str, script: str) -> str:
        inputs = self.inputs
        ami = self._opt("ami") or default_ami(ssm)
        pool = InstancePool(ec2, run_id, LaunchSpec(
            ami=ami, instance_type=inputs.instance_type, user_data=script,
            iam_instance_profile=self._opt("iam_instance_profile"),
            subnet_id=self._opt("subnet_id"),
            security_group_ids=list(inputs.security_group_ids)
            if isdefined(inputs.security_group_ids) else [],
            volume_gb=self._opt("volume_gb")), spot=bool(inputs.spot), spot_retries=1)
        pool.check_image()
        ids = pool.launch(1) or pool.launch(1)  # a failed spot request falls back once
        if not ids:
            raise EC2Error("EC2ContainerRun: no instance could be launched.")
        iflogger.info("EC2ContainerRun: launched %s (%s)", ids[0], inputs.instance_type)
        return ids[0]

    def _start_existing(self, ec2, ssm, instance_id: str, script: str,
                        running: bool) -> None:
        if not running:
            ec2.start_instances(InstanceIds=[instance_id])
            iflogger.info("EC2ContainerRun: StartInstances %s", instance_id)
        deadline = time.time() + float(self.inputs.boot_timeout)
        while True:
            state = _state(ec2, instance_id)
            if state == "running":
                break
            if time.time() > deadline:
                raise InstanceTimeout(f"instance {instance_id} did not reach 'running' within "
                                      f"{self.inputs.boot_timeout:.0f} s (it is {state!r}).")
            time.sleep(float(self.inputs.poll_interval))
        # a started instance does not re-run its user-data: send the job over SSM
        ssm.send_command(InstanceIds=[instance_id], DocumentName="AWS-RunShellScript",
                         Comment="nipype-s3 EC2ContainerRun",
                         Parameters={"commands": [script]})

    def _wait(self, s3, ec2, layout: RunLayout, instance_id: str) -> dict:
        inputs = self.inputs
        deadline = time.time() + float(inputs.timeout) + float(inputs.boot_timeout)
        done_key = layout.done_key(_JOB)
        last_state_check = 0.0
        while True:
            try:
                body = read_bounded(s3, layout.bucket, done_key, MAX_REPORT_BYTES,
                                    what="done report")
                report = unseal(self._run_key, body, "report")
                if report.get("job_id") != _JOB or report.get("run_id") != layout.run_id:
                    raise MessageRejected("a signed report of another job")
                return report
            except MessageRejected as exc:  # not the agent's: deleted, the real one awaited
                iflogger.error("EC2ContainerRun: refused the report at s3://%s/%s (%s); "
                             "deleted it", layout.bucket, done_key, exc)
                s3.delete_object(Bucket=layout.bucket, Key=done_key)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") != 404:
                    raise
            now = time.time()
            if now > deadline:
                raise InstanceTimeout(
                    f"EC2ContainerRun: no result from instance {instance_id} within "
                    f"timeout + boot_timeout = {inputs.timeout + inputs.boot_timeout:.0f} s; "
                    "the instance is being shut down. Check its console output.")
            if now - last_state_check > 5:
                last_state_check = now
                state = _state(ec2, instance_id)
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    raise EC2Error(
                        f"EC2ContainerRun: instance {instance_id} is {state} before the job "
                        "finished (a spot interruption, or the bootstrap failed: see the "
                        "instance's console output).")
            time.sleep(float(inputs.poll_interval))


_SHUTDOWN = re.compile(r"\b(shutdown|poweroff|halt)\b")


def ssm_script(bootstrap: str) -> str:
    """The agent's bootstrap as a command for SSM on an instance of the user's own.

    The user-data bootstrap shuts its instance down when the agent exits (a ``trap`` on
    ``EXIT``): right for an instance launched for the job, wrong for one the user had
    running. The trap goes, and the header that describes it.

    Raises
    ------
    EC2Error
        A shutdown is still there, in a shape this does not take out (the bootstrap
        changed): nothing is sent.
    """
    lines = bootstrap.splitlines()
    body = 1
    while body < len(lines) and lines[body].startswith("#"):
        body += 1  # the header, which says the instance shuts down
    lines = [line for line in lines[body:]
             if not (line.lstrip().startswith("trap") and _SHUTDOWN.search(line))]
    if any(_SHUTDOWN.search(line) and ("trap" in line or _SHUTDOWN.match(line.lstrip()))
           for line in lines if not line.lstrip().startswith("#")):
        raise EC2Error("EC2ContainerRun: the job for an existing instance would shut it "
                       "down when it ends; refusing to send it. This is a bug in "
                       "nipype-s3: please report it.")
    return "\n".join([bootstrap.splitlines()[0], _SSM_HEADER] + lines) + "\n"


_SSM_HEADER = """\
# nipype-s3 agent for one EC2ContainerRun job, sent over SSM to an existing instance.
# No credentials here: the agent uses the instance role. The instance keeps running
# when the job ends (the controller stops it again if it was stopped before)."""


def _state(ec2, instance_id: str) -> str:
    resp = ec2.describe_instances(InstanceIds=[instance_id])
    for res in resp.get("Reservations", []):
        for inst in res.get("Instances", []):
            return inst["State"]["Name"]
    return "unknown"

