"""``nipype-s3 batch setup``/``teardown`` on LocalCloud: they make (idempotently) and
remove exactly what the CloudFormation template describes, touch nothing they did not
make, and BatchPlugin refuses an agent larger than the queue's compute environment
before submitting anything."""

from __future__ import annotations

import json
import os
import time

import boto3
import pytest

from nipype_s3 import BatchPlugin
from nipype_s3.backends.batch import BatchEnvironment, cloudformation_template, setup, teardown
from nipype_s3.cli import main
from nipype_s3.exceptions import ConfigurationError
from nipype_s3.iam import BATCH_INSTANCE_POLICY_ARN, batch_controller_policy, batch_setup_policy
from nipype_s3.testing import LocalCloud

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
PREFIX = "s3://my-bucket/nipype-runs"


def _camel(value):
    if isinstance(value, list):
        return [_camel(v) for v in value]
    if isinstance(value, dict):
        return {k[:1].lower() + k[1:]: (v if k == "Tags" else _camel(v))
                for k, v in value.items()}
    return value


@pytest.fixture
def cloud():
    with LocalCloud(boot="direct") as local:
        yield local
        assert local.errors == []


def test_setup_makes_what_the_template_describes_and_teardown_removes_it(cloud):
    env = BatchEnvironment("neuro-spot", PREFIX, spot=True, max_vcpus=32)
    said: list[str] = []
    made = setup(env, boto3.client, say=said.append, poll=0.1)
    assert made == {"job_queue": "neuro-spot", "job_role_arn":
                    "arn:aws:iam::123456789012:role/nipype-s3-neuro-spot-job"}
    assert "compute environment neuro-spot: created (SPOT, up to 32 vCPUs)" in said
    template = cloudformation_template(env)["Resources"]
    batch, iam = boto3.client("batch"), boto3.client("iam")
    (compute,) = batch.describe_compute_environments(
        computeEnvironments=["neuro-spot"])["computeEnvironments"]
    want = _camel(template["ComputeEnvironment"]["Properties"]["ComputeResources"])
    have = compute["computeResources"]
    for key in ("type", "allocationStrategy", "minvCpus", "maxvCpus", "instanceTypes",
                "tags"):
        assert have[key] == want[key], key
    assert have["instanceRole"].endswith(":instance-profile/nipype-s3-neuro-spot-instance")
    assert have["launchTemplate"] == want["launchTemplate"]
    ec2 = boto3.client("ec2")
    (version,) = ec2.describe_launch_template_versions(
        LaunchTemplateName="nipype-s3-neuro-spot")["LaunchTemplateVersions"]
    assert version["LaunchTemplateData"]["MetadataOptions"] == \
        template["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert version["LaunchTemplateData"]["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert compute["type"] == "MANAGED" and compute["status"] == "VALID"
    (queue,) = batch.describe_job_queues(jobQueues=["neuro-spot"])["jobQueues"]
    want_queue = _camel(template["JobQueue"]["Properties"])
    assert (queue["priority"], queue["state"]) == (want_queue["priority"], want_queue["state"])
    assert queue["computeEnvironmentOrder"][0]["computeEnvironment"] == \
        compute["computeEnvironmentArn"]
    job = template["JobRole"]["Properties"]
    assert iam.get_role(RoleName=job["RoleName"])["Role"]["AssumeRolePolicyDocument"] == \
        job["AssumeRolePolicyDocument"]
    assert iam.get_role_policy(RoleName=job["RoleName"], PolicyName="nipype-s3-agent")[
        "PolicyDocument"] == job["Policies"][0]["PolicyDocument"]
    instance = template["InstanceRole"]["Properties"]
    assert [p["PolicyArn"] for p in iam.list_attached_role_policies(
        RoleName=instance["RoleName"])["AttachedPolicies"]] == \
        instance["ManagedPolicyArns"] == [BATCH_INSTANCE_POLICY_ARN]
    profile = iam.get_instance_profile(InstanceProfileName="nipype-s3-neuro-spot-instance")
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == \
        [instance["RoleName"]]

    # again: nothing new; a larger maximum is brought up to date; spot cannot become
    # on-demand in place
    said.clear()
    setup(BatchEnvironment("neuro-spot", PREFIX, spot=True, max_vcpus=64), boto3.client,
          say=said.append, poll=0.1)
    assert not [line for line in said if "created" in line]
    assert batch.describe_compute_environments(computeEnvironments=["neuro-spot"])[
        "computeEnvironments"][0]["computeResources"]["maxvCpus"] == 64
    with pytest.raises(ConfigurationError, match="is SPOT, not EC2.*teardown"):
        setup(BatchEnvironment("neuro-spot", PREFIX, max_vcpus=64), boto3.client, poll=0.1)
    with pytest.raises(ConfigurationError, match=r"has subnets .*\(--subnets\).*teardown"):
        setup(BatchEnvironment("neuro-spot", PREFIX, spot=True, max_vcpus=64,
                               subnets=("subnet-0123456789abcdef0",)), boto3.client,
              poll=0.1)
    said.clear()
    setup(BatchEnvironment("neuro-spot", PREFIX, spot=True, max_vcpus=64,
                           data_buckets=("my-data",)), boto3.client, say=said.append,
          poll=0.1)
    assert "role nipype-s3-neuro-spot-job: its policy updated (the agents' for " \
           f"{PREFIX})" in said

    # teardown removes what setup made, and nothing else; a second one has nothing to do
    with pytest.raises(ConfigurationError, match="not made by nipype-s3 batch setup"):
        teardown(cloud.batch.QUEUE, boto3.client, poll=0.1)
    assert teardown("neuro-spot", boto3.client, poll=0.1) == [
        "job queue neuro-spot", "compute environment neuro-spot",
        "launch template nipype-s3-neuro-spot", "role nipype-s3-neuro-spot-job",
        "role nipype-s3-neuro-spot-instance"]
    assert teardown("neuro-spot", boto3.client, poll=0.1) == []
    assert batch.describe_job_queues(jobQueues=[cloud.batch.QUEUE])["jobQueues"]
    assert not [r for r in iam.list_roles()["Roles"] if "neuro-spot" in r["RoleName"]]


def test_setup_leaves_alone_a_role_it_did_not_make_or_whose_trust_changed(cloud):
    iam = boto3.client("iam")
    iam.create_role(RoleName="nipype-s3-theirs-job", AssumeRolePolicyDocument="{}")
    with pytest.raises(ConfigurationError, match="nipype-s3-theirs-job exists that"):
        setup(BatchEnvironment("theirs", PREFIX), boto3.client, poll=0.1)
    with pytest.raises(ConfigurationError, match="nipype-s3-theirs-job was not made"):
        teardown("theirs", boto3.client, poll=0.1)
    assert iam.get_role(RoleName="nipype-s3-theirs-job")
    # tagged for another name, and trusting someone else: no policy goes to it
    outsider = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::999999999999:root"},
        "Action": "sts:AssumeRole"}]})
    iam.create_role(RoleName="nipype-s3-neuro-job", AssumeRolePolicyDocument=outsider,
                    Tags=[{"Key": "nipype-s3:batch-setup", "Value": "other"}])
    with pytest.raises(ConfigurationError, match="tag is 'other'"):
        setup(BatchEnvironment("neuro", PREFIX), boto3.client, poll=0.1)
    iam.tag_role(RoleName="nipype-s3-neuro-job",
                 Tags=[{"Key": "nipype-s3:batch-setup", "Value": "neuro"}])
    with pytest.raises(ConfigurationError, match="trusts other principals"):
        setup(BatchEnvironment("neuro", PREFIX), boto3.client, poll=0.1)
    assert iam.list_role_policies(RoleName="nipype-s3-neuro-job")["PolicyNames"] == []
    assert not [r for r in iam.list_roles()["Roles"]  # nothing else was made either
                if r["RoleName"] in ("nipype-s3-neuro-instance", "nipype-s3-theirs-instance")]
    # a compute environment and job queue of that name someone else made: refused before
    # anything is made
    with pytest.raises(ConfigurationError, match="(compute environment|job queue) "
                                                 "nipype-s3-local exists that.*nothing was "
                                                 "changed"):
        setup(BatchEnvironment(cloud.batch.QUEUE, PREFIX), boto3.client, poll=0.1)
    assert not [r for r in iam.list_roles()["Roles"] if "nipype-s3-local" in r["RoleName"]]
    with pytest.raises(boto3.client("ec2").exceptions.ClientError):
        boto3.client("ec2").describe_launch_templates(
            LaunchTemplateNames=["nipype-s3-nipype-s3-local"])


