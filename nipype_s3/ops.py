"""Operations on runs after the fact: cleanup and cost reports (used by the CLI)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator

import boto3
import botocore.exceptions

from .config import env_endpoint_url
from .ec2.instances import terminate_run
from .ec2.jobs import (
    PARAMETER_ROOT,
    RUN_TAG,
    RunLayout,
    data_credentials_parameter,
    job_key_parameter,
    parse_s3_prefix,
)
from .exceptions import ConfigurationError, EC2Error, S3ObjectNotFound
from .s3.delete import abort_incomplete_uploads, delete_keys, incomplete_uploads
from .s3.errors import error_code, s3_errors, what_to_do
from .s3.listing import iter_objects
from .s3.session import make_s3_client

__all__ = ["cleanup", "find_runs", "load_cost_report", "run_ids", "run_parameters",
           "run_queues", "data_credentials_parameter"]

logger = logging.getLogger(__name__)


#: a command someone waits on: an unreachable endpoint is said in seconds, not retried
#: for a minute
_CLI_CONFIG = dict(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2,
                                                                "mode": "standard"})


def _client(service: str, region: str | None = None):
    from botocore.config import Config

    session = boto3.Session(region_name=region)
    kwargs = {"region_name": region or session.region_name or "us-east-1",
              "config": Config(**_CLI_CONFIG)}
    endpoint = env_endpoint_url()
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return session.client(service, **kwargs)


def run_ids(ec2) -> list[str]:
    """Run ids of every live or stopped instance tagged by nipype-s3."""
    found = set()
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag-key", "Values": [RUN_TAG]},
            {"Name": "instance-state-name",
             "Values": ["pending", "running", "stopping", "stopped"]}]):
        for res in page.get("Reservations", []):
            for inst in res.get("Instances", []):
                for tag in inst.get("Tags", []):
                    if tag["Key"] == RUN_TAG:
                        found.add(tag["Value"])
    return sorted(found)


#: Every SSM parameter of a run is below this path (its signing key, EC2ContainerRun's
#: data credentials).
_QUEUE_PREFIX = "nipype-s3-"
# nipype-s3-<run>-jobs, nipype-s3-<run>-jobs-<instance type slug>, nipype-s3-<run>-events
_QUEUE = re.compile(r"nipype-s3-(?P<run>.+?)-(?:jobs(?:-[A-Za-z0-9_-]+)?|events)\Z")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")


@contextlib.contextmanager
def _aws(action: str) -> Iterator[None]:
    """Turn a refusal of EC2, SQS or SSM into one ``EC2Error`` saying what to do."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        hint = what_to_do(exc)
        if hint:
            raise EC2Error(f"cleanup could not {action}: {hint}") from exc
        code = error_code(exc) or type(exc).__name__
        raise EC2Error(f"cleanup could not {action} ({code}: {exc}). Check the account's "
                       "permissions and the region (--region), then run it again; nothing "
                       "is deleted twice.") from exc


def _queue_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _queue_urls(sqs, prefix: str) -> list[str]:
    with _aws(f"list the SQS queues named {prefix}*"):
        pages = sqs.get_paginator("list_queues").paginate(
            QueueNamePrefix=prefix, PaginationConfig={"PageSize": 1000})
        return [url for page in pages for url in page.get("QueueUrls", [])]


#: Batch job states not yet over
_BATCH_LIVE = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")


#: a run id as the plugins make them: Batch jobs are looked for only by a whole one
_FULL_RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


def batch_job_names(run_id: str) -> tuple[str, ...]:
    """The names BatchPlugin gives its jobs in run ``run_id`` (exactly these)."""
    return (f"nipype-s3-{run_id}-agents", f"nipype-s3-{run_id}-node")


def run_batch_jobs(batch, run_id: str, queues: list[str] | None = None) -> list[str]:
    """The Batch jobs of ``run_id`` not yet over (BatchPlugin's agents and nodes, by
    their exact names), in ``queues`` or every job queue. Where Batch may not be read
    (an account without it), none, said in the log."""
    names = batch_job_names(run_id)
    try:
        if queues is None:
            queues = [q["jobQueueArn"] for page in batch.get_paginator(
                "describe_job_queues").paginate() for q in page.get("jobQueues", [])]
        found = []
        for queue in queues:
            for name in names:  # exact names: a shorter id must not match other runs
                for page in batch.get_paginator("list_jobs").paginate(
                        jobQueue=queue, filters=[{"name": "JOB_NAME", "values": [name]}]):
                    found += [j["jobId"] for j in page.get("jobSummaryList", [])
                              if j.get("jobName") == name and j.get("status") in _BATCH_LIVE]
        return sorted(set(found))
    except botocore.exceptions.ClientError as exc:
        logger.warning("cleanup: Batch's jobs not looked at: %s", exc)
        return []


