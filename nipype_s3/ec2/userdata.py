"""EC2 user-data that only boots the agent (no secrets: user-data is readable by anyone
with API access to the account, and capped at 16 KB)."""

from __future__ import annotations

import shlex
import sys

from ..exceptions import ConfigurationError

__all__ = ["render_user_data", "agent_config_from_user_data", "USER_DATA_LIMIT"]

USER_DATA_LIMIT = 16 * 1024
_MARK = "NIPYPE_S3_AGENT_CONFIG="

_HEAD = """#!/bin/bash
# nipype-s3 agent bootstrap for run {run_id}.
# No credentials here: the agent uses the instance role. When the agent stops (idle,
# stale controller lease, or maximum lifetime) the instance shuts down, which
# terminates it (InstanceInitiatedShutdownBehavior=terminate).
set -uo pipefail
exec >>/var/log/nipype-s3-agent.log 2>&1
trap 'shutdown -h now' EXIT
{mark}{config}
export NIPYPE_S3_AGENT_CONFIG
export NIPYPE_S3_WORKER_ROOT={worker_root}
export AWS_DEFAULT_REGION={region}
"""

#: fetch the shipped package to /tmp/nipype_s3.zip, installing nothing that differs
_FETCH = """PKG_URI={uri}; aws s3 cp "$PKG_URI" /tmp/nipype_s3.zip && {{ echo "{sha}  \
/tmp/nipype_s3.zip" | sha256sum -c --quiet - || {{ echo "nipype-s3: the package at \
$PKG_URI does not match its SHA-256; not installed" >&2; rm -f /tmp/nipype_s3.zip; exit 1; \
}}; }}"""

_VENV = """VENV=/opt/nipype-s3
# the controller's Python (its pinned packages need it): on the image, from the
# distribution's packages (Amazon Linux 2023: python3.11, python3.12), or a standalone
# build through uv; the image's own python3 (3.9 on Amazon Linux 2023) is not enough
PYV={python_version}
pick_python() {{
  local cand
  for cand in "python$PYV" /usr/bin/python$PYV /usr/local/bin/python$PYV; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c \\
        'import sys, venv; print("%d.%d" % sys.version_info[:2])' 2>/dev/null \\
        | grep -qx "$PYV"; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}}
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(pick_python)
  if [ -z "$PY" ] && command -v dnf >/dev/null 2>&1; then
    dnf install -y -q "python$PYV" "python$PYV-pip" && PY=$(pick_python)
  fi
  if [ -z "$PY" ] && command -v python3 >/dev/null 2>&1; then
    UV="env PYTHONPATH=/opt/nipype-s3-uv python3 -m uv"
    python3 -m pip install --quiet --target /opt/nipype-s3-uv uv \\
      && $UV python install "$PYV" && PY=$($UV python find "$PYV")
  fi
  if [ -z "$PY" ]; then
    echo "nipype-s3: no Python $PYV on this instance (the controller runs $PYV, and its" \\
      "packages are pinned for it): not on the image, not from dnf, and uv could not" \\
      "install one. Use an AMI with python$PYV, or run the controller with the" \\
      "image's Python." >&2
    exit 1
  fi
  "$PY" -m venv "$VENV" || {{
    echo "nipype-s3: could not make a virtual environment with $PY" >&2; exit 1; }}
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet {requirements} || {{
    echo "nipype-s3: pip could not install the agent's packages (see above): check" \\
      "that the subnet reaches the package index" >&2; exit 1; }}
fi
# the controller's own code, every boot (an AMI with the environment baked in too)
{install_self}
{setup}
# one numeric thread in the agent itself: its one-CPU jobs are forks of it
OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 "$VENV/bin/python" -m nipype_s3.agent
"""

