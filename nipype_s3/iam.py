"""The IAM policies nipype_s3 needs, made here and nowhere else (pure: no boto3).

The docs print these documents (a test checks that they print exactly what this module
makes), ``nipype-s3 policy`` writes them for a given bucket, and a LocalCloud test holds
every API call a run makes against them: the controller's calls against
:func:`controller_policy`, the agents' against :func:`agent_policy`. An action listed
here that the code never calls, or a call the policy does not allow, fails that test.

Scoping. S3 objects, SQS queues and SSM parameters are named by run
(``runs/<run>/``, ``nipype-s3-<run>-*``, ``/nipype-s3/runs/<run>/``), so a policy can be
narrowed to one run, or to a family of runs by a run-id pattern. EC2 actions on existing
instances are conditioned on the ``nipype-s3:run`` tag, RunInstances on tagging, and
``iam:PassRole`` on the agent role alone. Instance-role credentials carry no principal
tags, so one static instance role cannot tell runs apart: runs that must not trust
each other need an instance profile each (see "Threat model" in docs/ec2plugin.rst).
"""

from __future__ import annotations

from .ec2.jobs import RUN_TAG

__all__ = ["agent_policy", "controller_policy", "batch_controller_policy",
           "batch_setup_policy", "trust_policy", "AMI_PARAMETER_ARN",
           "BATCH_INSTANCE_POLICY_ARN", "BATCH_SETUP_TAG"]

#: The public SSM parameters the default AMI is read from.
AMI_PARAMETER_ARN = "arn:aws:ssm:*::parameter/aws/service/*"


#: The tag on what ``nipype-s3 batch setup`` makes (its value: the setup's name).
BATCH_SETUP_TAG = "nipype-s3:batch-setup"

#: The AWS-managed policy of a Batch compute environment's instances (the ECS agent:
#: register the instance, pull images, write the jobs' logs).
BATCH_INSTANCE_POLICY_ARN = \
    "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"


def _s3_prefix_arn(bucket: str, *parts: str) -> str:
    key = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    return f"arn:aws:s3:::{bucket}/{key}" if key else f"arn:aws:s3:::{bucket}"


def _statement(sid: str, actions: list[str], resources, condition: dict | None = None) -> dict:
    stmt = {"Sid": sid, "Effect": "Allow", "Action": sorted(actions),
            "Resource": resources if isinstance(resources, str) else list(resources)}
    if condition:
        stmt["Condition"] = condition
    return stmt


def _doc(statements: list[dict]) -> dict:
    return {"Version": "2012-10-17", "Statement": statements}


def agent_policy(bucket: str, prefix: str = "", *, run: str = "*",
                 data_buckets: tuple[str, ...] = (),
                 ecr_repositories: tuple[str, ...] = ()) -> dict:
    """What an agent (the instance role) needs for runs below ``s3://bucket/prefix``.

    ``run`` narrows it to one run id (or a pattern of them); ``data_buckets`` are the
    buckets the nodes read and write themselves (grabbers and sinks on the instance);
    ``ecr_repositories`` the ARNs of ECR repositories whose images the instances pull
    (EC2Plugin's ``image=``: the bootstrap logs in to ECR and pulls).
    """
    runs = _s3_prefix_arn(bucket, prefix, "runs", run) + "/*"
    cas = _s3_prefix_arn(bucket, prefix, "cas") + "/*"
    statements = [
        _statement("RunFiles", ["s3:GetObject", "s3:PutObject"], [runs]),
        _statement("ContentStore", ["s3:GetObject", "s3:PutObject"], [cas]),
        _statement("Queues", ["sqs:ReceiveMessage", "sqs:DeleteMessage",
                              "sqs:ChangeMessageVisibility", "sqs:SendMessage"],
                   f"arn:aws:sqs:*:*:nipype-s3-{run}-*"),
        _statement("RunKey", ["ssm:GetParameter"],
                   f"arn:aws:ssm:*:*:parameter/nipype-s3/runs/{run}/*"),
    ]
    if data_buckets:
        statements.append(_statement(
            "NodeData", ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
            [a for b in data_buckets for a in (f"arn:aws:s3:::{b}", f"arn:aws:s3:::{b}/*")]))
    if ecr_repositories:
        statements.append(_statement("EcrLogin", ["ecr:GetAuthorizationToken"], "*"))
        statements.append(_statement(
            "EcrPull", ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
                        "ecr:BatchCheckLayerAvailability"], list(ecr_repositories)))
    return _doc(statements)