def run_queues(sqs, run_id: str) -> list[str]:
    """The URLs of a run's SQS queues: its job queues (one per instance type) and its
    event queue."""
    prefix = f"{_QUEUE_PREFIX}{run_id}-"
    out = []
    for url in _queue_urls(sqs, prefix):
        kind = _queue_name(url)[len(prefix):]
        if kind in ("jobs", "events") or kind.startswith("jobs-"):
            out.append(url)
    return sorted(out)


def _parameter_names(ssm, path: str) -> list[str]:
    with _aws(f"list the SSM parameters below {path}/"):
        pages = ssm.get_paginator("get_parameters_by_path").paginate(
            Path=path, Recursive=True, WithDecryption=False)  # the names are enough
        return [p["Name"] for page in pages for p in page.get("Parameters", [])]


def run_parameters(ssm, run_id: str) -> list[str]:
    """The names of a run's SSM parameters: everything below ``/nipype-s3/runs/<run>/``
    (the signing key; EC2ContainerRun's data credentials)."""
    names = set(_parameter_names(ssm, f"{PARAMETER_ROOT}/{run_id}"))
    for name in (job_key_parameter(run_id), data_credentials_parameter(run_id)):
        if name not in names:  # looked up by name too, in case listing missed them
            try:
                ssm.get_parameter(Name=name)
                names.add(name)
            except botocore.exceptions.ClientError:
                pass
    return sorted(names)


def find_runs(ec2, sqs, ssm, s3=None, bucket: str | None = None,
              prefix: str | None = None) -> list[str]:
    """Every run that left something: instances by tag, queues by name, SSM parameters
    by path and, given a bucket, the run folders and incomplete uploads below
    ``prefix/runs/`` — a run whose instances are gone is found too."""
    with _aws("list the instances tagged " + RUN_TAG):
        found = set(run_ids(ec2))
    for url in _queue_urls(sqs, _QUEUE_PREFIX):
        match = _QUEUE.match(_queue_name(url))
        if match:
            found.add(match.group("run"))
    root = PARAMETER_ROOT + "/"
    for name in _parameter_names(ssm, PARAMETER_ROOT):
        if name.startswith(root) and "/" in name[len(root):]:
            found.add(name[len(root):].split("/", 1)[0])
    if s3 is not None and bucket:
        runs_prefix = RunLayout(bucket, prefix or "", "").runs_prefix
        with s3_errors(bucket=bucket, key=runs_prefix, action="list the runs below",
                       endpoint=env_endpoint_url()):
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=runs_prefix, Delimiter="/")
            for page in pages:
                for common in page.get("CommonPrefixes") or []:
                    found.add(common["Prefix"][len(runs_prefix):].rstrip("/"))
        # a run may have left nothing but an upload that was never completed
        for key, _ in incomplete_uploads(s3, bucket, runs_prefix):
            rest = key[len(runs_prefix):]
            if "/" in rest:
                found.add(rest.split("/", 1)[0])
    return sorted(r for r in found if r)