def test_localcloud_batch_refuses_deletes_aws_refuses(cloud):
    env = BatchEnvironment("strict", PREFIX, max_vcpus=4)
    setup(env, boto3.client, poll=0.1)
    batch = boto3.client("batch")
    for call, kwargs in ((batch.delete_job_queue, {"jobQueue": "strict"}),
                         (batch.delete_compute_environment, {"computeEnvironment": "strict"})):
        with pytest.raises(batch.exceptions.ClientException, match="disable it first"):
            call(**kwargs)
    batch.update_compute_environment(computeEnvironment="strict", state="DISABLED")
    with pytest.raises(batch.exceptions.ClientException, match="JobQueue relationship"):
        batch.delete_compute_environment(computeEnvironment="strict")
    batch.update_job_queue(jobQueue="strict", state="DISABLED")
    with pytest.raises(batch.exceptions.ClientException, match="DISABLED"):
        batch.submit_job(jobName="x", jobQueue="strict", jobDefinition="any")
    teardown("strict", boto3.client, poll=0.1)


def test_an_agent_larger_than_the_compute_environment_is_refused_before_submitting(
        cloud, tmp_path):
    from nipype import Function, Node, Workflow

    made = setup(BatchEnvironment("tiny", PREFIX, max_vcpus=2), boto3.client, poll=0.1)
    boto3.client("s3").create_bucket(Bucket="my-bucket")

    def one():
        return 1

    wf = Workflow("big", base_dir=str(tmp_path))
    big = Node(Function(output_names=["y"], function=one), name="big")
    wf.add_nodes([big])
    before = cloud.batch.submitted
    args = dict(made, s3_prefix=PREFIX, image="nipype-s3-test/nipype:local")
    with pytest.raises(ConfigurationError, match=r"4 vCPUs \(agent_vcpus\).*at most 2"):
        wf.run(plugin=BatchPlugin(plugin_args=dict(args, agent_vcpus=4)))
    big.n_procs = 3
    big.plugin_args = {"batch": "job"}
    with pytest.raises(ConfigurationError, match="Node big.big asks for 3 CPUs.*at most 2"):
        wf.run(plugin=BatchPlugin(plugin_args=args))
    assert cloud.batch.submitted == before
    assert not boto3.client("sqs").list_queues(QueueNamePrefix="nipype-s3-").get("QueueUrls")
    teardown("tiny", boto3.client, poll=0.1)