def trust_policy(service: str) -> dict:
    """The trust policy of a role ``service`` (``ec2.amazonaws.com``,
    ``ecs-tasks.amazonaws.com``) may take on."""
    return _doc([{"Effect": "Allow", "Principal": {"Service": service},
                  "Action": "sts:AssumeRole"}])


def _run_statements(bucket: str, prefix: str, run: str) -> list[dict]:
    """A controller's own: the run's files, queues and signing key."""
    return [
        _statement("RunFiles", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                "s3:AbortMultipartUpload"],
                   [_s3_prefix_arn(bucket, prefix, "runs", run) + "/*",
                    _s3_prefix_arn(bucket, prefix, "cas") + "/*"]),
        _statement("ListRuns", ["s3:ListBucket", "s3:ListBucketMultipartUploads",
                                "s3:GetBucketLocation"], _s3_prefix_arn(bucket)),
        _statement("Queues", ["sqs:CreateQueue", "sqs:DeleteQueue", "sqs:SendMessage",
                              "sqs:ReceiveMessage", "sqs:DeleteMessage"],
                   f"arn:aws:sqs:*:*:nipype-s3-{run}-*"),
        _statement("RunKey", ["ssm:PutParameter", "ssm:DeleteParameter"],
                   f"arn:aws:ssm:*:*:parameter/nipype-s3/runs/{run}/*"),
    ]


