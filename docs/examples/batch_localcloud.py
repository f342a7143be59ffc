"""BatchPlugin on LocalCloud's Batch: make a job queue as ``nipype-s3 batch setup``
does, run a workflow whose nodes run in a container image as Batch jobs, check it
against Linear, and remove the queue again.

Needs a Docker engine and a nipype image on this machine (tests/docker/build-images.sh
builds nipype-s3-test/nipype:local; NIPYPE_S3_EXAMPLE_IMAGE names another).
"""

import os
import tempfile

import boto3
from nipype import Function, JoinNode, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import BatchPlugin
from nipype_s3.backends.batch import BatchEnvironment, setup, teardown
from nipype_s3.testing import LocalCloud

IMAGE = os.environ.get("NIPYPE_S3_EXAMPLE_IMAGE", "nipype-s3-test/nipype:local")


def volume_ml(subject):
    return 1000.0 + 12.5 * subject  # stands in for a segmentation step


def mean(volumes):
    return sum(volumes) / len(volumes)


def build(base_dir):
    wf = Workflow("volumes", base_dir=base_dir)
    subjects = Node(IdentityInterface(fields=["subject"]), name="subjects")
    subjects.iterables = ("subject", [1, 2, 3, 4, 5, 6])
    measure = Node(Function(input_names=["subject"], output_names=["ml"],
                            function=volume_ml), name="measure")
    group = JoinNode(Function(input_names=["volumes"], output_names=["mean_ml"],
                              function=mean), joinsource="subjects", joinfield="volumes",
                     name="group")
    wf.connect(subjects, "subject", measure, "subject")
    wf.connect(measure, "ml", group, "volumes")
    return wf


def group_mean(result):
    (node,) = [n for n in result.nodes() if n.name == "group"]
    return node.result.outputs.mean_ml


work = tempfile.mkdtemp()
with LocalCloud() as cloud:
    boto3.client("s3").create_bucket(Bucket="my-bucket")
    # what `nipype-s3 batch setup --name neuro --s3-prefix s3://my-bucket/runs --spot` makes
    queue = setup(BatchEnvironment("neuro", "s3://my-bucket/runs", spot=True, max_vcpus=16),
                  boto3.client)
    plugin = BatchPlugin(plugin_args=dict(queue, s3_prefix="s3://my-bucket/runs",
                                          image=IMAGE, max_agents=2, idle_timeout=5))
    on_batch = group_mean(build(os.path.join(work, "batch")).run(plugin=plugin))
    print(f"group mean {on_batch} ml; agent jobs used "
          f"{plugin.cost_report['vcpu_seconds']:.0f} vCPU-seconds")
    assert all(job["status"] in ("SUCCEEDED", "FAILED") for job in cloud.batch.jobs.values())
    teardown("neuro", boto3.client)  # `nipype-s3 batch teardown --name neuro`

assert on_batch == group_mean(build(os.path.join(work, "linear")).run(plugin="Linear"))
