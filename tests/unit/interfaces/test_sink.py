"""S3DataSink on in-process moto: the seed example, errors, the bucket override, secrets."""

import os
import pickle
from copy import deepcopy

import boto3
import pytest
from nipype import Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import ConfigurationError, InputFileNotFound, S3DataSink
from nipype_s3.s3.bucketref import BucketRef


@pytest.fixture
def realigned(tmp_path, nifti_files):
    import shutil

    path = tmp_path / "realigner" / "realigned_file1.nii.gz"
    path.parent.mkdir()
    shutil.copy(nifti_files["example4d.nii.gz"], path)
    return str(path)


def _keys(client, bucket):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_seed_example_in_a_workflow(s3_inprocess, realigned, tmp_path):
    s3_inprocess.create_bucket(Bucket="mybucket")
    inputnode = Node(IdentityInterface(fields=["subject_id", "realigned_files"]), "inputnode")
    inputnode.inputs.subject_id = "sub001"
    inputnode.inputs.realigned_files = [realigned]
    sink = Node(S3DataSink(base_directory="s3://mybucket/path/to/output/dir"), "sink")
    wf = Workflow("seed", base_dir=str(tmp_path / "work"))
    wf.connect(inputnode, "subject_id", sink, "container")
    wf.connect(inputnode, "realigned_files", sink, "motion")
    wf.run(plugin="Linear")
    assert _keys(s3_inprocess, "mybucket") == [
        "path/to/output/dir/sub001/motion/realigned_file1.nii.gz"]
    body = s3_inprocess.get_object(
        Bucket="mybucket", Key="path/to/output/dir/sub001/motion/realigned_file1.nii.gz")
    assert body["Body"].read() == open(realigned, "rb").read()


def test_out_file_lists_uris_and_local_copies(s3_inprocess, realigned, tmp_path):
    s3_inprocess.create_bucket(Bucket="mybucket")
    sink = S3DataSink(base_directory="s3://mybucket/out", container="sub001",
                      local_copy=str(tmp_path / "mirror"))
    sink.inputs.motion = [realigned]
    result = sink.run(cwd=str(tmp_path))
    local = str(tmp_path / "mirror" / "sub001" / "motion" / "realigned_file1.nii.gz")
    assert result.outputs.out_file == [
        "s3://mybucket/out/sub001/motion/realigned_file1.nii.gz", local]
    assert open(local, "rb").read() == open(realigned, "rb").read()


def test_local_copy_blocked_by_a_file_is_named_before_anything_is_uploaded(
        s3_inprocess, realigned, tmp_path):
    s3_inprocess.create_bucket(Bucket="mybucket")
    blocker = tmp_path / "mirror"
    blocker.write_text("a file where the copies should go")
    sink = S3DataSink(base_directory="s3://mybucket/out", local_copy=str(blocker / "sub"))
    sink.inputs.motion = [realigned]
    with pytest.raises(ConfigurationError) as err:
        sink.run(cwd=str(tmp_path))
    assert str(err.value) == (
        f"Cannot copy files into {str(blocker / 'sub')!r}: {str(blocker)!r} is a file, not a "
        "folder. Move that file, or set local_copy to another folder.")
    assert _keys(s3_inprocess, "mybucket") == []
    assert blocker.read_text() == "a file where the copies should go"