def controller_policy(bucket: str, prefix: str = "", *,
                      agent_role_arn: str = "arn:aws:iam::*:role/nipype-s3-agent",
                      run: str = "*") -> dict:
    """What the controller (your credentials) needs to run EC2Plugin below
    ``s3://bucket/prefix``, launching agents with ``agent_role_arn``."""
    statements = _run_statements(bucket, prefix, run) + [
        _statement("DefaultAmi", ["ssm:GetParameter"], AMI_PARAMETER_ARN),
        _statement("Describe", ["ec2:DescribeInstances", "ec2:DescribeImages",
                                "ec2:DescribeInstanceTypes"], "*"),
        _statement("Launch", ["ec2:RunInstances"], "*"),
        _statement("TagOnLaunch", ["ec2:CreateTags"], "*", {
            "StringEquals": {"ec2:CreateAction": "RunInstances"},
            "Null": {f"aws:RequestTag/{RUN_TAG}": "false"}}),
        _statement("EndOwnInstances", ["ec2:TerminateInstances"], "*", {
            "Null": {f"ec2:ResourceTag/{RUN_TAG}": "false"}}),
        _statement("PassAgentRole", ["iam:PassRole"], agent_role_arn, {
            "StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}),
    ]
    return _doc(statements)


def batch_controller_policy(bucket: str, prefix: str = "", *, job_queue: str = "*",
                            job_role_arn: str = "arn:aws:iam::*:role/nipype-s3-*-job",
                            run: str = "*") -> dict:
    """What the controller (your credentials) needs to run BatchPlugin below
    ``s3://bucket/prefix`` on ``job_queue``, its agents' containers running as
    ``job_role_arn``: register and submit nipype_s3's own job definitions, follow and end
    jobs (Batch cannot scope these to a run), and the run's files, queues and key."""
    definitions = "arn:aws:batch:*:*:job-definition/nipype-s3-*"
    statements = _run_statements(bucket, prefix, run) + [
        _statement("Follow", ["batch:DescribeJobQueues", "batch:DescribeComputeEnvironments",
                              "batch:DescribeJobDefinitions", "batch:DescribeJobs",
                              "batch:ListJobs"], "*"),
        _statement("OwnJobDefinitions", ["batch:RegisterJobDefinition"], definitions, {
            "BoolIfExists": {"batch:Privileged": "false"},
            "StringEqualsIfExists": {"batch:LogDriver": "awslogs"}}),
        _statement("Submit", ["batch:SubmitJob"],
                   [f"arn:aws:batch:*:*:job-queue/{job_queue}", definitions]),
        _statement("TagOnCreate", ["batch:TagResource"],
                   [definitions, "arn:aws:batch:*:*:job/*"]),
        _statement("EndRunJobs", ["batch:TerminateJob"], "arn:aws:batch:*:*:job/*", {
            "Null": {f"aws:ResourceTag/{RUN_TAG}": "false"}}),
        _statement("PassJobRole", ["iam:PassRole"], job_role_arn),
    ]
    return _doc(statements)


def batch_setup_policy(name: str = "*") -> dict:
    """What ``nipype-s3 batch setup --name NAME`` and ``teardown`` need: an
    administrator's policy (it makes roles and writes their policies, so whoever holds it
    can give a role of those names any permission and take it on). The compute
    environment and job queue ``name`` and its two roles (``nipype-s3-NAME-instance``,
    ``nipype-s3-NAME-job``; ``*``: any name), Batch's
    service-linked role, and reading the default VPC."""
    roles = [f"arn:aws:iam::*:role/nipype-s3-{name}-instance",
             f"arn:aws:iam::*:role/nipype-s3-{name}-job"]
    return _doc([
        _statement("Network", ["ec2:DescribeVpcs", "ec2:DescribeSubnets",
                               "ec2:DescribeSecurityGroups", "ec2:DescribeLaunchTemplates"],
                   "*"),
        _statement("MakeLaunchTemplate", ["ec2:CreateLaunchTemplate", "ec2:CreateTags"],
                   "arn:aws:ec2:*:*:launch-template/*", {
                       "StringEquals": {f"aws:RequestTag/{BATCH_SETUP_TAG}": name}}),
        _statement("RemoveLaunchTemplate", ["ec2:DeleteLaunchTemplate"],
                   "arn:aws:ec2:*:*:launch-template/*", {
                       "StringEquals": {f"aws:ResourceTag/{BATCH_SETUP_TAG}": name}}),
        _statement("Roles", ["iam:CreateRole", "iam:GetRole", "iam:DeleteRole",
                             "iam:TagRole", "iam:DetachRolePolicy",
                             "iam:ListAttachedRolePolicies", "iam:PutRolePolicy",
                             "iam:GetRolePolicy",
                             "iam:DeleteRolePolicy", "iam:ListRolePolicies"], roles),
        _statement("InstancePolicy", ["iam:AttachRolePolicy"], roles[0], {
            "ArnEquals": {"iam:PolicyARN": BATCH_INSTANCE_POLICY_ARN}}),
        _statement("PassInstanceRole", ["iam:PassRole"], roles[0]),
        _statement("InstanceProfile", [
            "iam:CreateInstanceProfile", "iam:GetInstanceProfile",
            "iam:DeleteInstanceProfile", "iam:AddRoleToInstanceProfile",
            "iam:RemoveRoleFromInstanceProfile"],
            f"arn:aws:iam::*:instance-profile/nipype-s3-{name}-instance"),
        _statement("BatchServiceRole", ["iam:CreateServiceLinkedRole"],
                   "arn:aws:iam::*:role/aws-service-role/batch.amazonaws.com/*",
                   {"StringEquals": {"iam:AWSServiceName": "batch.amazonaws.com"}}),
        _statement("FindBatchServiceRole", ["iam:ListRoles"], "*"),
        _statement("Describe", ["batch:DescribeComputeEnvironments",
                                "batch:DescribeJobQueues"], "*"),
        _statement("Environment", [
            "batch:CreateComputeEnvironment", "batch:UpdateComputeEnvironment",
            "batch:DeleteComputeEnvironment", "batch:CreateJobQueue",
            "batch:UpdateJobQueue", "batch:DeleteJobQueue", "batch:TagResource"],
            [f"arn:aws:batch:*:*:compute-environment/{name}",
             f"arn:aws:batch:*:*:job-queue/{name}"]),
    ])
