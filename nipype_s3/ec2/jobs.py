"""What a run keeps where, and the signed job messages between controller and agents.

Everything of one run lives below ``<s3_prefix>/runs/<run_id>/``::

    lease.json                 the controller's heartbeat; agents stop when it goes stale
    jobs/<job>/spec.json       what to fetch, which pickle, resources (signed)
    jobs/<job>/node.pklz       the node, pickled as nipype's batch plugins do
    jobs/<job>/attempt-<n>.log the agent's log of an attempt
    jobs/<job>/starts/<n>.json the n-th start of the job (signed; counts its attempts)
    done/<job>.json            the first finished attempt's report (written once)
    cost.json                  the run's cost report

Input and output files live once per content in ``<s3_prefix>/cas/sha256/``.

A job message names its spec and carries an HMAC-SHA256 of the spec's bytes under a
per-run key that is kept in SSM Parameter Store (a ``SecureString``), never in
user-data; an agent refuses a message whose tag does not verify or whose spec is not
below its own run's prefix.

What agents send back is signed with the same key: a ``done`` report and every event
is a *sealed* document (:func:`seal`): the JSON body as a string, its kind and the
HMAC of both, so a signed event cannot pass for a report. The controller reads a
bounded number of bytes and believes nothing of a document before :func:`unseal` has
verified it; every stored object a verified report names is then fetched by its
SHA-256 and checked against it, so no pickle is unpickled unless its digest was in a
document signed with the run's key.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from ..exceptions import ConfigurationError
from ..s3.uri import join_key

__all__ = ["RUN_TAG", "RunLayout", "new_run_id", "sign", "verify", "make_message",
           "open_message", "job_key_parameter", "new_job_key", "MessageRejected",
           "parse_s3_prefix", "seal", "unseal", "read_bounded", "MAX_SPEC_BYTES",
           "MAX_REPORT_BYTES", "MAX_MESSAGE_BYTES", "valid_job_id",
           "data_credentials_parameter", "PARAMETER_ROOT"]

#: The largest job spec an agent reads (its manifest lists every input file).
MAX_SPEC_BYTES = 64 * 1024 * 1024
#: The largest ``done`` report the controller reads (it lists every output file).
MAX_REPORT_BYTES = 64 * 1024 * 1024
#: SQS's own limit on a message body; anything larger is not ours.
MAX_MESSAGE_BYTES = 256 * 1024

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")

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


#: Every SSM parameter of a run lies below ``PARAMETER_ROOT/<run>/``.
PARAMETER_ROOT = "/nipype-s3/runs"


def job_key_parameter(run_id: str) -> str:
    """The SSM parameter that holds a run's job-signing key."""
    return f"{PARAMETER_ROOT}/{run_id}/job-key"


def data_credentials_parameter(run_id: str) -> str:
    """The SSM parameter in which EC2ContainerRun hands a job its data credentials."""
    return f"{PARAMETER_ROOT}/{run_id}/data-credentials"


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

    def start_key(self, job_id: str, slot: int) -> str:
        """Where the agent that starts ``job_id`` for the ``slot``-th time says so
        (signed): attempts are counted from these, not from what SQS counts."""
        return self.key("jobs", job_id, "starts", f"{slot}.json")

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