def test_a_local_copy_that_fails_leaves_no_partial_file(s3_inprocess, realigned, tmp_path,
                                                        monkeypatch):
    import errno
    import shutil

    s3_inprocess.create_bucket(Bucket="mybucket")
    mirror = tmp_path / "mirror"
    old = mirror / "motion" / "realigned_file1.nii.gz"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"the copy of an earlier run")
    real_copy = shutil.copyfileobj

    def disk_full(fsrc, fdst, length=0):
        fdst.write(fsrc.read(100))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full)
    monkeypatch.setattr(shutil, "_fastcopy_sendfile", lambda *a: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")), raising=False)
    sink = S3DataSink(base_directory="s3://mybucket/out", local_copy=str(mirror))
    sink.inputs.motion = [realigned]
    with pytest.raises(OSError, match="No space left"):
        sink.run(cwd=str(tmp_path))
    monkeypatch.setattr(shutil, "copyfileobj", real_copy)
    assert old.read_bytes() == b"the copy of an earlier run"  # untouched, not half-written
    assert sorted(p.name for p in old.parent.iterdir()) == ["realigned_file1.nii.gz"]


def test_missing_input_file_uploads_nothing(s3_inprocess, tmp_path, realigned):
    s3_inprocess.create_bucket(Bucket="mybucket")
    sink = S3DataSink(base_directory="s3://mybucket/out")
    sink.inputs.motion = [realigned, str(tmp_path / "gone.nii.gz")]
    with pytest.raises(InputFileNotFound) as err:
        sink.run(cwd=str(tmp_path))
    assert str(err.value) == (
        f"S3DataSink input 'motion' names {str(tmp_path / 'gone.nii.gz')!r}, which does not "
        "exist. Check what is connected to that input (nipype's DataSink would skip it "
        "silently; S3DataSink refuses so nothing is lost unseen).")
    assert _keys(s3_inprocess, "mybucket") == []


def test_missing_input_file_local_base_directory(tmp_path):
    sink = S3DataSink(base_directory=str(tmp_path / "out"))
    sink.inputs.anat = str(tmp_path / "gone.nii")
    with pytest.raises(InputFileNotFound, match="'anat' names"):
        sink.run(cwd=str(tmp_path))


def test_local_base_directory_works_like_datasink(tmp_path, realigned):
    sink = S3DataSink(base_directory=str(tmp_path / "out"), container="sub001")
    sink.inputs.motion = [realigned]
    result = sink.run(cwd=str(tmp_path))
    dest = tmp_path / "out" / "sub001" / "motion" / "realigned_file1.nii.gz"
    assert dest.read_bytes() == open(realigned, "rb").read()
    assert result.outputs.out_file == [str(dest)]


def test_a_substitution_leaving_an_empty_folder_name_gives_the_local_path(
        s3_inprocess, tmp_path):
    """Removing a MapNode's ``_reorient0`` folder leaves ``sub-01//mean.nii``: on disk
    DataSink's file is ``sub-01/mean.nii``, and so is the key (a ``//`` key is a folder
    with no name, which S3 browsers, ``aws s3 sync`` and ``sub-01/*`` templates miss)."""
    from nipype.interfaces.io import DataSink

    s3_inprocess.create_bucket(Bucket="mybucket")
    source = tmp_path / "reorient" / "mapflow" / "_reorient0" / "mean.nii"
    source.parent.mkdir(parents=True)
    source.write_text("mean")
    options = dict(container="sub-01", regexp_substitutions=[(r"_reorient\d+", "")],
                   substitutions=[("/reoriented", "/reoriented/")])
    ours = S3DataSink(base_directory="s3://mybucket/out", **options)
    local = DataSink(base_directory=str(tmp_path / "local"), **options)
    for sink in (ours, local):
        sink.inputs.reoriented = [str(source)]
        sink.run(cwd=str(tmp_path))
    on_disk = [os.path.relpath(os.path.join(d, f), tmp_path / "local")
               for d, _, names in os.walk(tmp_path / "local") for f in names]
    assert on_disk == ["sub-01/reoriented/mean.nii"]
    assert _keys(s3_inprocess, "mybucket") == ["out/sub-01/reoriented/mean.nii"]


def test_nonexistent_bucket_is_an_error_not_a_local_fallback(s3_inprocess, realigned, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sink = S3DataSink(base_directory="s3://no-such-bucket-here/out")
    sink.inputs.motion = [realigned]
    with pytest.raises(FileNotFoundError, match="Bucket 'no-such-bucket-here' does not exist"):
        sink.run(cwd=str(tmp_path))
    assert not (tmp_path / "home").exists()


def test_bucket_override_replaces_the_name(s3_inprocess, realigned, tmp_path, caplog):
    s3_inprocess.create_bucket(Bucket="real-bucket")
    bucket = boto3.resource("s3", region_name="us-east-1").Bucket("real-bucket")
    sink = S3DataSink(base_directory="s3://mybucket/out", bucket=bucket)
    sink.inputs.motion = [realigned]
    result = sink.run(cwd=str(tmp_path))
    assert _keys(s3_inprocess, "real-bucket") == ["out/motion/realigned_file1.nii.gz"]
    assert result.outputs.out_file == ["s3://real-bucket/out/motion/realigned_file1.nii.gz"]
    assert "overrides bucket 'mybucket'" in caplog.text


def test_bucket_trait_is_copyable_and_picklable_without_the_live_object():
    client = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                          aws_access_key_id="fake-id-xyz", aws_secret_access_key="fake-sec-xyz")
    bucket = boto3.resource("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
                            aws_access_key_id="fake-id-xyz",
                            aws_secret_access_key="fake-sec-xyz").Bucket("mybucket")
    del client
    sink = S3DataSink(base_directory="s3://mybucket/x", bucket=bucket)
    ref = sink.inputs.bucket
    assert isinstance(ref, BucketRef) and ref.live is bucket
    assert deepcopy(sink).inputs.bucket.live is bucket
    blob = pickle.dumps(sink)
    assert b"fake-sec-xyz" not in blob and b"fake-id-xyz" not in blob
    again = pickle.loads(blob).inputs.bucket
    assert again == ref and again.endpoint_url == "http://127.0.0.1:9"
    assert repr(ref) == "BucketRef('mybucket', endpoint_url='http://127.0.0.1:9', " \
                        "region='us-east-1')"


def test_bucket_override_needs_an_s3_base_directory(tmp_path, realigned):
    sink = S3DataSink(base_directory=str(tmp_path), bucket="mybucket")
    sink.inputs.motion = [realigned]
    with pytest.raises(ConfigurationError, match="not an s3:// URI"):
        sink.run(cwd=str(tmp_path))


def test_bad_bucket_value_is_refused():
    with pytest.raises(Exception, match="boto3 Bucket"):
        S3DataSink(bucket=42)


def test_sync_delete_without_scope_is_refused(s3_inprocess, realigned, tmp_path):
    s3_inprocess.create_bucket(Bucket="mybucket")
    sink = S3DataSink(base_directory="s3://mybucket", sync_delete=True)
    sink.inputs.motion = [realigned]
    with pytest.raises(ConfigurationError, match="would delete every other key"):
        sink.run(cwd=str(tmp_path))


def test_secrets_never_recorded(s3_inprocess, realigned, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "fake-token-must-not-leak")
    s3_inprocess.create_bucket(Bucket="mybucket")
    node = Node(S3DataSink(base_directory="s3://mybucket/out"), "sink",
                base_dir=str(tmp_path / "work"))
    node.inputs.motion = [realigned]
    result = node.run()
    assert result.runtime.environ["AWS_SECRET_ACCESS_KEY"] == "<redacted by nipype_s3>"
    secrets = [os.environ[n].encode() for n in
               ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    import gzip

    for dirpath, _, files in os.walk(tmp_path / "work"):
        for name in files:
            data = open(os.path.join(dirpath, name), "rb").read()
            if name.endswith(".pklz"):
                data = gzip.decompress(data)
            for secret in secrets:
                assert secret not in data, f"{secret!r} found in {name}"


def test_a_folder_with_symbolic_links_is_stored_as_datasink_copies_it(
        s3_inprocess, tmp_path, caplog):
    """Linked files and folders are followed (``os.walk`` alone leaves linked folders
    out: their files would be lost without a word); a broken link is named in a warning."""
    import logging

    s3_inprocess.create_bucket(Bucket="mybucket")
    folder = tmp_path / "fs_subject"
    (folder / "surf").mkdir(parents=True)
    (folder / "surf" / "lh.white").write_bytes(b"surface")
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    (atlas / "labels.txt").write_text("labels")
    os.symlink(atlas, folder / "atlas")
    os.symlink(folder / "surf" / "lh.white", folder / "lh.white.link")
    os.symlink(folder, folder / "surf" / "loop")
    os.symlink(tmp_path / "gone", folder / "broken")
    sink = S3DataSink(base_directory="s3://mybucket/out", container="sub001")
    sink.inputs.anat = [str(folder)]
    with caplog.at_level(logging.WARNING, logger="nipype_s3"):
        sink.run(cwd=str(tmp_path))
    assert _keys(s3_inprocess, "mybucket") == [
        "out/sub001/anat/fs_subject/atlas/labels.txt",
        "out/sub001/anat/fs_subject/lh.white.link",
        "out/sub001/anat/fs_subject/surf/lh.white"]
    assert "broken symbolic link" in caplog.text and str(folder / "broken") in caplog.text
