"""Pools of one instance type for different images are counted apart: nodes in an image
do not wait for the default environment's instances to go idle (nor the reverse), and
a boot failure counts once."""

import boto3
from moto import mock_aws

from nipype_s3.ec2.instances import FLEET_TAG, InstancePool, LaunchSpec


def test_pools_of_one_type_tell_their_instances_apart():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        pools = {kind: InstancePool(ec2, "run1", LaunchSpec(
            ami=ami, instance_type="c6i.large", user_data="#!/bin/bash\n",
            extra_tags={FLEET_TAG: kind})) for kind in ("jobs", "jobs-c6i-large-ab12")}
        launched = {kind: pool.launch(1) for kind, pool in pools.items()}
        for kind, pool in pools.items():
            assert [i["InstanceId"] for i in pool.live()] == launched[kind]
        ec2.terminate_instances(InstanceIds=launched["jobs"])
        assert pools["jobs"].live() == [] and pools["jobs"].ended == launched["jobs"]
        assert len(pools["jobs-c6i-large-ab12"].live()) == 1
        assert pools["jobs-c6i-large-ab12"].ended == []  # counted once, by its own pool