def valid_job_id(value) -> bool:
    """Whether ``value`` can be a job id (a string of plain characters, as we make them)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def verify(key: bytes, payload: bytes, tag) -> bool:
    """Whether ``tag`` is the HMAC of ``payload``: ``False`` for anything that is not 64
    lowercase hex characters (a number, non-ASCII text, bytes), never an exception."""
    if isinstance(tag, bytes):
        try:
            tag = tag.decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(tag, str) or _HEX64.fullmatch(tag) is None:
        return False
    if not isinstance(payload, (bytes, bytearray)):
        return False
    return hmac.compare_digest(sign(bytes(key), bytes(payload)).encode(), tag.encode())


def make_message(layout: RunLayout, job_id: str, spec_bytes: bytes, key: bytes) -> str:
    """The SQS body announcing a job."""
    return json.dumps({"run_id": layout.run_id, "job_id": job_id,
                       "spec_key": layout.spec_key(job_id), "hmac": sign(key, spec_bytes),
                       "sent": time.time()})


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def open_message(body, layout: RunLayout) -> dict:
    """Parse a job message and check it names a spec of ``layout``'s run.

    Every field is checked for its type before use, so no body (binary, huge, a JSON
    list, numbers where strings belong) raises anything but :class:`MessageRejected`.

    Raises
    ------
    MessageRejected
        Not JSON, wrong types, another run, or a spec outside the run's prefix.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageRejected("malformed job message: not UTF-8 text") from None
    if not isinstance(body, str):
        raise MessageRejected(f"malformed job message: of type {type(body).__name__}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageRejected(f"malformed job message: {len(body)} characters (at most "
                              f"{MAX_MESSAGE_BYTES})")
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MessageRejected(f"malformed job message: not JSON ({exc})"[:200]) from None
    if not isinstance(msg, dict):
        raise MessageRejected(f"malformed job message: a JSON {type(msg).__name__}")
    fields = {name: msg.get(name) for name in ("run_id", "job_id", "spec_key", "hmac")}
    wrong = [name for name, value in fields.items() if not isinstance(value, str)]
    if wrong:
        raise MessageRejected(f"malformed job message: no text {wrong[0]!r} (got "
                              f"{_short(fields[wrong[0]])})")
    if fields["run_id"] != layout.run_id:
        raise MessageRejected(f"message of run {_short(fields['run_id'])}, not this "
                              f"agent's run {layout.run_id!r}")
    if not valid_job_id(fields["job_id"]):
        raise MessageRejected(f"malformed job message: job id {_short(fields['job_id'])}")
    if fields["spec_key"] != layout.spec_key(fields["job_id"]):
        raise MessageRejected(f"spec {_short(fields['spec_key'])} is not below this run's "
                              f"prefix {layout.run_prefix!r} as job {fields['job_id']!r}'s")
    if _HEX64.fullmatch(fields["hmac"]) is None:
        raise MessageRejected("malformed job message: a signature that is not 64 hex characters")
    return msg


def seal(key: bytes, kind: str, body: dict) -> bytes:
    """A signed document of ``kind`` (``"report"``, ``"event"``) holding ``body``."""
    text = json.dumps(body, sort_keys=True)
    return json.dumps({"kind": kind, "body": text,
                       "hmac": sign(key, f"{kind}\n{text}".encode())}).encode()


def unseal(key: bytes, data, kind: str, *, limit: int = MAX_REPORT_BYTES) -> dict:
    """The body of a document :func:`seal` made, once its signature is verified.

    Raises
    ------
    MessageRejected
        Too large, not a sealed document of ``kind``, or a signature that does not
        verify under ``key`` (written by someone without the run's key).
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if not isinstance(data, (bytes, bytearray)):
        raise MessageRejected(f"a {kind} of type {type(data).__name__}")
    if len(data) > limit:
        raise MessageRejected(f"a {kind} of {len(data)} bytes (at most {limit})")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise MessageRejected(f"a {kind} that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind or \
            not isinstance(doc.get("body"), str):
        raise MessageRejected(f"not a signed {kind} (no signed body of that kind)")
    if not verify(key, f"{kind}\n{doc['body']}".encode("utf-8", "surrogateescape"),
                  doc.get("hmac")):
        raise MessageRejected(f"a {kind} whose signature does not verify with this run's "
                              "key (not written by one of its agents)")
    try:
        body = json.loads(doc["body"])
    except (ValueError, RecursionError):
        raise MessageRejected(f"a signed {kind} whose body is not JSON") from None
    if not isinstance(body, dict):
        raise MessageRejected(f"a signed {kind} whose body is not an object")
    return body


def read_bounded(client, bucket: str, key: str, limit: int, *, what: str) -> bytes:
    """The bytes of ``s3://bucket/key``, refused before they are read when larger than
    ``limit`` (a planted object of gigabytes must not fill memory).

    Raises
    ------
    MessageRejected
        The object is larger than ``limit``.
    botocore.exceptions.ClientError
        As S3 answered (missing, refused).
    """
    resp = client.get_object(Bucket=bucket, Key=key)
    size = int(resp.get("ContentLength") or 0)
    body = resp["Body"]
    if size > limit:
        body.close()
        raise MessageRejected(f"the {what} s3://{bucket}/{key} is {size} bytes, more than "
                              f"the {limit} a genuine one can be")
    data = body.read(limit + 1)
    body.close()
    if len(data) > limit:
        raise MessageRejected(f"the {what} s3://{bucket}/{key} is more than {limit} bytes")
    return data


def parse_s3_prefix(value: str, plugin: str = "EC2Plugin"):
    """``s3://bucket/prefix`` → (bucket, prefix) with a clear error."""
    from ..s3.uri import parse_s3_uri

    if not value:
        raise ConfigurationError(
            f"{plugin} needs plugin_args['s3_prefix'], an s3:// location for the run's "
            "files, e.g. {'s3_prefix': 's3://my-bucket/nipype-runs'}.")
    uri = parse_s3_uri(value)
    if uri.key.startswith("/") or "//" in uri.key:
        raise ConfigurationError(
            f"s3_prefix {value!r} has an empty folder name ('//'): S3 keeps it as part of "
            "the key, which is rarely what was meant. Write it with single '/'.")
    return uri.bucket, uri.key.strip("/")
