"""What BatchPlugin submits: the agent's start-up inside the image, the agents of one
image (or one node), and whether a registered job definition holds what a run needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["_BOOT", "_AgentFleet", "_holds"]

logger = logging.getLogger("nipype.workflow")

# What an agent job runs: the controller's code, fetched from the content store and run
# only when its SHA-256 is the one the controller sent (the image is not changed).
_BOOT = """\
import hashlib, io, os, runpy, sys, zipfile
uri, digest = os.environ.get("NIPYPE_S3_PACKAGE"), os.environ.get("NIPYPE_S3_PACKAGE_SHA256")
if uri:
    import boto3
    bucket, key = uri[len("s3://"):].split("/", 1)
    data = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    if hashlib.sha256(data).hexdigest() != digest:
        sys.exit("nipype-s3: the package at " + uri + " does not match its SHA-256; not run")
    lib = "/tmp/nipype-s3-agent"
    zipfile.ZipFile(io.BytesIO(data)).extractall(lib)
    sys.path.insert(0, lib)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [lib, os.environ.get("PYTHONPATH")]))
sys.argv = ["nipype-s3 agent"]
runpy.run_module("nipype_s3.agent", run_name="__main__")
"""


@dataclass
class _AgentFleet:
    """The agents of one image: their queue, job definition, and the jobs submitted."""

    image: str | None
    queue_url: str
    job_definition: str
    config_json: str
    vcpus: int
    mem_gb: float
    instance_type: str = "batch"
    #: agent job id -> {"status", "submitted", "started", "stopped", "reason"}
    jobs: dict = field(default_factory=dict)
    #: one node's own Batch job (node.plugin_args = {"batch": "job"}): its name
    node: str | None = None
    #: the GPUs that node's job asks Batch for (node.plugin_args["gpus"])
    gpus: int = 0

    @property
    def key(self) -> str:
        return f"node:{self.node}" if self.node else self.image or ""


#: what a job definition registered by nipype_s3 may hold besides its container, as
#: Batch describes it (anything else set means someone else's revision)
_DESCRIBED = {"jobDefinitionName", "jobDefinitionArn", "revision", "status", "type", "tags",
              "containerProperties", "platformCapabilities", "containerOrchestrationType",
              "propagateTags", "parameters"}
#: what its container holds: the rest must be empty
_OURS = {"image", "command", "resourceRequirements", "jobRoleArn"}


def _empty(value) -> bool:
    """Nothing set: None, False, or containers holding only empty things (a default
    Batch may describe as ``{"devices": []}``)."""
    if isinstance(value, dict):
        return all(_empty(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_empty(v) for v in value)
    return not value


def _holds(described: dict, props: dict) -> bool:
    """Whether a registered job definition runs exactly what ``props`` says, and nothing
    more: every other field empty (no log driver, ulimits, timeout, retries, mounts,
    privileged mode, secrets, user...). Anyone who may register job definitions can add
    a revision under a name they can work out."""
    def requirements(d):
        return sorted((r.get("type"), str(r.get("value")))
                      for r in d.get("resourceRequirements") or [])

    there = described.get("containerProperties") or {}
    extra = [k for k, v in described.items() if k not in _DESCRIBED and not _empty(v)] + \
        [k for k, v in there.items() if k not in _OURS and not _empty(v)]
    if extra:
        logger.info("BatchPlugin: job definition %s:%s is not reused: it sets %s",
                    described.get("jobDefinitionName"), described.get("revision"),
                    ", ".join(sorted(extra)[:5]))
    return (not extra and described.get("type") == "container"
            and not described.get("parameters") and not described.get("propagateTags")
            and described.get("platformCapabilities", ["EC2"]) == ["EC2"]
            and described.get("containerOrchestrationType", "ECS") == "ECS"
            and there.get("image") == props["image"]
            and list(there.get("command") or []) == props["command"]
            and requirements(there) == requirements(props)
            and there.get("jobRoleArn") == props.get("jobRoleArn"))
