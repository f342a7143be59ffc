"""S3DataGrabber: fetch a BIDS-like layout by glob template (runnable on LocalCloud)."""

import os
import tempfile

import boto3
import nibabel

from nipype_s3 import S3DataGrabber
from nipype_s3.testing import LocalCloud

data = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
work = tempfile.mkdtemp()

with LocalCloud():
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="openneuro-like")
    for run in (1, 2):
        s3.upload_file(os.path.join(data, "example4d.nii.gz"), "openneuro-like",
                       f"ds000101/sub-01/func/sub-01_task-simon_run-{run}_bold.nii.gz")
    s3.upload_file(os.path.join(data, "anatomical.nii"), "openneuro-like",
                   "ds000101/sub-01/anat/sub-01_T1w.nii")

    grab = S3DataGrabber(infields=["subject_id"], outfields=["func", "anat"])
    grab.inputs.bucket = "openneuro-like"
    grab.inputs.bucket_path = "ds000101/"
    grab.inputs.template = "*"
    grab.inputs.field_template = {"anat": "%s/anat/%s_T1w.nii",
                                  "func": "%s/func/%s_task-simon_run-*_bold.nii.gz"}
    grab.inputs.template_args = {"anat": [["subject_id", "subject_id"]],
                                 "func": [["subject_id", "subject_id"]]}
    grab.inputs.subject_id = "sub-01"
    grab.inputs.local_directory = work
    result = grab.run(cwd=work)
    print(result.outputs.anat)
    print(result.outputs.func)
    assert result.outputs.anat.endswith("sub-01/anat/sub-01_T1w.nii")
    assert len(result.outputs.func) == 2
