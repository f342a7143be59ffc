"""S3DataSink in a workflow: the seed example, runnable on LocalCloud (no AWS account)."""

import os
import shutil
import tempfile

import boto3
import nibabel
from nipype import Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import S3DataSink
from nipype_s3.testing import LocalCloud

work = tempfile.mkdtemp()
realigned = os.path.join(work, "realigned_file1.nii.gz")
shutil.copy(os.path.join(os.path.dirname(nibabel.__file__), "tests", "data",
                         "example4d.nii.gz"), realigned)

with LocalCloud():
    boto3.client("s3").create_bucket(Bucket="mybucket")

    inputnode = Node(IdentityInterface(fields=["subject_id", "realigned_files"]), "inputnode")
    inputnode.inputs.subject_id = "sub001"
    inputnode.inputs.realigned_files = [realigned]
    sink = Node(S3DataSink(base_directory="s3://mybucket/path/to/output/dir"), name="sink")

    workflow = Workflow("seed", base_dir=work)
    workflow.connect(inputnode, "subject_id", sink, "container")
    workflow.connect(inputnode, "realigned_files", sink, "motion")
    workflow.run()

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="mybucket")["Contents"]]
    print(keys)
    assert keys == ["path/to/output/dir/sub001/motion/realigned_file1.nii.gz"]
shutil.rmtree(work)
