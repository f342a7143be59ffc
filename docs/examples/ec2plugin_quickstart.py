"""EC2Plugin: a workflow whose nodes run on (LocalCloud) instances."""

import tempfile

import boto3
from nipype import Function, Node, Workflow

from nipype_s3 import EC2Plugin
from nipype_s3.testing import LocalCloud


def add_one(x):
    return x + 1


work = tempfile.mkdtemp()
with LocalCloud() as cloud:
    boto3.client("s3").create_bucket(Bucket="my-bucket")
    first = Node(Function(input_names=["x"], output_names=["y"], function=add_one), "first")
    second = Node(Function(input_names=["x"], output_names=["y"], function=add_one), "second")
    first.inputs.x = 1
    wf = Workflow("cloudy", base_dir=work)
    wf.connect(first, "y", second, "x")

    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                    "instance_type": "c6i.large", "max_instances": 2})
    result = wf.run(plugin=plugin)

    outputs = {n.name: n.result.outputs.y for n in result.nodes()}
    print(outputs, plugin.cost_report["usd_estimate"])
    assert outputs == {"first": 2, "second": 3}
    assert cloud.live_instances() == []  # every instance was terminated
