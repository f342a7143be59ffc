"""Least privilege, one source of truth: every API call a LocalCloud run makes — the
controller's and the agents' — is allowed by the policy :mod:`nipype_s3.iam` makes for
it, every action those policies allow is one the code makes, and the docs print exactly
those policies."""

import fnmatch
import json
import os
import urllib.parse

import boto3
import pytest
from nipype import Function, Node, Workflow

from nipype_s3 import BatchPlugin, EC2Plugin
from nipype_s3.backends.batch import BatchEnvironment, setup, teardown
from nipype_s3.iam import (
    agent_policy,
    batch_controller_policy,
    batch_setup_policy,
    controller_policy,
)
from nipype_s3.testing import LocalCloud
from nipype_s3.testing.localcloud import AGENT_APP_ID

pytestmark = pytest.mark.slow

BUCKET, PREFIX = "my-bucket", "nipype-runs"

#: allowed actions this short run does not make, each with where the code makes them
FAILURE_PATHS = {
    "sqs:ChangeMessageVisibility": "an agent's heartbeat for a job longer than "
                                   "`heartbeat` (test_ec2plugin: longer than the "
                                   "visibility timeout)",
    "s3:GetBucketLocation": "the region of s3_prefix's bucket, when none is configured "
                            "(s3/session.py bucket_region)",
    "s3:DeleteObject": "a planted report is deleted (test_collect_hostile_reports)",
    "s3:AbortMultipartUpload": "an upload a killed agent left is aborted "
                               "(tests/unit/s3 abort_incomplete_uploads)",
    "ec2:DescribeInstanceTypes": "a type not in the price table (test_ec2plugin: "
                                 "an instance type that does not exist)",
}


def _mean(in_file):
    import nibabel as nib
    import numpy as np

    return float(np.asanyarray(nib.load(in_file).dataobj).mean())


def _s3_action(rec) -> tuple[str, str]:
    """(IAM action, resource ARN) of a path-style S3 request."""
    path = urllib.parse.unquote(rec.path.lstrip("/"))
    bucket, _, key = path.partition("/")
    query = dict(urllib.parse.parse_qsl(rec.query, keep_blank_values=True))
    method = rec.method
    if not key:
        if "uploads" in query:
            return "s3:ListBucketMultipartUploads", f"arn:aws:s3:::{bucket}"
        if "location" in query:
            return "s3:GetBucketLocation", f"arn:aws:s3:::{bucket}"
        if "delete" in query:  # DeleteObjects: checked per key by AWS; any key here
            return "s3:DeleteObject", f"arn:aws:s3:::{bucket}/*"
        return {"GET": "s3:ListBucket", "HEAD": "s3:ListBucket",
                "PUT": "s3:CreateBucket"}[method], f"arn:aws:s3:::{bucket}"
    arn = f"arn:aws:s3:::{bucket}/{key}"
    if method == "DELETE":
        return ("s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"), arn
    if method in ("GET", "HEAD"):
        return "s3:GetObject", arn
    return "s3:PutObject", arn  # PUT, parts, POST ?uploads / ?uploadId


def _api_calls(rec) -> list[tuple[str, str]]:
    """(IAM action, resource) pairs one recorded request needs."""
    if rec.action.startswith("S3:"):
        return [_s3_action(rec)]
    params = dict(rec.params)
    if rec.action.startswith("AmazonSQS."):
        op = rec.action.split(".", 1)[1]
        op = op[:-len("Batch")] if op.endswith("Batch") else op  # authorised as one
        name = params.get("QueueName") or params.get("QueueUrl", "").rsplit("/", 1)[-1]
        return [(f"sqs:{op}", f"arn:aws:sqs:us-east-1:123456789012:{name}")]
    if rec.action.startswith("AmazonSSM."):
        op = rec.action.split(".", 1)[1]
        name = params.get("Name", "")
        account = "" if name.startswith("/aws/service/") else "123456789012"
        return [(f"ssm:{op}", f"arn:aws:ssm:us-east-1:{account}:parameter/{name.lstrip('/')}")]
    if rec.service == "iam":
        return _iam_calls(rec.action, params)
    if rec.service == "batch":
        return _batch_calls(rec.action.split(":", 1)[1], params)
    if rec.action in ("CreateLaunchTemplate", "DeleteLaunchTemplate"):
        arn = "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-1"
        return [(f"ec2:{rec.action}", arn)] + (
            [("ec2:CreateTags", arn)] if rec.action == "CreateLaunchTemplate" else [])
    calls = [(f"ec2:{rec.action}", "*")]
    if rec.action == "RunInstances":  # tagging at launch and passing the role
        calls.append(("ec2:CreateTags", "*"))
        calls.append(("iam:PassRole", "arn:aws:iam::123456789012:role/nipype-s3-agent"))
    return calls