# The agent inside the user's image: Docker from the distribution, the image pulled (an
# ECR login first when it is in ECR), the agent's own code (verified) and, if the image
# lacks them, its few dependencies in a folder mounted read-only on PYTHONPATH; the image
# itself is not changed. Host networking: the instance role's credentials come from the
# metadata service as for any process of the instance (hop limit 1 holds).
_IMAGE = """IMAGE={image}
AGENT_DIR=/opt/nipype-s3-agent
fail() {{ echo "nipype-s3: $*" >&2; exit 1; }}
command -v docker >/dev/null 2>&1 || dnf install -y -q docker \\
  || fail "could not install Docker (dnf install docker): use an AMI with Docker"
systemctl start docker
for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null 2>&1 || fail "the Docker daemon did not start"
REGISTRY=${{IMAGE%%/*}}
# an ECR registry, exactly (ACCOUNT.dkr.ecr[-fips].REGION.amazonaws.com[.cn]): only there
# does the instance role's ECR token go
ECR='^[0-9]{{12}}\\.dkr\\.ecr(-fips)?\\.([a-z0-9-]+)\\.amazonaws\\.com(\\.cn)?$'
if [[ "$REGISTRY" =~ $ECR ]]; then
  aws ecr get-login-password --region "${{BASH_REMATCH[2]}}" \\
    | docker login --username AWS --password-stdin "$REGISTRY" >/dev/null \\
    || fail "could not log in to $REGISTRY: the instance profile needs" \\
      "ecr:GetAuthorizationToken, ecr:BatchGetImage and ecr:GetDownloadUrlForLayer"
fi
docker image inspect "$IMAGE" >/dev/null 2>&1 || docker pull --quiet "$IMAGE" \\
  || fail "could not pull $IMAGE (see above): check its name and that this instance" \\
    "may read it"
mkdir -p "$AGENT_DIR/lib" "$AGENT_DIR/deps" "$NIPYPE_S3_WORKER_ROOT"
in_image() {{ docker run --rm --network host --entrypoint python3 "$@"; }}
in_image "$IMAGE" -c 'import sys, nipype; assert sys.version_info >= (3, 10)' \\
  || fail "$IMAGE has no python3 >= 3.10 with nipype on its PATH (nipype-s3 check-image" \\
    "$IMAGE says what it has)"
{install_self}
in_image "$IMAGE" -c 'import boto3' 2>/dev/null || in_image --user 0 -v "$AGENT_DIR/deps:/deps" \\
  "$IMAGE" -m pip install --quiet --target /deps {agent_requirements} \\
  || fail "pip in $IMAGE could not install the agent's packages (see above)"
{user_requirements}
# the image's user writes the work folder
chown "$(docker run --rm --entrypoint sh "$IMAGE" -c 'echo $(id -u):$(id -g)')" \\
  "$NIPYPE_S3_WORKER_ROOT"
{setup}
docker run --rm --name nipype-s3-agent --network host {gpus}\\
  -v "$AGENT_DIR:$AGENT_DIR:ro" -v "$NIPYPE_S3_WORKER_ROOT:$NIPYPE_S3_WORKER_ROOT" \\
  -e PYTHONPATH="$AGENT_DIR/lib:$AGENT_DIR/deps" -e NIPYPE_S3_AGENT_CONFIG \\
  -e NIPYPE_S3_WORKER_ROOT -e AWS_DEFAULT_REGION -e NIPYPE_NO_ET=1 \\
  -e OMP_NUM_THREADS=1 -e OPENBLAS_NUM_THREADS=1 -e MKL_NUM_THREADS=1 \\
  --entrypoint python3 "$IMAGE" -m nipype_s3.agent
"""


