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


def _stats(subject_id):
    import os

    out = os.path.abspath("stats.txt")
    with open(out, "w") as fobj:
        fobj.write(f"stats of {subject_id}\n")
    return out


def _iterated_sink_workflow(tmp_path, **sink_inputs):
    info = Node(IdentityInterface(fields=["subject_id"]), "info")
    info.iterables = ("subject_id", ["sub-01", "sub-02"])
    stats = Node(Function(input_names=["subject_id"], output_names=["out"], function=_stats),
                 "stats")
    sink = Node(S3DataSink(base_directory="s3://out-bucket/sd", sync_delete=True,
                           **sink_inputs), "sink")
    wf = Workflow("iter", base_dir=str(tmp_path / "work"))
    wf.connect(info, "subject_id", stats, "subject_id")
    wf.connect(stats, "out", sink, "results.@stats")
    return wf


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_sync_delete_in_iterations_keeps_the_siblings_results(moto_server, tmp_path, plugin):
    """Each subject's sink deleted what the other wrote (only the last survived)."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="out-bucket")
    stale = "sd/results/_subject_id_sub-01/old-stats.txt"
    s3.put_object(Bucket="out-bucket", Key=stale, Body=b"from an earlier run")
    s3.put_object(Bucket="out-bucket", Key="sd/elsewhere/keep.txt", Body=b"not ours")
    _iterated_sink_workflow(tmp_path).run(plugin=plugin)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="out-bucket")["Contents"])
    assert keys == ["sd/elsewhere/keep.txt", "sd/results/_subject_id_sub-01/stats.txt",
                    "sd/results/_subject_id_sub-02/stats.txt"]
    body = s3.get_object(Bucket="out-bucket", Key="sd/results/_subject_id_sub-02/stats.txt")
    assert body["Body"].read() == b"stats of sub-02\n"


def test_sync_delete_where_iterations_share_a_folder_is_refused(moto_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="out-bucket")
    wf = _iterated_sink_workflow(tmp_path, parameterization=False)
    wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
    with pytest.raises(RuntimeError):
        wf.run(plugin="Linear")
    from nipype.utils.filemanip import loadcrash

    crashes = list((tmp_path / "crashes").glob("crash-*sink*.pklz"))
    assert len(crashes) == 2
    text = "".join(loadcrash(str(crashes[0]))["traceback"])
    assert "each iteration would delete the files the others wrote" in text
    assert "Contents" not in s3.list_objects_v2(Bucket="out-bucket")


@pytest.mark.parametrize("base", ["s3://out-bucket/clash", "LOCAL"])
def test_two_files_to_one_destination_are_refused_in_both_modes(moto_server, tmp_path,
                                                               nifti_files, base):
    """MapNode outputs with parameterization=False: DataSink keeps the last file
    silently; the s3:// sink raised; the local one now agrees."""
    boto3.client("s3").create_bucket(Bucket="out-bucket")
    if base == "LOCAL":
        base = str(tmp_path / "derivatives")
    twins = []
    for i in range(2):
        (tmp_path / f"run{i}").mkdir()
        twins.append(str(tmp_path / f"run{i}" / "bold.nii.gz"))
        shutil.copy(nifti_files["example4d.nii.gz"], twins[-1])
    source = Node(IdentityInterface(fields=["bold"]), "source")
    source.inputs.bold = twins
    mean = MapNode(Function(input_names=["in_file"], output_names=["out_file"],
                            function=_mean_image), iterfield=["in_file"], name="mean")
    sink = Node(S3DataSink(base_directory=base, parameterization=False), "sink")
    wf = Workflow("clash", base_dir=str(tmp_path / "work"))
    wf.connect(source, "bold", mean, "in_file")
    wf.connect(mean, "out_file", sink, "func.@mean")
    with pytest.raises(RuntimeError, match="would write two files to the same"):
        wf.run(plugin="Linear")
