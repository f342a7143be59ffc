"""What BatchPlugin runs on, said once: :class:`BatchEnvironment` (a managed compute
environment and a job queue named ``NAME``, the instance role ``nipype-s3-NAME-instance``
with AWS's managed policy for the ECS agent and its instance profile, a launch template
that keeps the instances' metadata service from the jobs' containers, and the job role
``nipype-s3-NAME-job`` with the agents' least-privilege policy), and the same as a
CloudFormation template. :mod:`~nipype_s3.backends.batch.setup` makes it in an account
from the same properties, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...ec2.jobs import parse_s3_prefix
from ...exceptions import ConfigurationError
from ...iam import BATCH_INSTANCE_POLICY_ARN, BATCH_SETUP_TAG, agent_policy, trust_policy

__all__ = ["BatchEnvironment", "cloudformation_template", "checked_name", "SETUP_TAG",
           "JOB_POLICY"]

#: The tag on everything ``setup`` makes; ``teardown`` removes nothing without it.
SETUP_TAG = BATCH_SETUP_TAG
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{1,43}[A-Za-z0-9]")
_SUBNET = re.compile(r"subnet-[0-9a-f]{8,17}")
_GROUP = re.compile(r"sg-[0-9a-f]{8,17}")
_TYPE = re.compile(r"optimal|default_(x86_64|arm64)|[a-z][a-z0-9-]*\d[a-z0-9-]*(\.[a-z0-9]+)?")
JOB_POLICY = "nipype-s3-agent"


def checked_name(name) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"Batch environment name {name!r}: use 3 to 45 letters, digits, '-' or '_', "
            "starting and ending with a letter or digit (it names the compute environment, "
            "the job queue and the roles nipype-s3-NAME-job and nipype-s3-NAME-instance).")
    return name


def roles(name: str) -> tuple[str, str]:
    """The job role's and the instance role's (and instance profile's) names."""
    return f"nipype-s3-{name}-job", f"nipype-s3-{name}-instance"


@dataclass(frozen=True)
class BatchEnvironment:
    """A compute environment and job queue for BatchPlugin, and their roles.

    ``s3_prefix`` is the runs' prefix the job role may use (as ``plugin_args``);
    ``data_buckets`` the buckets the nodes read and write themselves. Without
    ``subnets``/``security_groups``, the default VPC's subnets and its ``default``
    security group.
    """

    name: str
    s3_prefix: str
    spot: bool = False
    max_vcpus: int = 256
    subnets: tuple[str, ...] = ()
    security_groups: tuple[str, ...] = ()
    data_buckets: tuple[str, ...] = ()
    instance_types: tuple[str, ...] = ("optimal",)

    def __post_init__(self) -> None:
        checked_name(self.name)
        parse_s3_prefix(self.s3_prefix)  # a clear error for a bad prefix
        # they become ARNs in the job role's policy: a wildcard would widen it
        for value, what in [(self.s3_prefix, "--s3-prefix")] + [
                (b, "--data-bucket") for b in self.data_buckets]:
            if any(c in str(value) for c in "*?$"):
                raise ConfigurationError(f"{what} {value!r}: no wildcards or policy "
                                         "variables ('*', '?', '$'); name the bucket (and "
                                         "prefix) itself.")
        from ...s3.uri import parse_s3_uri

        for bucket in self.data_buckets:
            if "/" in bucket or parse_s3_uri(f"s3://{bucket}").bucket != bucket:
                raise ConfigurationError(f"--data-bucket {bucket!r}: give a bucket's name "
                                         "only (my-data), not a path.")
        if not isinstance(self.max_vcpus, int) or not 1 <= self.max_vcpus <= 100_000:
            raise ConfigurationError(f"--max-vcpus {self.max_vcpus!r}: give a whole number "
                                     "of vCPUs from 1 to 100000.")
        if not self.instance_types:
            raise ConfigurationError("--instance-types: give at least one (e.g. optimal, "
                                     "or optimal g5 for GPU nodes).")
        for value, pattern, what in [(s, _SUBNET, "--subnets") for s in self.subnets] + \
                [(g, _GROUP, "--security-groups") for g in self.security_groups] + \
                [(t, _TYPE, "--instance-types") for t in self.instance_types]:
            if not pattern.fullmatch(value):
                raise ConfigurationError(f"{what} {value!r} is not an id of that kind "
                                         "(subnet-..., sg-...).")

    @property
    def instance_role(self) -> str:
        return roles(self.name)[1]

    @property
    def job_role(self) -> str:
        return roles(self.name)[0]

    # -- what exists, said once ---------------------------------------------------------
    @property
    def launch_template(self) -> str:
        return f"nipype-s3-{self.name}"

    @staticmethod
    def launch_template_data() -> dict:
        """The instances' launch template: the metadata service only with a session token
        and one network hop, so the jobs' containers cannot reach the instance role
        (their own role comes from the container agent)."""
        return {"MetadataOptions": {"HttpEndpoint": "enabled", "HttpTokens": "required",
                                    "HttpPutResponseHopLimit": 1}}

    def job_role_policy(self) -> dict:
        bucket, prefix = parse_s3_prefix(self.s3_prefix)
        return agent_policy(bucket, prefix, data_buckets=tuple(self.data_buckets))

    def compute_resources(self, subnets, security_groups, instance_profile) -> dict:
        """The compute environment's ``computeResources`` (the API's spelling)."""
        spot = self.spot
        return {"type": "SPOT" if spot else "EC2",
                "allocationStrategy": "SPOT_PRICE_CAPACITY_OPTIMIZED" if spot
                else "BEST_FIT_PROGRESSIVE",
                "minvCpus": 0, "maxvCpus": self.max_vcpus,
                "instanceTypes": list(self.instance_types),
                "subnets": subnets, "securityGroupIds": security_groups,
                "instanceRole": instance_profile,
                "launchTemplate": {"launchTemplateName": self.launch_template,
                                   "version": "$Default"},
                "tags": {SETUP_TAG: self.name, "Name": f"nipype-s3-batch-{self.name}"}}

    def job_queue(self, compute_environment) -> dict:
        return {"jobQueueName": self.name, "state": "ENABLED", "priority": 1,
                "computeEnvironmentOrder": [{"order": 1,
                                             "computeEnvironment": compute_environment}]}

    @property
    def tags(self) -> dict:
        return {SETUP_TAG: self.name}


# -- the template ----------------------------------------------------------------------
def _pascal(value):
    """The API's camelCase keys as CloudFormation spells them (``minvCpus`` →
    ``MinvCpus``); tag maps are left as they are."""
    if isinstance(value, list):
        return [_pascal(v) for v in value]
    if isinstance(value, dict):
        return {k[:1].upper() + k[1:]: (v if k == "tags" else _pascal(v))
                for k, v in value.items()}
    return value


def cloudformation_template(env: BatchEnvironment) -> dict:
    """``env`` as a CloudFormation template (subnets and security groups are
    parameters where ``env`` names none)."""
    params, subnets, groups = {}, list(env.subnets), list(env.security_groups)
    if not subnets:
        params["Subnets"] = {"Type": "List<AWS::EC2::Subnet::Id>",
                             "Description": "Subnets the compute environment's instances "
                                            "start in (with a route to S3 and ECR)"}
        subnets = {"Ref": "Subnets"}
    if not groups:
        params["SecurityGroups"] = {"Type": "List<AWS::EC2::SecurityGroup::Id>",
                                    "Description": "Security groups of the instances "
                                                   "(outbound HTTPS is enough)"}
        groups = {"Ref": "SecurityGroups"}
    tags = [{"Key": k, "Value": v} for k, v in env.tags.items()]
    compute = _pascal(env.compute_resources(subnets, groups,
                                            {"Fn::GetAtt": ["InstanceProfile", "Arn"]}))
    resources = {
        "LaunchTemplate": {"Type": "AWS::EC2::LaunchTemplate", "Properties": {
            "LaunchTemplateName": env.launch_template,
            "LaunchTemplateData": env.launch_template_data(),
            "TagSpecifications": [{"ResourceType": "launch-template", "Tags": tags}]}},
        "InstanceRole": {"Type": "AWS::IAM::Role", "Properties": {
            "RoleName": env.instance_role,
            "AssumeRolePolicyDocument": trust_policy("ec2.amazonaws.com"),
            "ManagedPolicyArns": [BATCH_INSTANCE_POLICY_ARN], "Tags": tags}},
        "InstanceProfile": {"Type": "AWS::IAM::InstanceProfile", "Properties": {
            "InstanceProfileName": env.instance_role, "Roles": [{"Ref": "InstanceRole"}]}},
        "JobRole": {"Type": "AWS::IAM::Role", "Properties": {
            "RoleName": env.job_role,
            "AssumeRolePolicyDocument": trust_policy("ecs-tasks.amazonaws.com"),
            "Policies": [{"PolicyName": JOB_POLICY,
                          "PolicyDocument": env.job_role_policy()}], "Tags": tags}},
        "ComputeEnvironment": {"Type": "AWS::Batch::ComputeEnvironment",
                               "DependsOn": "LaunchTemplate", "Properties": {
            "ComputeEnvironmentName": env.name, "Type": "MANAGED", "State": "ENABLED",
            "ComputeResources": compute, "Tags": env.tags}},
        "JobQueue": {"Type": "AWS::Batch::JobQueue", "Properties": dict(
            _pascal(env.job_queue({"Ref": "ComputeEnvironment"})), Tags=env.tags)},
    }
    return {"AWSTemplateFormatVersion": "2010-09-09",
            "Description": f"AWS Batch for nipype_s3's BatchPlugin: job queue {env.name} "
                           "(nipype-s3 batch setup makes the same)",
            "Parameters": params, "Resources": resources,
            "Outputs": {"JobQueue": {"Value": {"Ref": "JobQueue"}},
                        "JobRoleArn": {"Value": {"Fn::GetAtt": ["JobRole", "Arn"]}}}}
