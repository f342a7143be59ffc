"""``nipype-s3 batch setup`` and ``teardown``: what
:class:`~nipype_s3.backends.batch.environment.BatchEnvironment` describes, made in (or
removed from) an account with API calls. Everything made is tagged
``nipype-s3:batch-setup=NAME``, and :func:`teardown` removes only what bears that tag.
"""

from __future__ import annotations

import json
import logging
import time

import botocore.exceptions

from ...exceptions import BatchError, ConfigurationError
from ...iam import BATCH_INSTANCE_POLICY_ARN, trust_policy
from .environment import JOB_POLICY, SETUP_TAG, BatchEnvironment, checked_name, roles

__all__ = ["setup", "teardown"]

logger = logging.getLogger("nipype_s3.batch")


# -- the account ---------------------------------------------------------------------
def _code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "") \
        if isinstance(exc, botocore.exceptions.ClientError) else ""


def _aws(what: str, exc) -> BatchError:
    return BatchError(f"nipype-s3 batch: could not {what}: {exc}. Check the credentials' "
                    "permissions (nipype-s3 policy batch-setup prints what is needed); "
                    "running the same command again carries on where this one stopped.")


def _default_network(ec2) -> tuple[list[str], list[str]]:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise ConfigurationError(
            "This region has no default VPC: give the compute environment's --subnets and "
            "--security-groups.")
    vpc = vpcs[0]["VpcId"]
    subnets = [s["SubnetId"] for s in ec2.describe_subnets(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]]
    groups = [g["GroupId"] for g in ec2.describe_security_groups(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": ["default"]}])[
        "SecurityGroups"]]
    if not subnets or not groups:
        raise ConfigurationError(f"The default VPC {vpc} has no subnets or no default "
                                 "security group: give --subnets and --security-groups.")
    return sorted(subnets), groups


def _trust(document) -> dict:
    """A policy document as IAM gives it (a dict, or its URL-encoded JSON)."""
    if isinstance(document, str):
        import urllib.parse

        document = json.loads(urllib.parse.unquote(document))
    return document


def _existing_role(iam, name: str, service: str, tags: dict) -> str | None:
    """The ARN of the role setup made for this name (None: there is none), or an error
    when one is there that is not that."""
    try:
        role = iam.get_role(RoleName=name)["Role"]
        found = {t["Key"]: t["Value"] for t in role.get("Tags") or []}
        if found.get(SETUP_TAG) != tags[SETUP_TAG]:
            raise ConfigurationError(
                f"An IAM role {name} exists that nipype-s3 batch setup did not make for "
                f"{tags[SETUP_TAG]} (its {SETUP_TAG} tag is {found.get(SETUP_TAG)!r}): "
                "nothing was changed. Choose another --name, or delete that role.")
        if _trust(role.get("AssumeRolePolicyDocument")) != trust_policy(service):
            raise ConfigurationError(
                f"The IAM role {name} trusts other principals than {service} (its trust "
                "policy was changed after setup made it): nothing was given to it. Delete "
                "the role (nipype-s3 batch teardown) and run setup again.")
        return role["Arn"]
    except botocore.exceptions.ClientError as exc:
        if _code(exc) != "NoSuchEntity":
            raise
    return None


def _role(iam, name: str, service: str, tags: dict, say) -> str:
    arn = _existing_role(iam, name, service, tags)
    if arn is not None:
        say(f"role {name}: exists")
        return arn
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(
        trust_policy(service)), Tags=[{"Key": k, "Value": v} for k, v in tags.items()],
        Description="made by nipype-s3 batch setup")["Role"]["Arn"]
    say(f"role {name}: created")
    return arn


def _instance_profile(iam, env: BatchEnvironment, say) -> str:
    name = env.instance_role
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except botocore.exceptions.ClientError as exc:
        if _code(exc) != "NoSuchEntity":
            raise
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        say(f"instance profile {name}: created")
    if name not in [r["RoleName"] for r in profile.get("Roles") or []]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def _launch_template(ec2, env: BatchEnvironment, say, *, check_only: bool = False) -> None:
    name = env.launch_template
    try:
        found = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    except botocore.exceptions.ClientError as exc:
        if "NotFound" not in _code(exc):
            raise
        found = []
    if found:
        tags = {t["Key"]: t["Value"] for t in found[0].get("Tags") or []}
        if tags.get(SETUP_TAG) != env.name:
            raise ConfigurationError(
                f"A launch template {name} exists that nipype-s3 batch setup did not make "
                f"for {env.name}: nothing was changed. Choose another --name, or delete "
                "that template.")
        if not check_only:
            say(f"launch template {name}: exists")
        return
    if check_only:
        return
    ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData=env.launch_template_data(),
        TagSpecifications=[{"ResourceType": "launch-template", "Tags": [
            {"Key": k, "Value": v} for k, v in env.tags.items()]}])
    say(f"launch template {name}: created (metadata service: session tokens, one hop)")