ACCOUNT = "arn:aws:{}:us-east-1:123456789012:"
IAM = "arn:aws:iam::123456789012:"
#: the job role BatchPlugin's runs here pass (made by setup)
JOB_ROLE = f"{IAM}role/nipype-s3-neuro-job"


def _iam_calls(op: str, params: dict) -> list[tuple[str, str]]:
    if op == "ListRoles":
        return [("iam:ListRoles", "*")]
    if op == "CreateServiceLinkedRole":
        return [("iam:CreateServiceLinkedRole",
                 f"{IAM}role/aws-service-role/{params['AWSServiceName']}/x")]
    if "InstanceProfileName" in params:
        return [(f"iam:{op}", f"{IAM}instance-profile/{params['InstanceProfileName']}")]
    calls = [(f"iam:{op}", f"{IAM}role/{params['RoleName']}")]
    if op == "CreateRole":  # setup tags every role it makes: that needs TagRole too
        calls.append(("iam:TagRole", calls[0][1]))
    return calls


def _batch_name(value: str, kind: str) -> str:
    return value if value.startswith("arn:") else ACCOUNT.format("batch") + f"{kind}/{value}"


def _batch_calls(op: str, params: dict) -> list[tuple[str, str]]:
    """(IAM action, resource) of a Batch call (its operation in lower case, as its REST
    path has it; IAM's action names are not case-sensitive). nipype_s3 tags every job
    definition, compute environment and job queue it makes."""
    if op.startswith(("describe", "list")):
        return [(f"batch:{op}", "*")]
    if op == "submitjob":
        return [("batch:submitjob", _batch_name(params["jobQueue"], "job-queue")),
                ("batch:submitjob", _batch_name(params["jobDefinition"], "job-definition")),
                ("batch:tagresource", _batch_name("new", "job"))]  # tagged at submission
    if op == "terminatejob":
        return [("batch:terminatejob", _batch_name(params["jobId"], "job"))]
    if op == "registerjobdefinition":
        arn = _batch_name(params["jobDefinitionName"], "job-definition")
        return [("batch:registerjobdefinition", arn), ("batch:tagresource", arn),
                ("iam:passrole", JOB_ROLE)]
    kind, key = ("job-queue", "jobQueue") if "jobqueue" in op else \
        ("compute-environment", "computeEnvironment")
    name = params.get(key) or params.get(f"{key}Name")
    calls = [(f"batch:{op}", _batch_name(name, kind))]
    if op.startswith("create"):
        calls.append(("batch:tagresource", calls[0][1]))
    if op == "createcomputeenvironment":  # its instance profile's role
        calls.append(("iam:passrole", f"{IAM}role/nipype-s3-{name}-instance"))
    return calls


def _allowed(policy: dict, action: str, resource: str) -> bool:
    for stmt in policy["Statement"]:
        actions = stmt["Action"] if isinstance(stmt["Action"], list) else [stmt["Action"]]
        resources = stmt["Resource"] if isinstance(stmt["Resource"], list) else \
            [stmt["Resource"]]
        if any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions) and \
                any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def _policy_actions(policy: dict) -> set[str]:
    return {a.lower() for s in policy["Statement"] for a in (
        s["Action"] if isinstance(s["Action"], list) else [s["Action"]])}


def _check(records, policies: dict, failure_paths: dict):
    """(refused calls, allowed actions never used) of ``records`` against the policy of
    each caller (``agent``: requests with the agents' user agent)."""
    refused, used = [], {who: set() for who in policies}
    for rec in records:
        who = "agent" if AGENT_APP_ID in (rec.header("user-agent") or "") else "controller"
        for action, resource in _api_calls(rec):
            used[who].add(action.lower())
            if not _allowed(policies[who], action, resource):
                refused.append((who, action, resource))
    paths = {a.lower() for a in failure_paths}
    unused = {who: sorted(_policy_actions(policy) - used[who] - paths)
              for who, policy in policies.items()}
    return sorted(set(refused)), unused


