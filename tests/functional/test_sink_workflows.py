"""S3DataSink in real nipype workflows (Linear, MultiProc) against a moto server."""

import shutil

import boto3
import pytest
from nipype import Function, MapNode, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import S3DataSink

pytestmark = pytest.mark.moto_server


def _mean_image(in_file):
    """A real processing step: the mean over time of a 4D NIfTI."""
    import os

    import nibabel as nib
    import numpy as np

    img = nib.load(in_file)
    data = np.asanyarray(img.dataobj, dtype="float32")
    mean = data.mean(axis=3) if data.ndim == 4 else data
    out = os.path.abspath("mean_" + os.path.basename(in_file))
    nib.save(nib.Nifti1Image(mean, img.affine), out)
    return out


def _workflow(tmp_path, nifti_files, sink):
    subjects = IdentityInterface(fields=["subject_id"])
    info = Node(subjects, "info")
    info.iterables = ("subject_id", ["sub001", "sub002"])
    source = Node(IdentityInterface(fields=["bold"]), "source")
    bold = tmp_path / "bold.nii.gz"
    shutil.copy(nifti_files["example4d.nii.gz"], bold)
    source.inputs.bold = [str(bold), nifti_files["functional.nii"]]
    mean = MapNode(Function(input_names=["in_file"], output_names=["out_file"],
                            function=_mean_image), iterfield=["in_file"], name="mean")
    sinknode = Node(sink, "sink")
    wf = Workflow("s3sink", base_dir=str(tmp_path / "work"))
    wf.config["execution"]["poll_sleep_duration"] = 0.2
    wf.connect(info, "subject_id", sinknode, "container")
    wf.connect(source, "bold", mean, "in_file")
    wf.connect(mean, "out_file", sinknode, "func.@mean")
    return wf


def _keys(bucket):
    return sorted(o.key for o in bucket.objects.all())


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_bucket_override_in_workflows(moto_server, tmp_path, nifti_files, plugin, monkeypatch):
    # The user's bucket object carries its own keys and endpoint; the environment has none.
    resource = boto3.resource("s3", endpoint_url=moto_server.url, region_name="us-east-1",
                              aws_access_key_id="bucket-obj-key",
                              aws_secret_access_key="bucket-obj-secret")
    resource.create_bucket(Bucket="override")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = resource.Bucket("override")
    sink = S3DataSink(base_directory="s3://mybucket/derivatives", bucket=bucket)
    wf = _workflow(tmp_path, nifti_files, sink)
    args = {"n_procs": 2} if plugin == "MultiProc" else {}
    wf.run(plugin=plugin, plugin_args=args)
    assert _keys(bucket) == [  # MapNode subnodes keep their _mean<N> folder, as in DataSink
        f"derivatives/{sub}/func/{name}" for sub in ("sub001", "sub002")
        for name in ("_mean0/mean_bold.nii.gz", "_mean1/mean_functional.nii")]


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_endpoint_from_environment_in_workflows(moto_server, tmp_path, nifti_files, plugin):
    s3 = boto3.resource("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="mybucket")
    wf = _workflow(tmp_path, nifti_files, S3DataSink(base_directory="s3://mybucket/d"))
    wf.run(plugin=plugin, plugin_args={"n_procs": 2} if plugin == "MultiProc" else {})
    keys = _keys(s3.Bucket("mybucket"))
    assert len(keys) == 4 and all(k.startswith("d/sub00") for k in keys)
    # the uploaded mean image is a real 3D NIfTI
    import nibabel as nib

    path = tmp_path / "check.nii.gz"
    path.write_bytes(s3.Object("mybucket", "d/sub001/func/_mean0/mean_bold.nii.gz")
                     .get()["Body"].read())
    img = nib.load(path)
    assert img.shape == (128, 96, 24)


def test_endpoint_url_input_beats_environment(moto_server, tmp_path, nifti_files, monkeypatch):
    s3 = boto3.resource("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="mybucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    sink = S3DataSink(base_directory="s3://mybucket/e", endpoint_url=moto_server.url)
    sink.inputs.anat = nifti_files["anatomical.nii"]
    sink.run(cwd=str(tmp_path))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.url)
    assert _keys(s3.Bucket("mybucket")) == ["e/anat/anatomical.nii"]
