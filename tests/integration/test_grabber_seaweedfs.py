"""S3DataGrabber against SeaweedFS: a BIDS-like tree of real NIfTI files."""

import os

import pytest
from nipype import Node, Workflow
from nipype.interfaces.base.traits_extension import isdefined
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import S3AccessDenied, S3DataGrabber, S3DataSink, S3ObjectNotFound, TransferFailed
from nipype_s3.testing.proxy import RecordingProxy
from tests.conftest import PUBLIC_BUCKET

pytestmark = pytest.mark.seaweedfs

SUBJECTS = ["sub-01", "sub-02", "sub-10"]


def _layout(nifti_files, prefix="ds/"):
    keys = {}
    for sub in SUBJECTS:
        keys[f"{prefix}{sub}/anat/{sub}_T1w.nii"] = nifti_files["anatomical.nii"]
        for run in (1, 2):
            keys[f"{prefix}{sub}/func/{sub}_task-rest_run-{run}_bold.nii.gz"] = \
                nifti_files["example4d.nii.gz"]
    keys[f"{prefix}sub-01/anat/sub-01_T1w.nii.bak"] = nifti_files["functional.nii"]
    keys[f"{prefix}README"] = nifti_files["anatomical.nii"]
    return keys


def _upload(client, bucket, keys):
    for key, src in keys.items():
        client.upload_file(src, bucket, key)


@pytest.fixture
def bids(seaweedfs, weed_bucket, nifti_files):
    keys = _layout(nifti_files)
    _upload(seaweedfs.client(), weed_bucket, keys)
    return weed_bucket, keys


@pytest.fixture
def proxy(seaweedfs, monkeypatch):
    with RecordingProxy(seaweedfs.url) as rec:
        monkeypatch.setenv("AWS_ENDPOINT_URL", rec.url)
        yield rec


def _grabber(bucket, tmp_path, **inputs):
    grab = S3DataGrabber(infields=["subject_id"], outfields=["anat", "func"])
    grab.inputs.bucket = bucket
    grab.inputs.bucket_path = "ds/"
    grab.inputs.local_directory = str(tmp_path / "data")
    grab.inputs.template = "*"
    grab.inputs.field_template = {"anat": "%s/anat/%s_T1w.nii",
                                  "func": "%s/func/%s_task-rest_run-*_bold.nii.gz"}
    grab.inputs.template_args = {"anat": [["subject_id", "subject_id"]],
                                 "func": [["subject_id", "subject_id"]]}
    for name, value in inputs.items():
        setattr(grab.inputs, name, value)
    return grab


def test_one_subject_single_path_and_list(bids, tmp_path, nifti_files):
    bucket, _ = bids
    res = _grabber(bucket, tmp_path, subject_id="sub-01").run(cwd=str(tmp_path))
    anat = res.outputs.anat
    assert anat == str(tmp_path / "data" / "sub-01" / "anat" / "sub-01_T1w.nii")  # not .bak
    assert open(anat, "rb").read() == open(nifti_files["anatomical.nii"], "rb").read()
    assert res.outputs.func == [
        str(tmp_path / "data" / "sub-01" / "func" / f"sub-01_task-rest_run-{r}_bold.nii.gz")
        for r in (1, 2)]
    import nibabel as nib

    assert nib.load(res.outputs.func[0]).shape == (128, 96, 24, 2)


def test_infield_lists_and_human_sort(bids, tmp_path):
    bucket, _ = bids
    res = _grabber(bucket, tmp_path, subject_id=["sub-10", "sub-02"]).run(cwd=str(tmp_path))
    assert [os.path.basename(p) for p in res.outputs.anat] == ["sub-10_T1w.nii",
                                                               "sub-02_T1w.nii"]
    assert len(res.outputs.func) == 2 and len(res.outputs.func[0]) == 2