def _service_role(iam) -> str:
    """Batch's service-linked role, made if the account has none yet."""
    try:
        return iam.create_service_linked_role(AWSServiceName="batch.amazonaws.com")[
            "Role"]["Arn"]
    except botocore.exceptions.ClientError as exc:
        if _code(exc) not in ("InvalidInput", "EntityAlreadyExists"):
            raise
    for page in iam.get_paginator("list_roles").paginate(
            PathPrefix="/aws-service-role/batch.amazonaws.com/"):
        for role in page["Roles"]:
            return role["Arn"]
    raise BatchError("AWS said Batch's service-linked role exists, but it was not found")


def _wait(describe, what: str, ready, timeout: float, poll: float, *, strict=True):
    """Poll ``describe()`` (the resource, or None when gone) until ``ready(it)``;
    ``strict``: an INVALID one is an error."""
    deadline = time.monotonic() + timeout
    while True:
        found = describe()
        if strict and found is not None and found.get("status") == "INVALID":
            raise BatchError(f"{what} is INVALID: {found.get('statusReason', '?')}. Fix the "
                           "cause, then run nipype-s3 batch teardown and setup again.")
        if ready(found):
            return found
        if time.monotonic() > deadline:
            raise BatchError(f"{what} was not ready after {timeout:.0f} s (status "
                           f"{(found or {}).get('status', 'gone')}); run the same command "
                           "again to carry on.")
        time.sleep(poll)


def _foreign(kind: str, name: str) -> ConfigurationError:
    return ConfigurationError(
        f"A {kind} {name} exists that nipype-s3 batch setup did not make (no {SETUP_TAG} "
        f"tag for {name}): nothing was changed. Choose another --name.")


def _ours(found: dict | None, env_name: str) -> bool:
    return bool(found) and (found.get("tags") or {}).get(SETUP_TAG) == env_name


