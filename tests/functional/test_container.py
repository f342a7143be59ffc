"""EC2ContainerRun on LocalCloud with runtime='none': a real command on a staged NIfTI."""

import os
import sys
from pathlib import Path

import boto3
import pytest

from nipype_s3 import EC2ContainerRun, InstanceTimeout, RemoteNodeError
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow

MASK_SCRIPT = r'''
import os, sys
import nibabel as nib
import numpy as np
img = nib.load(sys.argv[1])
data = np.asanyarray(img.dataobj, dtype="float32")
mean = data.mean(axis=-1) if data.ndim == 4 else data
mask = (mean > np.percentile(mean, 40)).astype("uint8")
os.makedirs(sys.argv[2], exist_ok=True)
nib.save(nib.Nifti1Image(mask, img.affine), os.path.join(sys.argv[2], "brain_mask.nii.gz"))
print("voxels in mask:", int(mask.sum()))
'''


@pytest.fixture
def cloud(request, tmp_path, nifti_files):
    # The commands of these tests run this machine's Python and scripts (the interface's
    # mechanics are tested, not an AMI): agents start directly. The real-Docker test
    # boots its instance from the user-data, as EC2 would.
    boot = "user-data" if request.node.get_closest_marker("docker") else "direct"
    with LocalCloud(boot=boot) as cloud:
        s3 = boto3.client("s3")
        for bucket in ("abcd-data", "my-results"):
            s3.create_bucket(Bucket=bucket)
        s3.upload_file(nifti_files["example4d.nii.gz"], "abcd-data",
                       "sub-01/func/sub-01_bold.nii.gz")
        yield cloud


def _mask_command(tmp_path):
    script = tmp_path / "mask.py"
    script.write_text(MASK_SCRIPT)
    return f"{sys.executable} {script} {{input}} {{output_dir}}"


def _run(**inputs):
    node = EC2ContainerRun(**dict(dict(
        runtime="none", input_s3="s3://abcd-data/sub-01/func/sub-01_bold.nii.gz",
        output_s3="s3://my-results/masks/sub-01/", poll_interval=0.3), **inputs))
    return node


def test_command_runs_next_to_the_data_and_instance_terminates(cloud, tmp_path):
    result = _run(command=_mask_command(tmp_path)).run(cwd=str(tmp_path))
    out = result.outputs
    assert out.exit_code == 0
    assert out.output_uris == ["s3://my-results/masks/sub-01/brain_mask.nii.gz"]
    assert out.instance_id.startswith("i-") and out.runtime_seconds > 0
    assert out.cost_estimate > 0
    s3 = boto3.client("s3")
    dest = tmp_path / "mask.nii.gz"
    s3.download_file("my-results", "masks/sub-01/brain_mask.nii.gz", str(dest))
    import nibabel as nib

    assert nib.load(dest).shape == (128, 96, 24)
    log_bucket, log_key = out.log_uri[len("s3://"):].split("/", 1)
    log = s3.get_object(Bucket=log_bucket, Key=log_key)["Body"].read().decode()
    assert "voxels in mask:" in log
    assert cloud.live_instances() == []


LINKS_SCRIPT = r'''
import os, sys
out = sys.argv[1]
os.makedirs(os.path.join(out, "stats"), exist_ok=True)
with open(os.path.join(out, "stats", "aseg.stats"), "w") as fobj:
    fobj.write("volumes")
os.symlink(os.path.join(out, "stats"), os.path.join(out, "stats_link"))
os.symlink(os.path.join(out, "gone"), os.path.join(out, "broken"))
'''


def test_outputs_with_symbolic_links_are_uploaded_as_files(cloud, tmp_path):
    """A linked folder's files are uploaded under the link (S3 has no links); a broken
    link holds no data: said in the log, not a failure."""
    script = tmp_path / "links.py"
    script.write_text(LINKS_SCRIPT)
    result = _run(command=f"{sys.executable} {script} {{output_dir}}").run(
        cwd=str(tmp_path))
    assert sorted(result.outputs.output_uris) == [
        "s3://my-results/masks/sub-01/stats/aseg.stats",
        "s3://my-results/masks/sub-01/stats_link/aseg.stats"]
    log_bucket, log_key = result.outputs.log_uri[len("s3://"):].split("/", 1)
    log = boto3.client("s3").get_object(Bucket=log_bucket, Key=log_key)["Body"].read()
    assert b"not uploaded: 1 broken symbolic link(s), e.g. broken" in log