def test_lists_only_the_literal_prefixes(bids, tmp_path, proxy):
    bucket, _ = bids
    _grabber(bucket, tmp_path, subject_id=["sub-01", "sub-02"]).run(cwd=str(tmp_path))
    lists = [r for r in proxy.requests if "list-type=2" in r.query]
    prefixes = sorted(q.split("prefix=")[1].split("&")[0].replace("%2F", "/")
                      for q in (r.query for r in lists))
    assert prefixes == ["ds/sub-01/anat/sub-01_T1w.nii", "ds/sub-01/func/sub-01_task-rest_run-",
                        "ds/sub-02/anat/sub-02_T1w.nii", "ds/sub-02/func/sub-02_task-rest_run-"]
    assert proxy.count("HEAD") == 0
    assert proxy.count("GET") - len(lists) == 6  # one GET per file, no HEAD


def test_rerun_downloads_nothing(bids, tmp_path, proxy):
    bucket, _ = bids
    grab = _grabber(bucket, tmp_path, subject_id="sub-02")
    grab.run(cwd=str(tmp_path))
    proxy.clear()
    res = grab.run(cwd=str(tmp_path))
    assert proxy.count("GET") == proxy.count("GET", query_has="list-type=2") == 2
    assert proxy.count() == 2
    assert os.path.exists(res.outputs.anat)
    # a changed local file is fetched again; an untouched one is not
    with open(res.outputs.anat, "ab") as fobj:
        fobj.write(b"x")
    proxy.clear()
    grab.run(cwd=str(tmp_path))
    assert proxy.count("GET") - proxy.count("GET", query_has="list-type=2") == 1


def test_regex_mode(bids, tmp_path):
    bucket, _ = bids
    grab = _grabber(bucket, tmp_path, subject_id="sub-01", template_type="regex")
    grab.inputs.field_template = {"anat": r"%s/anat/%s_T1w\.nii.*",
                                  "func": r"%s/func/%s_task-rest_run-\d_bold\.nii\.gz"}
    res = grab.run(cwd=str(tmp_path))
    assert sorted(os.path.basename(p) for p in res.outputs.anat) == [
        "sub-01_T1w.nii", "sub-01_T1w.nii.bak"]
    assert len(res.outputs.func) == 2


def test_empty_bucket_path(seaweedfs, weed_bucket, nifti_files, tmp_path):
    _upload(seaweedfs.client(), weed_bucket, _layout(nifti_files, prefix=""))
    grab = _grabber(weed_bucket, tmp_path, subject_id="sub-02", bucket_path="")
    res = grab.run(cwd=str(tmp_path))
    assert res.outputs.anat == str(tmp_path / "data" / "sub-02" / "anat" / "sub-02_T1w.nii")


def test_no_arguments_template(bids, tmp_path):
    bucket, _ = bids
    grab = S3DataGrabber()
    grab.inputs.bucket = bucket
    grab.inputs.bucket_path = "ds"
    grab.inputs.template = "sub-*/anat/*_T1w.nii"
    res = grab.run(cwd=str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in res.outputs.outfiles] == [
        f"{s}/anat/{s}_T1w.nii" for s in SUBJECTS]


def test_raise_on_empty_names_field_template_and_prefix(bids, tmp_path):
    bucket, _ = bids
    with pytest.raises(S3ObjectNotFound) as err:
        _grabber(bucket, tmp_path, subject_id="sub-99").run(cwd=str(tmp_path))
    assert str(err.value) == (
        f"S3DataGrabber output 'anat': template 'sub-99/anat/sub-99_T1w.nii' (glob) matched no "
        f"key below s3://{bucket}/ds/ (listed s3://{bucket}/ds/sub-99/anat/sub-99_T1w.nii, "
        f"s3://{bucket}/ds/sub-99/func/sub-99_task-rest_run-). Check the template, "
        "template_args and bucket_path, or set raise_on_empty=False.")
    assert isinstance(err.value, FileNotFoundError)