def setup(env: BatchEnvironment, client, *, say=logger.info, timeout: float = 600,
          poll: float = 5) -> dict:
    """Make ``env`` in the account ``client(service)`` reaches (idempotent: what exists
    is kept; the job role's policy and the environment's maximum vCPUs are brought up to
    date). Returns the ``plugin_args`` that use it: ``job_queue`` and ``job_role_arn``."""
    iam, batch, ec2 = (client(n) for n in ("iam", "batch", "ec2"))
    if env.subnets and env.security_groups:
        subnets, groups = list(env.subnets), list(env.security_groups)
    else:
        found_subnets, found_groups = _default_network(ec2)
        subnets = list(env.subnets) or found_subnets
        groups = list(env.security_groups) or found_groups

    def compute():
        found = batch.describe_compute_environments(
            computeEnvironments=[env.name])["computeEnvironments"]
        found = [c for c in found if c.get("status") != "DELETED"]
        return found[0] if found else None

    def queue():
        found = batch.describe_job_queues(jobQueues=[env.name])["jobQueues"]
        found = [q for q in found if q.get("status") != "DELETED"]
        return found[0] if found else None

    def settled(found):
        return found is not None and found.get("status") == "VALID"

    try:  # everything of this name that exists checked before any change
        for name, service in ((env.instance_role, "ec2.amazonaws.com"),
                              (env.job_role, "ecs-tasks.amazonaws.com")):
            _existing_role(iam, name, service, env.tags)
        for kind, found in (("compute environment", compute()), ("job queue", queue())):
            if found is not None and not _ours(found, env.name):
                raise _foreign(kind, env.name)
        _launch_template(ec2, env, say, check_only=True)
        _role(iam, env.instance_role, "ec2.amazonaws.com", env.tags, say)
        iam.attach_role_policy(RoleName=env.instance_role, PolicyArn=BATCH_INSTANCE_POLICY_ARN)
        profile = _instance_profile(iam, env, say)
        job_role = _role(iam, env.job_role, "ecs-tasks.amazonaws.com", env.tags, say)
        try:
            had = _trust(iam.get_role_policy(RoleName=env.job_role, PolicyName=JOB_POLICY)[
                "PolicyDocument"])
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            had = None
        if had != env.job_role_policy():
            iam.put_role_policy(RoleName=env.job_role, PolicyName=JOB_POLICY,
                                PolicyDocument=json.dumps(env.job_role_policy()))
            say(f"role {env.job_role}: its policy {'set' if had is None else 'updated'} "
                f"(the agents' for {env.s3_prefix})")
        service_role = _service_role(iam)
    except botocore.exceptions.ClientError as exc:
        raise _aws("make the roles", exc) from exc

    try:
        _launch_template(ec2, env, say)
    except botocore.exceptions.ClientError as exc:
        raise _aws("make the launch template", exc) from exc
    try:
        existing = compute()
        wanted = env.compute_resources(subnets, groups, profile)
        if existing is None:
            deadline = time.monotonic() + 60
            while True:  # a new instance profile takes a while to be seen by Batch
                try:
                    batch.create_compute_environment(
                        computeEnvironmentName=env.name, type="MANAGED", state="ENABLED",
                        computeResources=wanted, serviceRole=service_role, tags=env.tags)
                    break
                except botocore.exceptions.ClientError as exc:
                    if "profile" not in str(exc).lower() or time.monotonic() > deadline:
                        raise
                    time.sleep(poll)
            say(f"compute environment {env.name}: created "
                f"({wanted['type']}, up to {env.max_vcpus} vCPUs)")
        elif not _ours(existing, env.name):
            raise _foreign("compute environment", env.name)
        else:
            have = existing.get("computeResources") or {}
            if have.get("type") != wanted["type"]:
                raise ConfigurationError(
                    f"Compute environment {env.name} is {have.get('type')}, not "
                    f"{wanted['type']}: Batch cannot change that. Run nipype-s3 batch "
                    "teardown first, or choose another --name.")
            for key, given, flag in (("subnets", env.subnets, "--subnets"),
                                     ("securityGroupIds", env.security_groups,
                                      "--security-groups"),
                                     ("instanceTypes", env.instance_types,
                                      "--instance-types")):
                if given and sorted(have.get(key) or []) != sorted(given):
                    raise ConfigurationError(
                        f"Compute environment {env.name} has {key} "
                        f"{' '.join(sorted(have.get(key) or []))}, not {' '.join(given)} "
                        f"({flag}): setup changes only the maximum vCPUs of one that "
                        "exists. Run nipype-s3 batch teardown first, or choose another "
                        "--name.")
            template = (have.get("launchTemplate") or {}).get("launchTemplateName")
            if template != env.launch_template:
                raise ConfigurationError(
                    f"Compute environment {env.name} does not use the launch template "
                    f"{env.launch_template} (it has {template!r}): run nipype-s3 batch "
                    "teardown first, or choose another --name.")
            if have.get("maxvCpus") != env.max_vcpus:
                _wait(compute, f"compute environment {env.name}", settled, timeout, poll)
                batch.update_compute_environment(
                    computeEnvironment=env.name,
                    computeResources={"maxvCpus": env.max_vcpus})
                say(f"compute environment {env.name}: up to {env.max_vcpus} vCPUs")
            else:
                say(f"compute environment {env.name}: exists")
        made = _wait(compute, f"compute environment {env.name}", settled, timeout, poll)
        existing_queue = queue()
        if existing_queue is None:
            batch.create_job_queue(**env.job_queue(made["computeEnvironmentArn"]),
                                   tags=env.tags)
            say(f"job queue {env.name}: created")
        elif not _ours(existing_queue, env.name):
            raise _foreign("job queue", env.name)
        else:
            say(f"job queue {env.name}: exists")
        _wait(queue, f"job queue {env.name}", settled, timeout, poll)
    except botocore.exceptions.ClientError as exc:
        raise _aws(f"make compute environment and job queue {env.name}", exc) from exc
    return {"job_queue": env.name, "job_role_arn": job_role}