def test_the_cli_prints_plugin_args_and_one_line_errors(cloud, capsys):
    assert main(["batch", "setup", "--name", "cli-env", "--s3-prefix", PREFIX,
                 "--max-vcpus", "8"]) == 0
    out = capsys.readouterr().out
    args = json.loads(out.rsplit("plugin_args ", 1)[1])
    assert args["job_queue"] == "cli-env" and args["job_role_arn"].endswith(
        "role/nipype-s3-cli-env-job")
    assert main(["batch", "teardown", "--name", "cli-env"]) == 0
    assert "5 removed" in capsys.readouterr().out
    for argv, said in ((["batch", "setup", "--name", "x"], "needs --s3-prefix"),
                       (["batch", "setup", "--name", "bad name", "--s3-prefix", PREFIX],
                        "Batch environment name 'bad name'"),
                       (["batch", "setup", "--name", "abc", "--s3-prefix", PREFIX,
                         "--subnets", "vpc-1"], "--subnets 'vpc-1'"),
                       (["batch", "template", "--name", "abc", "--s3-prefix", PREFIX,
                         "--max-vcpus", "0"], "--max-vcpus 0"),
                       (["batch", "template", "--name", "abc", "--s3-prefix", PREFIX,
                         "--data-bucket", "*"], "no wildcards"),
                       (["batch", "template", "--name", "abc", "--s3-prefix", "s3://my-bucket/x*"],
                        "no wildcards"),
                       (["batch", "template", "--name", "abc", "--s3-prefix", PREFIX,
                         "--data-bucket", "data/raw"], "a bucket's name only")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err


def test_the_docs_print_the_template_and_policies_this_code_makes():
    doc = open(os.path.join(ROOT, "docs", "batch.rst")).read()
    template = cloudformation_template(BatchEnvironment("neuro-spot", PREFIX, spot=True))
    with open(os.path.join(ROOT, "docs", "batch", "neuro-spot.template.json")) as f:
        assert json.load(f) == template
    assert "literalinclude:: batch/neuro-spot.template.json" in doc
    for document in (batch_setup_policy("neuro-spot"),
                     batch_controller_policy("my-bucket", "nipype-runs",
                                             job_queue="neuro-spot",
                                             job_role_arn="arn:aws:iam::*:role/"
                                                          "nipype-s3-neuro-spot-job")):
        block = "\n".join("    " + line for line in json.dumps(document, indent=2).splitlines())
        assert block in doc


def test_a_disabled_queue_or_a_missing_job_definition_is_refused_before_submitting(
        cloud, tmp_path):
    from nipype import Function, Node, Workflow

    boto3.client("s3").create_bucket(Bucket="my-bucket")

    def one():
        return 1

    wf = Workflow("refused", base_dir=str(tmp_path))
    wf.add_nodes([Node(Function(output_names=["y"], function=one), name="one")])
    batch = boto3.client("batch")
    args = {"s3_prefix": PREFIX, "job_queue": cloud.batch.QUEUE,
            "image": "nipype-s3-test/nipype:local"}
    batch.update_job_queue(jobQueue=cloud.batch.QUEUE, state="DISABLED")
    with pytest.raises(ConfigurationError, match=r"is DISABLED.*Enable it.*Nothing was "
                                                 "submitted"):
        wf.run(plugin=BatchPlugin(plugin_args=args))
    batch.update_job_queue(jobQueue=cloud.batch.QUEUE, state="ENABLED")
    with pytest.raises(ConfigurationError, match="no active Batch job definition 'my-def:7'"):
        wf.run(plugin=BatchPlugin(plugin_args=dict(args, job_definition="my-def:7")))
    assert cloud.batch.submitted == 0
    assert not boto3.client("sqs").list_queues(QueueNamePrefix="nipype-s3-").get("QueueUrls")


def test_a_node_asks_for_gpus_for_its_own_job(cloud, tmp_path):
    """Refused before submitting where the queue has no GPU instances (and outside a
    job of its own); else its job asks Batch for them, and waits where there are none
    (LocalCloud here, as a queue without GPU instances)."""
    import threading

    from nipype import Function, Node, Workflow

    from nipype_s3.exceptions import BatchError

    boto3.client("s3").create_bucket(Bucket="my-bucket")

    def one():
        return 1

    def workflow(**node_args):
        wf = Workflow("gpu", base_dir=str(tmp_path))
        node = Node(Function(output_names=["y"], function=one), name="train")
        node.plugin_args = node_args
        wf.add_nodes([node])
        return wf

    args = {"s3_prefix": PREFIX, "image": "nipype-s3-test/nipype:local",
            "max_boot_failures": 1, "max_attempts": 1}
    with pytest.raises(ConfigurationError, match="'gpus'.*Batch job of its own"):
        workflow(gpus=1).run(plugin=BatchPlugin(plugin_args=dict(
            args, job_queue=cloud.batch.QUEUE)))
    made = setup(BatchEnvironment("cpu-only", PREFIX, max_vcpus=8), boto3.client, poll=0.1)
    with pytest.raises(ConfigurationError, match=r"asks for 1 GPU.*no GPU instances.*"
                                                 r"--instance-types optimal g5"):
        workflow(batch="job", gpus=1).run(plugin=BatchPlugin(plugin_args=dict(
            args, **made)))
    assert cloud.batch.submitted == 0
    setup(BatchEnvironment("gpu-too", PREFIX, max_vcpus=8, instance_types=("optimal", "g5")),
          boto3.client, poll=0.1)

    held = {}

    def reclaim_when_held():  # the job waits for a GPU: end it as a reclaim would
        deadline = time.time() + 60
        while time.time() < deadline and not held:
            for job in list(cloud.batch.jobs.values()):
                if job["status"] == "RUNNABLE" and "no GPU" in job.get("statusReason", ""):
                    held.update(job["_overrides"])
                    cloud.batch._stop(job, "Host EC2 (instance i-0) terminated.", None)
            time.sleep(0.2)

    watcher = threading.Thread(target=reclaim_when_held)
    watcher.start()
    with pytest.raises(BatchError, match="Host EC2"):
        workflow(batch="job", gpus=1).run(plugin=BatchPlugin(plugin_args=dict(
            args, job_queue="gpu-too")))
    watcher.join()
    assert {"type": "GPU", "value": "1"} in held["resourceRequirements"]
    assert all(j["status"] in ("SUCCEEDED", "FAILED") for j in cloud.batch.jobs.values())