def test_no_raise_leaves_only_the_empty_field_undefined(bids, tmp_path):
    bucket, _ = bids
    grab = _grabber(bucket, tmp_path, subject_id="sub-01", raise_on_empty=False)
    grab.inputs.field_template = {"anat": "%s/anat/%s_T2w.nii",
                                  "func": "%s/func/%s_task-rest_run-1_bold.nii.gz"}
    res = grab.run(cwd=str(tmp_path))
    assert not isdefined(res.outputs.anat)
    assert res.outputs.func.endswith("sub-01_task-rest_run-1_bold.nii.gz")


def test_anonymous_public_bucket_and_private_refusal(seaweedfs, weed_bucket, nifti_files,
                                                     tmp_path, monkeypatch):
    client = seaweedfs.client()
    try:
        client.create_bucket(Bucket=PUBLIC_BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    _upload(client, PUBLIC_BUCKET, _layout(nifti_files))
    _upload(client, weed_bucket, _layout(nifti_files))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    res = _grabber(PUBLIC_BUCKET, tmp_path, subject_id="sub-01", anon=True).run(
        cwd=str(tmp_path))
    assert os.path.getsize(res.outputs.anat) == os.path.getsize(nifti_files["anatomical.nii"])
    with pytest.raises(S3AccessDenied) as err:
        _grabber(weed_bucket, tmp_path, subject_id="sub-01", anon=True).run(cwd=str(tmp_path))
    assert str(err.value).startswith(f"Anonymous access to s3://{weed_bucket}/ds/sub-01/")
    assert "the bucket is not public. Drop anon=True" in str(err.value)


def test_interrupted_download_leaves_no_file(bids, tmp_path, seaweedfs, monkeypatch):
    bucket, _ = bids
    monkeypatch.setenv("NIPYPE_S3_MAX_ATTEMPTS", "2")
    # every GET of object data is cut off without an answer; LISTs pass
    def object_gets(method, path, query):
        return method == "GET" and "list-type" not in query

    with RecordingProxy(seaweedfs.url, fault_rate=1.0, faults=("drop",),
                        fault_filter=object_gets) as rec:
        monkeypatch.setenv("AWS_ENDPOINT_URL", rec.url)
        with pytest.raises(TransferFailed) as err:
            _grabber(bucket, tmp_path, subject_id="sub-01").run(cwd=str(tmp_path))
    assert "3 of 3 objects failed to download" in str(err.value)
    data = tmp_path / "data"
    assert [p for p in data.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("plugin", ["Linear", "MultiProc"])
def test_grabber_to_sink_workflow(bids, tmp_path, seaweedfs, plugin):
    bucket, _ = bids
    info = Node(IdentityInterface(fields=["subject_id"]), "info")
    info.iterables = ("subject_id", SUBJECTS)
    grab = Node(_grabber(bucket, tmp_path), "grab")
    grab.inputs.local_directory = str(tmp_path / "cache")
    sink = Node(S3DataSink(base_directory=f"s3://{bucket}/derivatives"), "sink")
    wf = Workflow("roundtrip", base_dir=str(tmp_path / "work"))
    wf.config["execution"]["poll_sleep_duration"] = 0.2
    wf.connect(info, "subject_id", grab, "subject_id")
    wf.connect(info, "subject_id", sink, "container")
    wf.connect(grab, "anat", sink, "anat")
    wf.connect(grab, "func", sink, "func")
    wf.run(plugin=plugin, plugin_args={"n_procs": 2} if plugin == "MultiProc" else {})
    pages = seaweedfs.client().get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="derivatives/")
    keys = sorted(o["Key"] for p in pages for o in p.get("Contents", []))
    assert keys == sorted(
        [f"derivatives/{s}/anat/{s}_T1w.nii" for s in SUBJECTS]
        + [f"derivatives/{s}/func/{s}_task-rest_run-{r}_bold.nii.gz"
           for s in SUBJECTS for r in (1, 2)])
