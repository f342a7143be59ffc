"""Launch, count and terminate a run's instances — always by tag, never from memory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import botocore.exceptions

from ..exceptions import ConfigurationError, EC2Error, InstanceLaunchError
from .jobs import RUN_TAG

__all__ = ["InstancePool", "LaunchSpec", "default_ami", "DEFAULT_AMI_PARAMETER",
           "terminate_run"]

logger = logging.getLogger("nipype.workflow")

#: Amazon Linux 2023 (x86_64), from AWS's public SSM parameters.
DEFAULT_AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"

_LIVE = ["pending", "running"]
#: the tag telling apart a run's pools of one instance type (one per image)
FLEET_TAG = "nipype-s3:fleet"
_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientCapacity", "Unsupported",
             "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
             "InsufficientFreeAddressesInSubnet"}


def default_ami(ssm_client, parameter: str = DEFAULT_AMI_PARAMETER) -> str:
    """The AMI id published in a public SSM parameter."""
    try:
        return ssm_client.get_parameter(Name=parameter)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as exc:
        raise ConfigurationError(
            f"Could not read the default AMI from SSM parameter {parameter!r} "
            f"({exc.response.get('Error', {}).get('Code')}). Pass plugin_args['ami'] "
            "with an AMI id of your region.") from exc


@dataclass
class LaunchSpec:
    """What every instance of a run is launched with."""

    ami: str
    instance_type: str
    user_data: str
    iam_instance_profile: str | None = None
    subnet_id: str | None = None
    security_group_ids: list = field(default_factory=list)
    key_name: str | None = None
    volume_gb: int | None = None
    extra_tags: dict = field(default_factory=dict)


class InstancePool:
    """A run's instances: launched tagged, counted and terminated by that tag."""

    def __init__(self, ec2_client, run_id: str, spec: LaunchSpec, *, spot: bool = False,
                 spot_retries: int = 2) -> None:
        self.ec2 = ec2_client
        self.run_id = run_id
        self.spec = spec
        self.spot = spot
        self.spot_failures = 0
        self.spot_retries = spot_retries
        self.launched: dict[str, dict] = {}
        self.ended: list[str] = []
        self.peak = 0

    def _filters(self, states=None):
        filters = [{"Name": f"tag:{RUN_TAG}", "Values": [self.run_id]}]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        return filters

    def live(self) -> list[dict]:
        """Pending and running instances of the run and this pool's instance type (one
        DescribeInstances, paginated).

        Instances of ours that EC2 reports shutting down or terminated are recorded in
        :attr:`ended` (once each): an instance that ends by itself has an agent that
        stopped, or never started.
        """
        found = []
        filters = self._filters() + [{"Name": "instance-type",
                                      "Values": [self.spec.instance_type]}]
        if FLEET_TAG in self.spec.extra_tags:  # pools of one type, for different images
            filters.append({"Name": f"tag:{FLEET_TAG}",
                            "Values": [str(self.spec.extra_tags[FLEET_TAG])]})
        now = time.time()
        paginator = self.ec2.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=filters):
            for res in page.get("Reservations", []):
                for inst in res.get("Instances", []):
                    iid = inst["InstanceId"]
                    state = inst.get("State", {}).get("Name")
                    info = self.launched.setdefault(iid, {
                        "type": inst.get("InstanceType"), "launched": now, "spot": False})
                    if state in _LIVE:
                        found.append(inst)
                        info["seen"] = now
                    elif "ended" not in info and "terminated" not in info:
                        info["ended"] = now
                        self.ended.append(iid)
        self.peak = max(self.peak, len(found))
        return found

    def check_image(self) -> None:
        """Fail early, with a clear message, when the AMI cannot be used."""
        try:
            images = self.ec2.describe_images(ImageIds=[self.spec.ami]).get("Images", [])
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise InstanceLaunchError(self._explain(code, exc)) from exc
        if not images:
            raise InstanceLaunchError(
                f"AMI {self.spec.ami!r} cannot be used (not found in this region). Check "
                "the AMI id, or leave 'ami' unset for Amazon Linux 2023.")

    def _request(self, count: int, spot: bool) -> dict:
        spec = self.spec
        tags = [{"Key": RUN_TAG, "Value": self.run_id},
                {"Key": "Name", "Value": f"nipype-s3 {self.run_id}"}]
        tags += [{"Key": k, "Value": str(v)} for k, v in spec.extra_tags.items()]
        args = dict(ImageId=spec.ami, InstanceType=spec.instance_type, MinCount=1,
                    MaxCount=count, UserData=spec.user_data,
                    InstanceInitiatedShutdownBehavior="terminate",
                    # IMDSv2 only, one hop: a container on the instance cannot reach the
                    # metadata service, so it cannot take the instance role's credentials
                    MetadataOptions={"HttpTokens": "required", "HttpPutResponseHopLimit": 1,
                                     "HttpEndpoint": "enabled"},
                    TagSpecifications=[{"ResourceType": "instance", "Tags": tags},
                                       {"ResourceType": "volume", "Tags": tags}])
        if spec.iam_instance_profile:
            key = "Arn" if spec.iam_instance_profile.startswith("arn:") else "Name"
            args["IamInstanceProfile"] = {key: spec.iam_instance_profile}
        if spec.subnet_id:
            args["SubnetId"] = spec.subnet_id
        if spec.security_group_ids:
            args["SecurityGroupIds"] = list(spec.security_group_ids)
        if spec.key_name:
            args["KeyName"] = spec.key_name
        if spec.volume_gb:
            args["BlockDeviceMappings"] = [{"DeviceName": "/dev/xvda", "Ebs": {
                "VolumeSize": int(spec.volume_gb), "VolumeType": "gp3",
                "DeleteOnTermination": True}}]
        if spot:
            args["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        return args

    def launch(self, count: int) -> list[str]:
        """Launch up to ``count`` instances; return their ids.

        Spot requests that fail for capacity are retried as on-demand once
        ``spot_retries`` is used up. A failed launch terminates whatever it created and
        raises :class:`~nipype_s3.exceptions.InstanceLaunchError`.
        """
        if count <= 0:
            return []
        use_spot = self.spot and self.spot_failures < self.spot_retries
        try:
            resp = self.ec2.run_instances(**self._request(count, use_spot))
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if use_spot and code in _CAPACITY:
                self.spot_failures += 1
                logger.warning("EC2Plugin: spot launch failed (%s), attempt %d of %d%s",
                               code, self.spot_failures, self.spot_retries,
                               "; falling back to on-demand"
                               if self.spot_failures >= self.spot_retries else "")
                return []
            self._cleanup_after_failed_launch()
            raise InstanceLaunchError(self._explain(code, exc)) from exc
        ids = [i["InstanceId"] for i in resp.get("Instances", [])]
        now = time.time()
        for inst in resp.get("Instances", []):
            self.launched[inst["InstanceId"]] = {"type": self.spec.instance_type,
                                                 "launched": now, "spot": use_spot}
        logger.info("EC2Plugin: RunInstances %s x%d (%s%s): %s", self.spec.instance_type,
                    len(ids), "spot" if use_spot else "on-demand",
                    f", {self.spec.ami}", ", ".join(ids))
        return ids

    def _explain(self, code: str, exc) -> str:
        spec = self.spec
        message = exc.response.get("Error", {}).get("Message", "")
        if code in _CAPACITY:
            return (f"EC2 has no capacity for {spec.instance_type} right now ({code}). Try "
                    "another instance_type, another subnet/availability zone, or later.")
        if code == "InvalidInstanceType":
            return (f"Instance type {spec.instance_type!r} does not exist in this region "
                    f"({code}: {message}). Check the instance_type (e.g. 'c6i.2xlarge').")
        if code.startswith("InvalidAMIID"):
            return (f"AMI {spec.ami!r} cannot be used ({code}: {message}). Check the AMI id "
                    "exists in this region, or leave 'ami' unset for Amazon Linux 2023.")
        if code in ("NoSuchEntity",) or ("instance profile" in message.lower()) or \
                (code == "InvalidParameterValue" and "iamInstanceProfile" in message):
            return (f"Instance profile {spec.iam_instance_profile!r} does not exist ({code}: "
                    f"{message}). Create it (see the EC2Plugin setup docs) or pass "
                    "plugin_args['iam_instance_profile'].")
        if code in ("UnauthorizedOperation", "AccessDenied"):
            return (f"Not allowed to launch instances ({code}: {message}). The controller's "
                    "credentials need ec2:RunInstances, ec2:CreateTags and iam:PassRole for "
                    "the instance profile (see the EC2Plugin IAM policy in the docs).")
        if code == "InstanceLimitExceeded" or code == "VcpuLimitExceeded":
            return (f"The account's EC2 limit is reached ({code}: {message}). Lower "
                    "max_instances, or ask AWS for a higher vCPU quota.")
        return f"RunInstances failed ({code}: {message})."

    def _cleanup_after_failed_launch(self) -> None:
        try:
            self.terminate_all()
        except EC2Error as exc:  # pragma: no cover - reported, the original error wins
            logger.error("EC2Plugin: cleanup after a failed launch failed: %s", exc)

    def terminate_all(self) -> list[str]:
        """Terminate every pending/running instance tagged with the run."""
        return terminate_run(self.ec2, self.run_id, pool=self)


def terminate_run(ec2_client, run_id: str, *, pool: InstancePool | None = None,
                  dry_run: bool = False) -> list[str]:
    """Terminate the live instances tagged ``nipype-s3:run=<run_id>``; return their ids."""
    filters = [{"Name": f"tag:{RUN_TAG}", "Values": [run_id]},
               {"Name": "instance-state-name", "Values": _LIVE + ["stopping", "stopped"]}]
    ids = []
    try:
        for page in ec2_client.get_paginator("describe_instances").paginate(Filters=filters):
            for res in page.get("Reservations", []):
                ids.extend(i["InstanceId"] for i in res.get("Instances", []))
        if ids and not dry_run:
            for start in range(0, len(ids), 500):
                ec2_client.terminate_instances(InstanceIds=ids[start:start + 500])
            logger.info("EC2Plugin: TerminateInstances (run %s): %s", run_id, ", ".join(ids))
    except botocore.exceptions.ClientError as exc:
        raise EC2Error(f"Could not terminate the instances of run {run_id} "
                       f"({exc.response.get('Error', {}).get('Code')}): run "
                       f"'nipype-s3 cleanup --run {run_id}' again, or terminate instances "
                       f"tagged {RUN_TAG}={run_id} in the console.") from exc
    if pool is not None:
        now = time.time()
        for iid in ids:
            pool.launched.setdefault(iid, {"type": pool.spec.instance_type, "launched": now,
                                           "spot": False})["terminated"] = now
    return ids
