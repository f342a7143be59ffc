"""The agent's one-job mode: stage an S3 input, run one container or command, upload.

Used by :class:`~nipype_s3.EC2ContainerRun`. The job spec (signed like EC2Plugin's) says
what to fetch (``input_s3``: an object, or a prefix ending in ``/``), how to run
(``runtime``: ``docker``, ``apptainer``/``singularity`` or ``none``), and where results go
(``output_s3``). Data credentials for a data provider's bucket, when the job has them,
are read from an SSM ``SecureString`` parameter (never from user-data) and used only to
fetch the input; outputs are written with the instance's own role.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from traceback import format_exc

import boto3

from ..localfs import walk_files
from ..s3.download import DownloadItem, download_files
from ..s3.listing import iter_objects
from ..s3.session import make_s3_client
from ..s3.upload import UploadItem, upload_files
from ..s3.uri import join_key, parse_s3_uri

__all__ = ["build_command", "run_one_job", "CONTAINER_INPUT", "CONTAINER_OUTPUT"]

CONTAINER_INPUT = "/input"
CONTAINER_OUTPUT = "/output"


def build_command(*, runtime: str, command: str, image: str | None, input_path: str,
                  output_dir: str, gpu: bool = False, env: dict | None = None) -> list[str]:
    """The argv that runs ``command`` for ``runtime``.

    ``command`` is a template with ``{input}`` and ``{output_dir}``; inside a container
    they are the mounted paths (``/input/<name>`` and ``/output``), with the host's input
    folder mounted read-only at ``/input``.
    """
    env = dict(env or {})
    if runtime == "none":
        text = command.format(input=shlex.quote(input_path),
                              output_dir=shlex.quote(output_dir))
        return ["/bin/bash", "-c", text]
    if not image:
        raise ValueError(f"runtime {runtime!r} needs an image")
    in_dir = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    inner_input = CONTAINER_INPUT if os.path.isdir(input_path) else \
        f"{CONTAINER_INPUT}/{os.path.basename(input_path)}"
    inner = shlex.split(command.format(input=shlex.quote(inner_input),
                                       output_dir=CONTAINER_OUTPUT))
    if runtime == "docker":
        argv = ["docker", "run", "--rm"]
        if gpu:
            argv += ["--gpus", "all"]
        argv += ["-v", f"{in_dir}:{CONTAINER_INPUT}:ro", "-v", f"{output_dir}:{CONTAINER_OUTPUT}"]
        for key, value in sorted(env.items()):
            argv += ["-e", f"{key}={value}"]
        return argv + [image] + inner
    if runtime in ("apptainer", "singularity"):
        argv = [runtime, "exec", "--cleanenv"]
        if gpu:
            argv.append("--nv")
        argv += ["-B", f"{in_dir}:{CONTAINER_INPUT}:ro", "-B", f"{output_dir}:{CONTAINER_OUTPUT}"]
        for key, value in sorted(env.items()):
            argv += ["--env", f"{key}={value}"]
        image_ref = image if "://" in image or image.endswith(".sif") else f"docker://{image}"
        return argv + [image_ref] + inner
    raise ValueError(f"unknown runtime {runtime!r}: use docker, apptainer, singularity or none")


def _data_session(cfg, spec: dict) -> boto3.Session:
    param = spec.get("data_credentials_parameter")
    if not param:
        return boto3.Session(region_name=cfg.region)
    kwargs = {"region_name": cfg.region}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    ssm = boto3.Session(region_name=cfg.region).client("ssm", **kwargs)
    creds = json.loads(ssm.get_parameter(Name=param, WithDecryption=True)["Parameter"]["Value"])
    return boto3.Session(aws_access_key_id=creds["access_key"],
                         aws_secret_access_key=creds["secret_key"],
                         aws_session_token=creds.get("token"), region_name=cfg.region)


def _fetch_input(client, input_s3: str, dest_root: str) -> str:
    uri = parse_s3_uri(input_s3)
    if uri.key.endswith("/") or not uri.key:
        items = [DownloadItem(o.key, os.path.join(dest_root, *o.key[len(uri.key):].split("/")),
                              o.size, o.etag, o.last_modified)
                 for o in iter_objects(client, uri.bucket, uri.key) if not o.key.endswith("/")]
        download_files(client, uri.bucket, items)
        return dest_root
    dest = os.path.join(dest_root, os.path.basename(uri.key))
    download_files(client, uri.bucket, [DownloadItem(uri.key, dest)])
    return dest


def run_one_job(cfg, spec: dict, workdir: str) -> dict:
    """Run the container job; return the done report (the caller writes it)."""
    started = time.time()
    log_path = os.path.join(workdir, "job.log")
    report = {"job_id": spec["job_id"], "status": "error", "exit_code": None,
              "outputs": [], "started": started}
    os.makedirs(workdir, exist_ok=True)
    with open(log_path, "ab") as log:
        def say(text: str) -> None:
            log.write(f"[nipype-s3] {text}\n".encode())
            log.flush()

        try:
            report["stage"] = "fetching the input"
            data = make_s3_client(_data_session(cfg, spec), endpoint_url=cfg.endpoint_url,
                                  region=cfg.region)
            say(f"fetching {spec['input_s3']}")
            input_path = _fetch_input(data, spec["input_s3"], os.path.join(workdir, "input"))
            report["stage"] = "starting the command"
            output_dir = os.path.join(workdir, "output")
            os.makedirs(output_dir, exist_ok=True)
            argv = build_command(runtime=spec["runtime"], command=spec["command"],
                                 image=spec.get("image"), input_path=input_path,
                                 output_dir=output_dir, gpu=bool(spec.get("gpu")),
                                 env=spec.get("env"))
            say("running: " + shlex.join(argv))
            report["stage"] = "running the command"
            env = dict(os.environ)
            env.update({k: str(v) for k, v in (spec.get("env") or {}).items()})
            for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
                env.pop(secret, None)  # the tool gets no credentials of ours
            try:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=workdir, timeout=spec.get("timeout") or None)
                report["exit_code"] = proc.returncode
            except subprocess.TimeoutExpired:
                report["exit_code"] = None
                report["status"] = "timeout"
                say(f"the command exceeded its timeout of {spec.get('timeout')} s")
            if report["exit_code"] == 0:
                out = parse_s3_uri(spec["output_s3"])
                items = []
                files, broken = walk_files(output_dir)  # linked files and folders followed
                for full in files:
                    rel = os.path.relpath(full, output_dir).replace(os.sep, "/")
                    items.append(UploadItem(full, join_key(out.key, rel)))
                if broken:
                    say(f"not uploaded: {len(broken)} broken symbolic link(s), e.g. "
                        f"{os.path.relpath(broken[0], output_dir)}")
                report["stage"] = "uploading the outputs"
                own = make_s3_client(boto3.Session(region_name=cfg.region),
                                     endpoint_url=cfg.endpoint_url, region=cfg.region)
                say(f"uploading {len(items)} files to {spec['output_s3']}")
                upload_files(own, out.bucket, items, skip_unchanged=False)
                report["outputs"] = [f"s3://{out.bucket}/{i.key}" for i in items]
                report["status"] = "ok"
            elif report["status"] != "timeout":
                say(f"the command exited with code {report['exit_code']}")
        except Exception as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            say("the job failed:\n" + format_exc())
    report["finished"] = time.time()
    report["log_path"] = log_path
    return report
