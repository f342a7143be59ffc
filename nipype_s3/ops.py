"""Operations on runs after the fact: cleanup and cost reports (used by the CLI)."""

from __future__ import annotations

import json
import logging

import boto3
import botocore.exceptions

from .config import env_endpoint_url
from .ec2.instances import terminate_run
from .ec2.jobs import RUN_TAG, RunLayout, job_key_parameter, parse_s3_prefix
from .exceptions import ConfigurationError, S3ObjectNotFound
from .s3.delete import delete_keys
from .s3.errors import s3_errors
from .s3.listing import iter_objects
from .s3.session import make_s3_client

__all__ = ["cleanup", "load_cost_report", "run_ids"]

logger = logging.getLogger(__name__)


def _client(service: str, region: str | None = None):
    session = boto3.Session(region_name=region)
    kwargs = {"region_name": region or session.region_name or "us-east-1"}
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


def cleanup(*, run_id: str | None = None, all_runs: bool = False, s3_prefix: str | None = None,
            region: str | None = None, dry_run: bool = False) -> dict:
    """Terminate runs' instances; delete their queues, signing keys and (optionally) files."""
    if not run_id and not all_runs:
        raise ConfigurationError("cleanup needs a run id (--run ID) or --all.")
    ec2 = _client("ec2", region)
    sqs = _client("sqs", region)
    ssm = _client("ssm", region)
    runs = [run_id] if run_id else run_ids(ec2)
    report = {"runs": runs, "instances": [], "queues": [], "parameters": [], "objects": []}
    for rid in runs:
        report["instances"] += terminate_run(ec2, rid, dry_run=dry_run)
        for kind in ("jobs", "events"):
            name = f"nipype-s3-{rid}-{kind}"
            try:
                url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
            except botocore.exceptions.ClientError:
                continue
            report["queues"].append(url)
            if not dry_run:
                sqs.delete_queue(QueueUrl=url)
        param = job_key_parameter(rid)
        try:
            ssm.get_parameter(Name=param)
            report["parameters"].append(param)
            if not dry_run:
                ssm.delete_parameter(Name=param)
        except botocore.exceptions.ClientError:
            pass
        if s3_prefix:
            bucket, prefix = parse_s3_prefix(s3_prefix)
            s3 = make_s3_client(boto3.Session(region_name=region), bucket=bucket)
            layout = RunLayout(bucket, prefix, rid)
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
