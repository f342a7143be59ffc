"""Checking a container image before a run uses it (``nipype-s3 check-image IMAGE``).

The image is pulled when it is not here, its ``python3`` says which Python, nipype,
nibabel and boto3 it has, and the agent's own code (this controller's, mounted read-only
as on an instance) is started in it for its self-test. The versions are held against
this controller's as an agent does at boot (:mod:`nipype_s3.remote.versions`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import zipfile

from .exceptions import ConfigurationError
from .remote.settings import checked_image
from .remote.versions import mismatch, runtime_versions

__all__ = ["check_image"]

_PROBE = """
import json, platform, sys
from importlib import metadata
out = {"python": platform.python_version(), "executable": sys.executable}
for dist in ("nipype", "nibabel", "boto3"):
    try:
        out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        out[dist] = "missing"
print(json.dumps(out))
"""


def _docker(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def check_image(image: str, *, pull: bool = True) -> dict:
    """What ``image`` holds and whether EC2Plugin's agent can run this controller's nodes
    in it.

    Returns a dict: ``image``, ``versions`` (the image's), ``controller`` (ours),
    ``problems`` (sentences; empty when the image will do), ``agent`` (what the agent's
    self-test printed, or why it could not run).

    Raises
    ------
    ConfigurationError
        No Docker here, or the image cannot be found or pulled.
    """
    checked_image(image, "the image")
    if not shutil.which("docker"):
        raise ConfigurationError("check-image needs the docker command and a running "
                                 "Docker engine on this machine.")
    if _docker("image", "inspect", image).returncode != 0:
        if not pull:
            raise ConfigurationError(f"{image} is not on this machine (and --no-pull).")
        pulled = _docker("pull", "--quiet", image)
        if pulled.returncode != 0:
            raise ConfigurationError(
                f"could not pull {image}: {pulled.stderr.strip()[-500:].rstrip('.')}. "
                "Check its name, "
                "and log in to its registry (for ECR: aws ecr get-login-password | docker "
                "login --username AWS --password-stdin REGISTRY).")
    run = ("run", "--rm", "--network", "none", "--entrypoint", "python3")
    probe = _docker(*run, image, "-c", _PROBE, timeout=300)
    ours = runtime_versions()
    report = {"image": image, "controller": ours, "versions": {}, "problems": [],
              "agent": ""}
    if probe.returncode != 0:
        said = probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"]
        report["problems"].append(f"{image} has no working python3 on its PATH: "
                                  f"{said[0][-300:]}")
        return report
    theirs = json.loads(probe.stdout.strip().splitlines()[-1])
    report["versions"] = theirs
    if tuple(int(x) for x in theirs["python"].split(".")[:2]) < (3, 10):
        report["problems"].append(f"{image}'s python3 is {theirs['python']}; the agent "
                                  "needs 3.10 or newer.")
    if theirs.get("nipype") == "missing":
        report["problems"].append(f"{image}'s python3 ({theirs['executable']}) has no "
                                  "nipype: install it in the image.")
    why = mismatch(ours, theirs, image)
    if why and theirs.get("nipype") != "missing":
        report["problems"].append(why)
    if theirs.get("boto3") == "missing":
        report["agent"] = ("not started here: the image has no boto3, which the bootstrap "
                           "installs (pip) into a folder beside the agent's code at boot")
        return report
    report["agent"] = _agent_self_test(image, run)
    if not report["agent"].startswith("ok"):
        report["problems"].append(f"the agent does not start in {image}: {report['agent']}")
    return report


def _agent_self_test(image: str, run: tuple) -> str:
    """Start the agent's code in the image, as an instance would (mounted read-only on
    PYTHONPATH), with ``--self-test``."""
    from .remote.staging import _zip_package

    pkg_dir = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="nipype-s3-check-") as tmp:
        import io

        with zipfile.ZipFile(io.BytesIO(_zip_package(pkg_dir))) as zf:
            zf.extractall(os.path.join(tmp, "lib"))
        os.chmod(tmp, 0o755)
        done = _docker(*run[:-2], "-v", f"{tmp}:/opt/nipype-s3-agent:ro", "-e",
                       "PYTHONPATH=/opt/nipype-s3-agent/lib", "--entrypoint", "python3",
                       image, "-m", "nipype_s3.agent", "--self-test", timeout=300)
    if done.returncode != 0:
        return (done.stderr.strip() or done.stdout.strip())[-500:]
    return "ok: " + done.stdout.strip().splitlines()[-1]
