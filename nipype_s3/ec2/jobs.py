"""What a run keeps where, and the signed job messages between controller and agents.

Everything of one run lives below ``<s3_prefix>/runs/<run_id>/``::

    lease.json                 the controller's heartbeat; agents stop when it goes stale
    jobs/<job>/spec.json       what to fetch, which pickle, resources (signed)
    jobs/<job>/node.pklz       the node, pickled as nipype's batch plugins do
    jobs/<job>/attempt-<n>.log the agent's log of an attempt
    done/<job>.json            the first finished attempt's report (written once)
    cost.json                  the run's cost report

Input and output files live once per content in ``<s3_prefix>/cas/sha256/``.

A job message names its spec and carries an HMAC-SHA256 of the spec's bytes under a
per-run key that is kept in SSM Parameter Store (a ``SecureString``), never in
user-data; an agent refuses a message whose tag does not verify or whose spec is not
below its own run's prefix.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from ..exceptions import ConfigurationError
from ..s3.uri import join_key

__all__ = ["RUN_TAG", "RunLayout", "new_run_id", "sign", "verify", "make_message",
           "open_message", "job_key_parameter", "new_job_key", "MessageRejected",
           "parse_s3_prefix"]

#: The tag every instance of a run carries (value: the run id).
RUN_TAG = "nipype-s3:run"


class MessageRejected(Exception):
    """A job message failed its integrity or origin check."""


def new_run_id() -> str:
    """``20261122-031500-a1b2c3``: sortable, unique enough, valid in SQS and tag values."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def new_job_key() -> bytes:
    return secrets.token_bytes(32)


def job_key_parameter(run_id: str) -> str:
    """The SSM parameter that holds a run's job-signing key."""
    return f"/nipype-s3/runs/{run_id}/job-key"


@dataclass(frozen=True)
class RunLayout:
    """Keys of one run below ``s3://bucket/prefix``."""

    bucket: str
    prefix: str
    run_id: str

    @property
    def runs_prefix(self) -> str:
        """Where every run below ``s3://bucket/prefix`` keeps its files."""
        return join_key(self.prefix, "runs") + "/"

    @property
    def run_prefix(self) -> str:
        return self.runs_prefix + self.run_id + "/"

    def key(self, *parts: str) -> str:
        return join_key(self.run_prefix, *parts)

    def spec_key(self, job_id: str) -> str:
        return self.key("jobs", job_id, "spec.json")

    def pickle_key(self, job_id: str) -> str:
        return self.key("jobs", job_id, "node.pklz")

    def log_key(self, job_id: str, attempt: int) -> str:
        return self.key("jobs", job_id, f"attempt-{attempt}.log")

    def done_key(self, job_id: str) -> str:
        return self.key("done", f"{job_id}.json")

    @property
    def lease_key(self) -> str:
        return self.key("lease.json")

    @property
    def cost_key(self) -> str:
        return self.key("cost.json")

    def queue_name(self, kind: str) -> str:
        return f"nipype-s3-{self.run_id}-{kind}"

    def to_json(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "run_id": self.run_id}


def sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes, payload: bytes, tag: str) -> bool:
    return hmac.compare_digest(sign(key, payload), str(tag))


def make_message(layout: RunLayout, job_id: str, spec_bytes: bytes, key: bytes) -> str:
    """The SQS body announcing a job."""
    return json.dumps({"run_id": layout.run_id, "job_id": job_id,
                       "spec_key": layout.spec_key(job_id), "hmac": sign(key, spec_bytes),
                       "sent": time.time()})


def open_message(body: str, layout: RunLayout) -> dict:
    """Parse a job message and check it names a spec of ``layout``'s run.

    Raises
    ------
    MessageRejected
        Not JSON, another run, or a spec outside the run's prefix.
    """
    try:
        msg = json.loads(body)
        run_id, job_id, spec_key = msg["run_id"], msg["job_id"], msg["spec_key"]
        str(msg["hmac"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MessageRejected(f"malformed job message ({exc})") from None
    if run_id != layout.run_id:
        raise MessageRejected(f"message of run {run_id!r}, not this agent's run "
                              f"{layout.run_id!r}")
    if spec_key != layout.spec_key(job_id) or ".." in spec_key:
        raise MessageRejected(f"spec {spec_key!r} is not below this run's prefix "
                              f"{layout.run_prefix!r}")
    return msg


def parse_s3_prefix(value: str):
    """``s3://bucket/prefix`` → (bucket, prefix) with a clear error."""
    from ..s3.uri import parse_s3_uri

    if not value:
        raise ConfigurationError(
            "EC2Plugin needs plugin_args['s3_prefix'], an s3:// location for the run's "
            "files, e.g. {'s3_prefix': 's3://my-bucket/nipype-runs'}.")
    uri = parse_s3_uri(value)
    return uri.bucket, uri.key.strip("/")