def cleanup(*, run_id: str | None = None, all_runs: bool = False, s3_prefix: str | None = None,
            region: str | None = None, dry_run: bool = False) -> dict:
    """Delete what runs left behind; return what was (or, with ``dry_run``, would be)
    deleted.

    For each run: the instances tagged ``nipype-s3:run=<run>`` are terminated, and its
    Batch jobs not yet over (``nipype-s3-<run>-…``, in every job queue); its SQS
    queues (``nipype-s3-<run>-…``: job queues, one per instance type, and the event
    queue) and SSM parameters (below ``/nipype-s3/runs/<run>/``) deleted; with
    ``s3_prefix``, its incomplete multipart uploads aborted and its files deleted.
    ``all_runs`` finds the runs by all of these, not only by live instances.
    """
    if not run_id and not all_runs:
        raise ConfigurationError("cleanup needs a run id (--run ID) or --all.")
    if run_id and not _RUN_ID.match(run_id):
        raise ConfigurationError(
            f"cleanup: {run_id!r} is not a run id (letters, digits, '-' and '_', such as "
            "'20261122-031500-a1b2c3' or 'container-20261122-031500-a1b2c3').")
    ec2 = _client("ec2", region)
    sqs = _client("sqs", region)
    ssm = _client("ssm", region)
    s3 = bucket = prefix = None
    if s3_prefix:
        bucket, prefix = parse_s3_prefix(s3_prefix)
        s3 = make_s3_client(boto3.Session(region_name=region), bucket=bucket)
    runs = [run_id] if run_id else find_runs(ec2, sqs, ssm, s3, bucket, prefix)
    batch = _client("batch", region)
    report = {"runs": runs, "instances": [], "batch_jobs": [], "queues": [],
              "parameters": [], "uploads": [], "objects": []}
    for rid in runs:
        report["instances"] += terminate_run(ec2, rid, dry_run=dry_run)
        jobs = run_batch_jobs(batch, rid) if _FULL_RUN_ID.match(rid) else []
        report["batch_jobs"] += jobs
        for job_id in [] if dry_run else jobs:
            with _aws(f"terminate the Batch job {job_id}"):
                batch.terminate_job(jobId=job_id, reason=f"nipype-s3 cleanup of run {rid}")
        queues = run_queues(sqs, rid)
        report["queues"] += queues
        if not dry_run:
            for url in queues:
                try:
                    with _aws(f"delete the queue {url}"):
                        sqs.delete_queue(QueueUrl=url)
                except EC2Error as exc:
                    if "NonExistentQueue" not in error_code(exc.__cause__):
                        raise  # deleted meanwhile is deleted
        names = run_parameters(ssm, rid)
        report["parameters"] += names
        if not dry_run:
            for start in range(0, len(names), 10):  # at most 10 a request
                with _aws(f"delete the SSM parameters of run {rid}"):
                    ssm.delete_parameters(Names=names[start:start + 10])
        if s3 is not None:
            layout = RunLayout(bucket, prefix, rid)
            uploads = ([key for key, _ in incomplete_uploads(s3, bucket, layout.run_prefix)]
                       if dry_run else abort_incomplete_uploads(s3, bucket, layout.run_prefix))
            report["uploads"] += [f"s3://{bucket}/{k}" for k in uploads]
            keys = [o.key for o in iter_objects(s3, bucket, layout.run_prefix)]
            report["objects"] += [f"s3://{bucket}/{k}" for k in keys]
            if keys and not dry_run:
                delete_keys(s3, bucket, keys)
    return report


def load_cost_report(run_id: str, s3_prefix: str) -> dict:
    """The cost report EC2Plugin wrote for ``run_id``."""
    bucket, prefix = parse_s3_prefix(s3_prefix)
    layout = RunLayout(bucket, prefix, run_id)
    s3 = make_s3_client(boto3.Session(), bucket=bucket)
    try:
        with s3_errors(bucket=bucket, key=layout.cost_key, action="read",
                       endpoint=env_endpoint_url()):
            body = s3.get_object(Bucket=bucket, Key=layout.cost_key)["Body"].read()
    except S3ObjectNotFound as exc:
        runs_prefix = layout.runs_prefix
        known = _run_ids(s3, bucket, runs_prefix)
        listed = (f"The latest runs there: {', '.join(known[-5:])}." if known else
                  "There are no runs there.")
        raise S3ObjectNotFound(
            f"No cost report for run {run_id!r}: s3://{bucket}/{layout.cost_key} does not "
            f"exist. {listed} A run writes its report when it ends; check --run and "
            "--s3-prefix (the run's s3_prefix).", bucket=bucket, key=layout.cost_key,
            code=exc.code) from exc
    return json.loads(body)


def _run_ids(s3, bucket: str, runs_prefix: str) -> list[str]:
    """The run ids below ``runs_prefix`` (oldest first; ids start with their date)."""
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=runs_prefix, Delimiter="/")
        return sorted(p["Prefix"][len(runs_prefix):].rstrip("/")
                      for page in pages for p in page.get("CommonPrefixes", []))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return []