def render_user_data(*, run_id: str, config_json: str, region: str, worker_root: str,
                     requirements: list[str], package_s3_uri: str | None = None,
                     package_sha256: str | None = None, setup_commands: str = "",
                     python_version: str | None = None, image: str | None = None,
                     gpus: bool = False, image_requirements: list[str] = ()) -> str:
    """The bootstrap script for an agent instance.

    Parameters
    ----------
    config_json : str
        :class:`~nipype_s3.agent.config.AgentConfig` as JSON (no secrets).
    requirements : list of str
        pip requirement specifiers pinned to the controller's versions. With ``image``,
        only what the agent itself needs (boto3 and its kin), installed only when the
        image lacks it.
    package_s3_uri : str, optional
        A zip of the controller's own ``nipype_s3`` package, copied into the agent's
        environment so the agent runs the very same code.
    package_sha256 : str
        Required with ``package_s3_uri``: the zip's SHA-256. The bootstrap installs
        nothing whose digest differs (an object planted at the package's key).
    setup_commands : str
        Extra shell lines run before the agent starts (e.g. ``docker pull``).
    python_version : str
        ``"3.12"``: the Python the agent's environment is made with (default: this
        controller's), found on the image, installed with ``dnf``, or as a standalone
        build through ``uv``; the bootstrap stops with a clear message when none can be.
    image : str, optional
        A container image holding Python >= 3.10, nipype and the node's tools: the agent
        runs inside it (Docker on the instance) instead of in a virtual environment.
    gpus : bool
        With ``image``: give the container the instance's GPUs (``--gpus all``).
    image_requirements : list of str
        With ``image``: the user's own requirements, installed with the image's ``pip``
        beside the agent's code (the image itself is not changed).

    Raises
    ------
    ConfigurationError
        The script would exceed AWS's 16 KB limit.
    """
    install_self = ":"
    if package_s3_uri:
        if not (isinstance(package_sha256, str) and len(package_sha256) == 64 and
                all(c in "0123456789abcdef" for c in package_sha256)):
            raise ConfigurationError(
                f"package_sha256 must be the 64 hex digits of the package's SHA-256, not "
                f"{package_sha256!r}: the bootstrap installs nothing it cannot verify.")
        fetch = _FETCH.format(uri=shlex.quote(package_s3_uri), sha=package_sha256)
        if image:
            install_self = (
                f'{fetch} && in_image --user 0 -v /tmp/nipype_s3.zip:/tmp/nipype_s3.zip:ro '
                '-v "$AGENT_DIR/lib:/out" "$IMAGE" -m zipfile -e /tmp/nipype_s3.zip /out '
                '|| fail "could not install the agent\'s code"')
        else:
            install_self = (
                f'{fetch} && "$VENV/bin/python" -c "import site, sys, zipfile; '
                'zipfile.ZipFile(sys.argv[1]).extractall(site.getsitepackages()[0])" '
                '/tmp/nipype_s3.zip || exit 1')
    fields = dict(run_id=run_id, mark=_MARK, config=shlex.quote(config_json),
                  worker_root=shlex.quote(worker_root), region=shlex.quote(region))
    reqs = " ".join(shlex.quote(r) for r in requirements)
    if image:
        extra = ":"
        if image_requirements:
            extra = ('in_image --user 0 -v "$AGENT_DIR/deps:/deps" "$IMAGE" -m pip install '
                     "--quiet --target /deps "
                     + " ".join(shlex.quote(r) for r in image_requirements)
                     + ' || fail "pip in $IMAGE could not install the requirements (see '
                     'above)"')
        body = _IMAGE.format(image=shlex.quote(image), install_self=install_self,
                             agent_requirements=reqs, gpus="--gpus all " if gpus else "",
                             setup=setup_commands.strip() or ":", user_requirements=extra)
    else:
        body = _VENV.format(
            python_version=python_version or "{}.{}".format(*sys.version_info[:2]),
            requirements=reqs, install_self=install_self,
            setup=setup_commands.strip() or ":")
    script = _HEAD.format(**fields) + body
    size = len(script.encode("utf-8"))
    if size > USER_DATA_LIMIT:
        raise ConfigurationError(
            f"The agent's user-data would be {size} bytes; AWS allows {USER_DATA_LIMIT}. "
            "Shorten setup_commands or the requirement list.")
    return script


def with_agent_config(user_data: str, config_json: str) -> str:
    """The bootstrap script with another agent configuration in it."""
    return "\n".join(_MARK + shlex.quote(config_json) if line.startswith(_MARK) else line
                     for line in user_data.split("\n"))


def agent_config_from_user_data(user_data: str) -> str | None:
    """The agent configuration JSON embedded in a bootstrap script (None if absent)."""
    for line in user_data.splitlines():
        if line.startswith(_MARK):
            parts = shlex.split(line[len(_MARK):])
            return parts[0] if parts else None
    return None
