"""What a refused RunInstances says (botocore Stubber: no server)."""

import boto3
import pytest
from botocore.stub import ANY, Stubber

from nipype_s3.ec2.instances import InstancePool, LaunchSpec
from nipype_s3.exceptions import InstanceLaunchError


@pytest.mark.parametrize("code, message, expected", [
    ("InvalidInstanceType", "The instance type 'c9.huge' does not exist",
     "Instance type 'c9.huge' does not exist in this region (InvalidInstanceType: The "
     "instance type 'c9.huge' does not exist). Check the instance_type (e.g. 'c6i.2xlarge')."),
])
def test_a_refused_instance_type_is_named(code, message, expected):
    ec2 = boto3.client("ec2", region_name="us-east-1")
    stub = Stubber(ec2)
    stub.add_client_error("run_instances", service_error_code=code, service_message=message)
    stub.add_response("describe_instances", {"Reservations": []},
                      {"Filters": ANY})  # the clean-up finds nothing to terminate
    stub.activate()
    pool = InstancePool(ec2, "run-1", LaunchSpec(ami="ami-0ed094fb1304fd857",
                                                 instance_type="c9.huge",
                                                 user_data="#!/bin/bash\ntrue\n"))
    with pytest.raises(InstanceLaunchError) as err:
        pool.launch(1)
    assert str(err.value) == expected
    stub.assert_no_pending_responses()