def test_existing_instance_is_started_and_stopped_again(cloud, tmp_path):
    ec2 = boto3.client("ec2")
    iid = ec2.run_instances(ImageId="ami-0ed094fb1304fd857", MinCount=1, MaxCount=1,
                            InstanceType="g4dn.xlarge")["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[iid])
    result = _run(command=_mask_command(tmp_path), instance_id=iid).run(cwd=str(tmp_path))
    assert result.outputs.instance_id == iid and result.outputs.exit_code == 0
    state = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "stopped"
    assert cloud.live_instances() == []


def test_failing_command_is_a_node_error_with_the_log_tail(cloud, tmp_path):
    command = f"{sys.executable} -c \"import sys; print('cannot read {{input}}'); sys.exit(3)\""
    with pytest.raises(RemoteNodeError) as err:
        _run(command=command).run(cwd=str(tmp_path))
    text = str(err.value)
    assert "the command failed (exit code 3)" in text and "was terminated" in text
    assert "cannot read" in text and "--- log tail ---" in text
    assert cloud.live_instances() == []
    assert boto3.client("s3").list_objects_v2(Bucket="my-results", Prefix="masks/").get(
        "KeyCount") == 0


def test_timeout_stops_the_command_and_terminates(cloud, tmp_path):
    with pytest.raises(InstanceTimeout) as err:
        _run(command="sleep 30", timeout=2).run(cwd=str(tmp_path))
    assert "ran longer than timeout=2 s" in str(err.value)
    assert cloud.live_instances() == []


def _ssm_parameters():
    ssm = boto3.client("ssm", region_name="us-east-1")
    pages = ssm.get_paginator("describe_parameters").paginate()
    return [p["Name"] for page in pages for p in page.get("Parameters", [])
            if not p["Name"].startswith("/aws/")]  # AWS's own (the AMI ids)


@pytest.mark.parametrize("input_s3, message", [
    ("s3://abcd-data/sub-99/func/sub-99_bold.nii.gz",
     "s3://abcd-data/sub-99/func/sub-99_bold.nii.gz does not exist at .* (while trying to "
     "find it)"),
    ("s3://abcd-data/sub-99/",
     "EC2ContainerRun input_s3 's3://abcd-data/sub-99/' holds no objects: nothing to run "
     "the command on."),
])
def test_missing_input_is_named_before_an_instance_is_paid_for(cloud, tmp_path, input_s3,
                                                               message):
    from nipype_s3 import S3ObjectNotFound

    node = _run(command="cp {input} {output_dir}/")
    node.inputs.input_s3 = input_s3
    pattern = message.replace(".", r"\.").replace(r"\.*", ".*").replace(
        "(", r"\(").replace(")", r"\)")
    with pytest.raises(S3ObjectNotFound, match=pattern):
        node.run(cwd=str(tmp_path))
    assert cloud.proxy.count(action="RunInstances") == 0
    assert _ssm_parameters() == []


def test_missing_output_bucket_is_named_and_leaves_no_key_in_ssm(cloud, tmp_path):
    from nipype_s3 import S3BucketNotFound

    node = _run(command="cp {input} {output_dir}/")
    node.inputs.output_s3 = "s3://no-such-results/masks/"
    with pytest.raises(S3BucketNotFound, match="Bucket 'no-such-results' does not exist"):
        node.run(cwd=str(tmp_path))
    assert cloud.proxy.count(action="RunInstances") == 0
    assert _ssm_parameters() == []  # the job's signing key was stored, and is gone again


def test_outputs_that_cannot_be_uploaded_fail_the_node(cloud, tmp_path):
    """The command succeeds, its outputs cannot be stored: an error, never a success with
    nothing uploaded."""
    node = _run(command="cp {input} {output_dir}/", staging_s3="s3://my-results/staging/")
    node.inputs.output_s3 = "s3://no-such-results/masks/"
    with pytest.raises(RemoteNodeError) as err:
        node.run(cwd=str(tmp_path))
    assert "the job failed while uploading the outputs: " in str(err.value)
    assert "no-such-results" in str(err.value)
    assert cloud.live_instances() == []
    assert _ssm_parameters() == []


@pytest.mark.docker
def test_real_docker_container(docker_images, cloud, tmp_path):
    """The job's command runs in a real container (the instance's docker, this machine's
    engine), its input mounted, its output stored."""
    result = _run(runtime="docker", image=docker_images["base"],
                  command="sh -c 'ls -l {input} > {output_dir}/listing.txt'").run(
        cwd=str(tmp_path))
    assert result.outputs.output_uris == ["s3://my-results/masks/sub-01/listing.txt"]
    listing = boto3.client("s3").get_object(
        Bucket="my-results", Key="masks/sub-01/listing.txt")["Body"].read().decode()
    assert "sub-01_bold.nii.gz" in listing


def _log(uri):
    bucket, key = uri[len("s3://"):].split("/", 1)
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def test_running_instance_stays_running_and_each_subject_starts_afresh(cloud, tmp_path):
    """Two subjects, one after the other, on an instance the user keeps running."""
    s3 = boto3.client("s3")
    s3.put_object(Bucket="abcd-data", Key="sub-02/func/sub-02_bold.nii.gz", Body=b"sub-02")
    ec2 = boto3.client("ec2")
    iid = ec2.run_instances(ImageId="ami-0ed094fb1304fd857", MinCount=1, MaxCount=1,
                            InstanceType="c6i.large")["Instances"][0]["InstanceId"]
    outputs = []
    for subject in ("sub-01", "sub-02"):
        node = _run(command="ls -R .. > {output_dir}/seen.txt; cp {input} {output_dir}/",
                    instance_id=iid)
        node.inputs.input_s3 = f"s3://abcd-data/{subject}/func/{subject}_bold.nii.gz"
        node.inputs.output_s3 = f"s3://my-results/out/{subject}/"
        result = node.run(cwd=str(tmp_path))
        assert result.outputs.instance_id == iid
        outputs.append(sorted(result.outputs.output_uris))
        inst = next(i for i in cloud.instance_list() if i.instance_id == iid and i.proc)
        inst.proc.wait(60)  # the agent of one job exits
        # its folder went with it: input, outputs, log
        assert os.listdir(os.path.join(inst.root, "work", ".onejob")) == []
    assert outputs[1] == ["s3://my-results/out/sub-02/seen.txt",
                          "s3://my-results/out/sub-02/sub-02_bold.nii.gz"]
    seen = s3.get_object(Bucket="my-results", Key="out/sub-02/seen.txt")["Body"].read()
    assert b"sub-01" not in seen
    state = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert state["State"]["Name"] == "running"
    assert cloud.proxy.count(action="StopInstances") == 0
    ssm = boto3.client("ssm", region_name="us-east-1")
    for command in ssm.list_commands()["Commands"]:
        script = "\n".join(command["Parameters"]["commands"])
        assert "shutdown" not in script and "poweroff" not in script
        assert "-m nipype_s3.agent" in script


def test_hostile_input_name_is_only_a_name(cloud, tmp_path):
    name = "sub-01_$(touch PWNED)_`touch PWNED2`_'q'\"dq\".nii.gz"
    boto3.client("s3").put_object(Bucket="abcd-data", Key=f"sub-01/anat/{name}",
                                  Body=b"T1w")
    node = _run(command="cp \"{input}\" '{output_dir}'/ && sh -c 'ls {input}'")
    node.inputs.input_s3 = f"s3://abcd-data/sub-01/anat/{name}"
    result = node.run(cwd=str(tmp_path))
    assert result.outputs.output_uris == [f"s3://my-results/masks/sub-01/{name}"]
    assert list(Path(cloud.directory).rglob("PWNED*")) == []


def test_env_values_stay_out_of_the_log_and_the_error(cloud, tmp_path):
    secret = "FS-LICENCE-8c1f2e77b0c94d21"
    node = _run(command='echo "using licence $FS_LICENSE_KEY"; exit 2',
                env={"FS_LICENSE_KEY": secret})
    with pytest.raises(RemoteNodeError) as err:
        node.run(cwd=str(tmp_path))
    assert "the command failed (exit code 2)" in str(err.value)
    assert "using licence ***" in str(err.value) and secret not in str(err.value)
    log = _log(err.value.log_uri)
    assert "FS_LICENSE_KEY" in log and secret not in log
