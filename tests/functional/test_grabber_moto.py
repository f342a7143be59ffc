"""S3DataGrabber against a moto server: the BIDS-like layout, lists, requester-pays."""

import os

import boto3
import pytest

from nipype_s3 import S3DataGrabber

pytestmark = pytest.mark.moto_server


@pytest.fixture
def bids(moto_server, nifti_files):
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="bids-data")
    for sub in ("sub-01", "sub-02"):
        s3.upload_file(nifti_files["anatomical.nii"], "bids-data",
                       f"study/{sub}/anat/{sub}_T1w.nii")
        s3.upload_file(nifti_files["example4d.nii.gz"], "bids-data",
                       f"study/{sub}/func/{sub}_task-rest_bold.nii.gz")
    s3.upload_file(nifti_files["functional.nii"], "bids-data",
                   "study/sub-01/anat/sub-01_T1w.nii.bak")
    return s3


def test_grab_lists_of_subjects_requester_pays(bids, tmp_path, nifti_files):
    grab = S3DataGrabber(infields=["subject_id"], outfields=["anat", "func"])
    grab.inputs.bucket = "bids-data"
    grab.inputs.bucket_path = "study"
    grab.inputs.template = "*"
    grab.inputs.field_template = {"anat": "%s/anat/%s_T1w.nii",
                                  "func": "%s/func/%s_task-rest_bold.nii.gz"}
    grab.inputs.template_args = {"anat": [["subject_id", "subject_id"]],
                                 "func": [["subject_id", "subject_id"]]}
    grab.inputs.subject_id = ["sub-01", "sub-02"]
    grab.inputs.requester_pays = True
    result = grab.run(cwd=str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in result.outputs.anat] == [
        "sub-01/anat/sub-01_T1w.nii", "sub-02/anat/sub-02_T1w.nii"]
    for path in result.outputs.anat:
        assert open(path, "rb").read() == open(nifti_files["anatomical.nii"], "rb").read()
    import nibabel as nib

    assert nib.load(result.outputs.func[1]).shape == (128, 96, 24, 2)


def test_regex_mode_on_moto(bids, tmp_path):
    grab = S3DataGrabber()
    grab.inputs.bucket = "bids-data"
    grab.inputs.bucket_path = "study/"
    grab.inputs.template_type = "regex"
    grab.inputs.template = r"sub-0[12]/anat/sub-0[12]_T1w\.nii"
    result = grab.run(cwd=str(tmp_path))
    assert sorted(os.path.basename(p) for p in result.outputs.outfiles) == [
        "sub-01_T1w.nii", "sub-02_T1w.nii"]


def test_a_whole_subject_folder_with_double_star(bids, tmp_path):
    """``**`` is any number of folder levels: a subject's every file, or its gzipped
    NIfTIs at any depth."""
    grab = S3DataGrabber(infields=["subject_id"], outfields=["everything", "nifti"])
    grab.inputs.bucket = "bids-data"
    grab.inputs.bucket_path = "study"
    grab.inputs.template = "*"
    grab.inputs.field_template = {"everything": "%s/**", "nifti": "%s/**/*.nii.gz"}
    grab.inputs.template_args = {"everything": [["subject_id"]], "nifti": [["subject_id"]]}
    grab.inputs.subject_id = "sub-01"
    out = grab.run(cwd=str(tmp_path)).outputs
    assert [os.path.relpath(p, tmp_path) for p in out.everything] == [
        "sub-01/anat/sub-01_T1w.nii", "sub-01/anat/sub-01_T1w.nii.bak",
        "sub-01/func/sub-01_task-rest_bold.nii.gz"]
    assert os.path.relpath(out.nifti, tmp_path) == "sub-01/func/sub-01_task-rest_bold.nii.gz"


def test_bucket_given_as_an_s3_uri_is_its_name(bids, tmp_path):
    grab = S3DataGrabber()
    grab.inputs.bucket = "S3://bids-data/"  # any case of the scheme, a trailing slash
    grab.inputs.bucket_path = "study/sub-02/anat/"
    grab.inputs.template = "*.nii"
    result = grab.run(cwd=str(tmp_path))
    assert [os.path.basename(p) for p in [result.outputs.outfiles]] == ["sub-02_T1w.nii"]


def test_local_directory_that_is_a_file_is_named_and_nothing_is_fetched(bids, tmp_path):
    from nipype_s3 import ConfigurationError

    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    grab = S3DataGrabber()
    grab.inputs.bucket = "bids-data"
    grab.inputs.bucket_path = "study/"
    grab.inputs.template = "sub-01/anat/*"
    grab.inputs.local_directory = str(blocker)
    with pytest.raises(ConfigurationError) as err:
        grab.run(cwd=str(tmp_path))
    assert str(err.value) == (
        f"Cannot download into '{blocker}/sub-01/anat': '{blocker}' is a file, not a "
        "folder. Move that file, or download somewhere else (local_directory).")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("key", ["study/sub-01/../../../escaped.nii",
                                 "study/sub-01//anat/double.nii",
                                 "study/sub-01/./anat/dot.nii"])
def test_a_key_that_would_leave_the_folder_is_refused_and_nothing_is_written(
        bids, tmp_path, key):
    """S3 stores keys with '..', '.' and empty segments; a regex template matches them.
    Written as paths they would land outside the grabber's folder: refused, naming the
    key, and no file is written anywhere."""
    from nipype_s3.exceptions import UnsafePath

    bids.put_object(Bucket="bids-data", Key=key, Body=b"attacker's bytes")
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    grab = S3DataGrabber()
    grab.inputs.bucket = "bids-data"
    grab.inputs.bucket_path = "study/"
    grab.inputs.template_type = "regex"
    grab.inputs.template = r"sub-01/.*\.nii"
    with pytest.raises(UnsafePath, match="s3://bids-data/" + key.replace(".", r"\.")):
        grab.run(cwd=str(work))
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert not [p for p in written if p.endswith((".nii", ".nii.gz"))]
