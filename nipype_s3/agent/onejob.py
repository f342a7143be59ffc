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
import shutil
import subprocess
import time
from traceback import format_exc

import boto3

from ..localfs import confine, walk_files
from ..s3.download import DownloadItem, download_files
from ..s3.listing import iter_objects
from ..s3.session import make_s3_client
from ..s3.upload import UploadItem, upload_files
from ..s3.uri import join_key, parse_s3_uri
from .command import INPUT_VAR, OUTPUT_VAR, Command, argv_words, check_env_names, shell_text

__all__ = ["build_command", "run_one_job", "Command", "CONTAINER_INPUT", "CONTAINER_OUTPUT"]

CONTAINER_INPUT = "/input"
CONTAINER_OUTPUT = "/output"


def build_command(*, runtime: str, command: str, image: str | None, input_path: str,
                  output_dir: str, gpu: bool = False, env: dict | None = None) -> Command:
    """What runs ``command`` for ``runtime``: the argv, and the variables to add to its
    environment.

    ``command`` is a template with ``{input}`` and ``{output_dir}``; inside a container
    they are the mounted paths (``/input/<name>`` and ``/output``), with the host's input
    folder mounted read-only at ``/input``. The paths reach the command as
    ``NIPYPE_S3_INPUT`` / ``NIPYPE_S3_OUTPUT_DIR`` or as arguments, never as shell text,
    and ``env`` values only through the environment (see :mod:`.command`).

    Raises
    ------
    ValueError
        No image for a container runtime, an unknown runtime, or an invalid ``env`` name.
    """
    env = {k: str(v) for k, v in (env or {}).items()}
    check_env_names(env, runtime)
    if runtime == "none":
        paths = {INPUT_VAR: input_path, OUTPUT_VAR: output_dir}
        return Command(["/bin/bash", "-c", shell_text(command)], {**env, **paths})
    if not image:
        raise ValueError(f"runtime {runtime!r} needs an image")
    in_dir = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    inner_input = CONTAINER_INPUT if os.path.isdir(input_path) else \
        f"{CONTAINER_INPUT}/{os.path.basename(input_path)}"
    paths = {INPUT_VAR: inner_input, OUTPUT_VAR: CONTAINER_OUTPUT}
    inner = argv_words(command, paths)
    names = sorted(env) + [INPUT_VAR, OUTPUT_VAR]
    if runtime == "docker":
        argv = ["docker", "run", "--rm"]
        if gpu:
            argv += ["--gpus", "all"]
        argv += ["-v", f"{in_dir}:{CONTAINER_INPUT}:ro", "-v", f"{output_dir}:{CONTAINER_OUTPUT}"]
        for name in names:  # no value: docker takes it from its own environment
            argv += ["-e", name]
        return Command(argv + [image] + inner, {**env, **paths})
    if runtime in ("apptainer", "singularity"):
        argv = [runtime, "exec", "--cleanenv"]
        if gpu:
            argv.append("--nv")
        argv += ["-B", f"{in_dir}:{CONTAINER_INPUT}:ro", "-B", f"{output_dir}:{CONTAINER_OUTPUT}"]
        image_ref = image if "://" in image or image.endswith(".sif") else f"docker://{image}"
        # set inside the container, --cleanenv notwithstanding
        prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
        return Command(argv + [image_ref] + inner,
                       {prefix + k: v for k, v in {**env, **paths}.items()})
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
        # a key with '..' or empty segments below the prefix would land outside the
        # job's folder: refused, naming it, before anything is fetched
        items = [DownloadItem(o.key, confine(dest_root, o.key[len(uri.key):],
                                             what=f"S3 key s3://{uri.bucket}/{o.key}"),
                              o.size, o.etag, o.last_modified)
                 for o in iter_objects(client, uri.bucket, uri.key) if not o.key.endswith("/")]
        download_files(client, uri.bucket, items)
        return dest_root
    dest = confine(dest_root, os.path.basename(uri.key),
                   what=f"S3 key s3://{uri.bucket}/{uri.key}")
    download_files(client, uri.bucket, [DownloadItem(uri.key, dest)])
    return dest


def run_one_job(cfg, spec: dict, workdir: str) -> dict:
    """Run the container job in ``workdir``; return the done report (the caller writes it
    and uploads the log, ``report["log_path"]``).

    An existing instance runs one job after another in the same ``workdir``, so it is
    emptied first: nothing of an earlier job is seen by this one, or uploaded with its
    outputs. The input and output folders are removed once the outputs are uploaded
    (or the job failed); the folder itself, which then holds only the log, when this
    process exits, after the caller has uploaded the log. Values of the job's ``env``
    are masked in the log and the error text, should the command print them.
    """
    started = time.time()
    _fresh_folder(workdir)  # removed by the agent once the log is uploaded
    log_path = os.path.join(workdir, "job.log")
    report = {"job_id": spec["job_id"], "status": "error", "exit_code": None,
              "outputs": [], "started": started}
    secrets = _secrets(spec.get("env") or {})
    with open(log_path, "wb") as log:
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
            cmd = build_command(runtime=spec["runtime"], command=spec["command"],
                                image=spec.get("image"), input_path=input_path,
                                output_dir=output_dir, gpu=bool(spec.get("gpu")),
                                env=spec.get("env"))
            say("running: " + shlex.join(cmd.argv))
            say("with the environment variables " + ", ".join(sorted(cmd.env))
                + " (values not shown)")
            report["stage"] = "running the command"
            env = dict(os.environ)
            for secret in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
                env.pop(secret, None)  # the tool gets no credentials of ours
            env.update(cmd.env)
            try:
                proc = subprocess.run(cmd.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
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
            report["error"] = _mask(f"{type(exc).__name__}: {exc}", secrets)[:1000]
            say("the job failed:\n" + format_exc())
        finally:  # the data goes now; the log stays for the caller to upload
            for name in ("input", "output"):
                shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    _mask_file(log_path, secrets)
    report["finished"] = time.time()
    report["log_path"] = log_path
    return report


def _fresh_folder(path: str) -> None:
    """Make ``path`` an empty folder only this user may read, whatever was there."""
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path, mode=0o700)


#: Values shorter than this are not masked in logs (``OMP_NUM_THREADS=4`` is no secret,
#: and masking every ``4`` would ruin the log).
MASK_MIN_LENGTH = 6


def _secrets(env: dict) -> list[bytes]:
    """The texts to mask: each ``env`` value, and each line of a value of several lines,
    longest first."""
    found = set()
    for value in env.values():
        value = str(value)
        for text in [value, *value.splitlines()]:
            if len(text.strip()) >= MASK_MIN_LENGTH:
                found.add(text.encode())
    return sorted(found, key=len, reverse=True)


def _mask(text: str, secrets: list[bytes]) -> str:
    for secret in secrets:
        text = text.replace(secret.decode(), "***")
    return text


def _mask_file(path: str, secrets: list[bytes], chunk: int = 1 << 20) -> None:
    """Replace ``secrets`` by ``***`` in the file at ``path``, reading it in chunks."""
    if not secrets:
        return
    keep = max(len(s) for s in secrets) - 1  # a secret may straddle two chunks
    tmp = path + ".masked"
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        carry = b""
        while True:
            block = src.read(chunk)
            data = carry + block
            for secret in secrets:
                data = data.replace(secret, b"***")
            if not block:
                dst.write(data)
                break
            cut = max(0, len(data) - keep)
            dst.write(data[:cut])
            carry = data[cut:]
    os.replace(tmp, path)