def test_every_call_of_a_run_is_allowed_and_every_allowed_action_is_used(tmp_path,
                                                                        nifti_files):
    with LocalCloud(agents_via_proxy=True) as cloud:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        wf = Workflow("least", base_dir=str(tmp_path / "wf"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        means = [Node(Function(input_names=["in_file"], output_names=["m"],
                               function=_mean), name=f"mean{i}") for i in range(2)]
        for node, name in zip(means, ("example4d.nii.gz", "anatomical.nii"), strict=True):
            node.inputs.in_file = nifti_files[name]
        wf.add_nodes(means)
        cloud.proxy.clear()
        wf.run(plugin=EC2Plugin(plugin_args={
            "s3_prefix": f"s3://{BUCKET}/{PREFIX}", "max_instances": 1, "poll_wait": 1,
            "scale_interval": 0.5, "lease_timeout": 8, "idle_timeout": 10,
            "done_scan_interval": 1}))
        assert cloud.live_instances() == []
        records = list(cloud.proxy.requests)
    refused, unused = _check(records, {"agent": agent_policy(BUCKET, PREFIX),
                                       "controller": controller_policy(BUCKET, PREFIX)},
                             FAILURE_PATHS)
    assert refused == []
    assert unused == {"agent": [], "controller": []}


@pytest.mark.docker
def test_every_call_of_a_batch_run_and_of_its_setup_is_allowed_and_used(tmp_path,
                                                                       docker_images):
    with LocalCloud(agents_via_proxy=True) as cloud:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        cloud.proxy.clear()
        env = BatchEnvironment("neuro", f"s3://{BUCKET}/{PREFIX}", max_vcpus=8)
        setup(env, boto3.client, poll=0.1)
        setup(BatchEnvironment("neuro", env.s3_prefix, max_vcpus=16), boto3.client,
              poll=0.1)  # again: finds Batch's service role, raises the maximum
        set_up = list(cloud.proxy.requests)
        cloud.proxy.clear()
        wf = Workflow("least", base_dir=str(tmp_path / "wf"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        square = Node(Function(input_names=["x"], output_names=["y"],
                               function=_square), name="square")
        square.inputs.x = 3
        own = Node(Function(input_names=["x"], output_names=["y"], function=_square),
                   name="own")
        own.plugin_args = {"batch": "job"}
        wf.connect(square, "y", own, "x")
        wf.run(plugin=BatchPlugin(plugin_args={
            "s3_prefix": f"s3://{BUCKET}/{PREFIX}", "job_queue": "neuro",
            "job_role_arn": JOB_ROLE, "image": docker_images["test"], "idle_timeout": 5,
            "max_agents": 1, "done_scan_interval": 1}))
        run = list(cloud.proxy.requests)
        cloud.proxy.clear()
        teardown("neuro", boto3.client, poll=0.1)
        torn = list(cloud.proxy.requests)
    refused, unused = _check(run, {
        "agent": agent_policy(BUCKET, PREFIX),
        "controller": batch_controller_policy(BUCKET, PREFIX, job_queue="neuro",
                                              job_role_arn=JOB_ROLE)}, FAILURE_PATHS)
    assert refused == []
    assert unused == {"agent": [], "controller": []}
    # (an agent job the run ended may still be finishing a request while teardown runs)
    ours = [r for r in set_up + torn if AGENT_APP_ID not in (r.header("user-agent") or "")]
    refused, unused = _check(ours, {"controller": batch_setup_policy("neuro")}, {})
    assert refused == []
    assert unused == {"controller": []}


def _square(x):
    return x * x


def test_a_run_scoped_policy_refuses_another_runs_resources():
    agent = agent_policy(BUCKET, PREFIX, run="20261206-*")
    assert _allowed(agent, "s3:GetObject",
                    f"arn:aws:s3:::{BUCKET}/{PREFIX}/runs/20261206-010203-abcdef/jobs/x")
    assert not _allowed(agent, "s3:GetObject",
                        f"arn:aws:s3:::{BUCKET}/{PREFIX}/runs/20261207-010203-abcdef/jobs/x")
    assert not _allowed(agent, "ssm:GetParameter",
                        "arn:aws:ssm:us-east-1:1:parameter/nipype-s3/runs/20261207-x/job-key")
    assert not _allowed(agent, "s3:GetObject", f"arn:aws:s3:::{BUCKET}/elsewhere/x")
    assert not _allowed(agent, "sqs:SendMessage", "arn:aws:sqs:us-east-1:1:other-queue")


def test_the_docs_print_the_policies_this_code_makes():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs",
                            "ec2plugin.rst")).read()
    for policy in (agent_policy("my-bucket", "nipype-runs"),
                   controller_policy("my-bucket", "nipype-runs")):
        block = "\n".join("    " + line for line in json.dumps(policy, indent=2).splitlines())
        assert block in doc