def teardown(name: str, client, *, say=logger.info, timeout: float = 900,
             poll: float = 5) -> list[str]:
    """Remove what ``setup`` made for ``name`` (only what bears its tag; what is
    already gone is skipped). Returns what was removed."""
    checked_name(name)
    iam, batch = client("iam"), client("batch")
    removed: list[str] = []

    def look(kind: str):
        if kind == "queue":
            found = batch.describe_job_queues(jobQueues=[name])["jobQueues"]
        else:
            found = batch.describe_compute_environments(
                computeEnvironments=[name])["computeEnvironments"]
        found = [f for f in found if f.get("status") != "DELETED"]
        return found[0] if found else None

    try:
        for kind, what, update, delete in (
                ("queue", f"job queue {name}", lambda: batch.update_job_queue(
                    jobQueue=name, state="DISABLED"),
                 lambda: batch.delete_job_queue(jobQueue=name)),
                ("compute", f"compute environment {name}",
                 lambda: batch.update_compute_environment(computeEnvironment=name,
                                                          state="DISABLED"),
                 lambda: batch.delete_compute_environment(computeEnvironment=name))):
            found = look(kind)
            if found is None:
                say(f"{what}: not there")
                continue
            if not _ours(found, name):
                raise ConfigurationError(
                    f"{what} was not made by nipype-s3 batch setup (no {SETUP_TAG} tag): "
                    "nothing was removed. Remove it yourself.")
            if found.get("state") != "DISABLED":
                _wait(lambda k=kind: look(k), what, lambda f: f is None or f.get(
                    "status") in ("VALID", "INVALID"), timeout, poll, strict=False)
                update()
            _wait(lambda k=kind: look(k), what, lambda f: f is None or (
                f.get("state") == "DISABLED" and f.get("status") in ("VALID", "INVALID")),
                timeout, poll, strict=False)
            delete()
            _wait(lambda k=kind: look(k), what, lambda f: f is None, timeout, poll,
                  strict=False)
            say(f"{what}: removed")
            removed.append(what)
    except botocore.exceptions.ClientError as exc:
        raise _aws(f"remove job queue and compute environment {name}", exc) from exc
    try:
        removed += _remove_launch_template(client("ec2"), name, say)
    except botocore.exceptions.ClientError as exc:
        raise _aws(f"remove the launch template of {name}", exc) from exc
    try:
        removed += _remove_roles(iam, name, say)
    except botocore.exceptions.ClientError as exc:
        raise _aws(f"remove the roles of {name}", exc) from exc
    return removed


def _remove_launch_template(ec2, name: str, say) -> list[str]:
    template = f"nipype-s3-{name}"
    try:
        found = ec2.describe_launch_templates(LaunchTemplateNames=[template])[
            "LaunchTemplates"]
    except botocore.exceptions.ClientError as exc:
        if "NotFound" not in _code(exc):
            raise
        found = []
    if not found:
        say(f"launch template {template}: not there")
        return []
    tags = {t["Key"]: t["Value"] for t in found[0].get("Tags") or []}
    if tags.get(SETUP_TAG) != name:
        raise ConfigurationError(f"launch template {template} was not made by nipype-s3 "
                                 f"batch setup (no {SETUP_TAG} tag): it was left. Remove "
                                 "it yourself.")
    ec2.delete_launch_template(LaunchTemplateName=template)
    say(f"launch template {template}: removed")
    return [f"launch template {template}"]


def _remove_roles(iam, name: str, say) -> list[str]:
    job_role, instance_role = roles(name)
    removed = []
    for role in (job_role, instance_role):
        try:
            found = iam.get_role(RoleName=role)["Role"]
        except botocore.exceptions.ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            say(f"role {role}: not there")
            continue
        tags = {t["Key"]: t["Value"] for t in found.get("Tags") or []}
        if tags.get(SETUP_TAG) != name:
            raise ConfigurationError(f"role {role} was not made by nipype-s3 batch setup "
                                     f"(no {SETUP_TAG} tag): it was left. Remove it "
                                     "yourself.")
        if role == instance_role:
            try:
                iam.remove_role_from_instance_profile(InstanceProfileName=role,
                                                      RoleName=role)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "NoSuchEntity":
                    raise
            try:
                iam.delete_instance_profile(InstanceProfileName=role)
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "NoSuchEntity":
                    raise
        for policy in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            iam.delete_role_policy(RoleName=role, PolicyName=policy)
        for attached in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
            iam.detach_role_policy(RoleName=role, PolicyArn=attached["PolicyArn"])
        iam.delete_role(RoleName=role)
        say(f"role {role}: removed")
        removed.append(f"role {role}")
    return removed
