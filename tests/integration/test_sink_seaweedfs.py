"""S3DataSink against SeaweedFS, a real S3 server: bytes, requests, encryption, layout."""

import os
import shutil

import pytest
from nipype.interfaces.io import DataSink

from nipype_s3 import S3AccessDenied, S3BucketNotFound, S3DataSink
from nipype_s3.config import MiB
from nipype_s3.testing.proxy import RecordingProxy

pytestmark = pytest.mark.seaweedfs


@pytest.fixture
def proxy(seaweedfs, monkeypatch):
    """Every request of the test goes through a recording proxy to SeaweedFS."""
    with RecordingProxy(seaweedfs.url) as rec:
        monkeypatch.setenv("AWS_ENDPOINT_URL", rec.url)
        yield rec


@pytest.fixture
def outputs(tmp_path, nifti_files):
    """A derivatives-like tree of real NIfTI files, with iterable folders and a folder."""
    work = tmp_path / "work"
    files = {}
    for sub in ("sub001", "sub002"):
        for name in ("example4d.nii.gz", "anatomical.nii"):
            dest = work / f"_subject_id_{sub}" / "realign" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(nifti_files[name], dest)
            files.setdefault("motion", []).append(str(dest))
    report = work / "_subject_id_sub001" / "report"
    (report / "figs").mkdir(parents=True)
    (report / "index.html").write_text("<html>ok</html>")
    (report / "figs" / "carpet.svg").write_text("<svg/>")
    files["qc.@report"] = [str(report)]
    files["anat"] = nifti_files["functional.nii"]
    return files


def _keys(client, bucket, prefix=""):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _sink(outputs, **inputs):
    sink = S3DataSink(**inputs)
    for name, value in outputs.items():
        setattr(sink.inputs, name, value)
    return sink


def test_keys_equal_nipype_datasink_on_the_same_server(seaweedfs, weed_bucket, outputs,
                                                       tmp_path):
    """Differential: nipype's own DataSink writes to the same server; layouts are equal."""
    options = dict(container="derivatives",
                   substitutions=[("_subject_id_", "sub-")],
                   regexp_substitutions=[(r"sub-(sub\d+)", r"\1")])
    ours = _sink(outputs, base_directory=f"s3://{weed_bucket}/ours", **options)
    ours.run(cwd=str(tmp_path))
    theirs = DataSink(base_directory=f"s3://{weed_bucket}/theirs", **options)
    for name, value in outputs.items():
        setattr(theirs.inputs, name, value)
    theirs.run(cwd=str(tmp_path))
    local = DataSink(base_directory=str(tmp_path / "local"), **options)
    for name, value in outputs.items():
        setattr(local.inputs, name, value)
    local.run(cwd=str(tmp_path))

    client = seaweedfs.client()
    ours_keys = [k[len("ours/"):] for k in _keys(client, weed_bucket, "ours/")]
    theirs_keys = [k[len("theirs/"):] for k in _keys(client, weed_bucket, "theirs/")]
    local_paths = sorted(
        os.path.relpath(os.path.join(d, f), tmp_path / "local").replace(os.sep, "/")
        for d, _, fs in os.walk(tmp_path / "local") for f in fs)
    assert ours_keys == theirs_keys == local_paths
    assert "derivatives/motion/sub001/realign/example4d.nii.gz" not in ours_keys
    assert "derivatives/motion/sub-sub001/example4d.nii.gz" not in ours_keys
    assert "derivatives/motion/sub001/example4d.nii.gz" in ours_keys
    assert "derivatives/qc/sub001/report/figs/carpet.svg" in ours_keys


def test_round_trip_bytes_and_second_run_sends_nothing(seaweedfs, weed_bucket, outputs,
                                                       proxy, tmp_path):
    sink = _sink(outputs, base_directory=f"s3://{weed_bucket}/deriv", container="sub001")
    sink.run(cwd=str(tmp_path))
    puts = proxy.count("PUT")
    keys = _keys(seaweedfs.client(), weed_bucket)
    assert puts == len(keys) == 7
    assert proxy.count("HEAD") == 0
    client = seaweedfs.client()
    for key in keys:
        if key.endswith("example4d.nii.gz") and "sub002" in key:
            data = client.get_object(Bucket=weed_bucket, Key=key)["Body"].read()
            assert data == open(outputs["motion"][2], "rb").read()

    proxy.clear()
    sink.run(cwd=str(tmp_path))
    assert proxy.count("PUT") == 0 and proxy.count("HEAD") == 0
    assert proxy.count("GET", query_has="list-type=2") == 1
    assert proxy.count() == 1


def test_large_multipart_file_is_not_sent_twice(seaweedfs, weed_bucket, proxy, tmp_path):
    big = tmp_path / "_subject_id_sub001" / "big.nii.gz"
    big.parent.mkdir()
    big.write_bytes(os.urandom(40 * MiB + 3))
    sink = _sink({"bold": str(big)}, base_directory=f"s3://{weed_bucket}/d")
    sink.run(cwd=str(tmp_path))
    assert proxy.count("PUT", query_has="partNumber") == 3  # 16 MiB parts
    head = seaweedfs.client().head_object(Bucket=weed_bucket,
                                          Key="d/bold/_subject_id_sub001/big.nii.gz")
    assert head["ContentLength"] == 40 * MiB + 3 and head["ETag"].endswith('-3"')
    proxy.clear()
    sink.run(cwd=str(tmp_path))
    assert proxy.count("PUT") == 0 and proxy.count("POST") == 0 and proxy.count() == 1


def test_encryption_header_seen_by_server(seaweedfs, weed_bucket, nifti_files, proxy,
                                          tmp_path):
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory=f"s3://{weed_bucket}/enc", encrypt_bucket_keys=True)
    sink.run(cwd=str(tmp_path))
    put = next(r for r in proxy.requests if r.method == "PUT")
    assert put.header("x-amz-server-side-encryption") == "AES256"
    head = seaweedfs.client().head_object(Bucket=weed_bucket, Key="enc/anat/anatomical.nii")
    assert head["ServerSideEncryption"] == "AES256"


def test_sync_delete_and_remove_dest_dir(seaweedfs, weed_bucket, outputs, tmp_path):
    client = seaweedfs.client()
    client.put_object(Bucket=weed_bucket, Key="d/sub001/stale.txt", Body=b"old")
    old = "d/sub001/qc/_subject_id_sub001/report/old.html"
    client.put_object(Bucket=weed_bucket, Key=old, Body=b"old")
    client.put_object(Bucket=weed_bucket, Key="d/sub002/keep.txt", Body=b"other subject")
    sink = _sink({"qc.@report": outputs["qc.@report"]},
                 base_directory=f"s3://{weed_bucket}/d", container="sub001",
                 remove_dest_dir=True)
    sink.run(cwd=str(tmp_path))
    keys = _keys(client, weed_bucket)
    assert old not in keys  # remove_dest_dir: the folder is replaced
    assert "d/sub001/stale.txt" in keys  # ...but nothing else is touched
    sink.inputs.sync_delete = True
    sink.run(cwd=str(tmp_path))
    report = "d/sub001/qc/_subject_id_sub001/report"
    assert _keys(client, weed_bucket) == [f"{report}/figs/carpet.svg", f"{report}/index.html",
                                          "d/sub002/keep.txt"]


def test_wrong_keys_are_rejected_with_a_clear_error(seaweedfs, weed_bucket, nifti_files,
                                                    tmp_path):
    creds = tmp_path / "creds.csv"
    creds.write_text("Access key ID,Secret access key\nWRONGKEYID000,wrong-secret\n")
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory=f"s3://{weed_bucket}/x", creds_path=str(creds))
    with pytest.raises(S3AccessDenied) as err:
        sink.run(cwd=str(tmp_path))
    assert "access key id in use is not known" in str(err.value)
    assert "WRONGKEYID000" not in str(err.value) and "wrong-secret" not in str(err.value)
    assert _keys(seaweedfs.client(), weed_bucket) == []


def test_wrong_secret(seaweedfs, weed_bucket, nifti_files, tmp_path):
    creds = tmp_path / "rootkey.csv"
    creds.write_text(f"AWSAccessKeyId={seaweedfs.access_key}\nAWSSecretKey=not-the-secret\n")
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory=f"s3://{weed_bucket}/x", creds_path=str(creds))
    with pytest.raises(S3AccessDenied, match="secret key does not match"):
        sink.run(cwd=str(tmp_path))


@pytest.mark.parametrize("fmt", ["root", "iam_csv", "console_csv", "ini"])
def test_each_creds_format_works(seaweedfs, weed_bucket, nifti_files, tmp_path, monkeypatch,
                                 fmt):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-that-is-wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-that-is-wrong")
    key, secret = seaweedfs.access_key, seaweedfs.secret_key
    text = {
        "root": f"AWSAccessKeyId={key}\nAWSSecretKey={secret}\n",
        "iam_csv": f"User Name,Access Key Id,Secret Access Key\n\"lab\",{key},{secret}\n",
        "console_csv": f"Access key ID,Secret access key\n{key},{secret}\n",
        "ini": f"[default]\naws_access_key_id={key}\naws_secret_access_key={secret}\n",
    }[fmt]
    creds = tmp_path / "creds"
    creds.write_text(text)
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory=f"s3://{weed_bucket}/{fmt}", creds_path=str(creds))
    sink.run(cwd=str(tmp_path))
    assert _keys(seaweedfs.client(), weed_bucket) == [f"{fmt}/anat/anatomical.nii"]


def test_nonexistent_bucket(seaweedfs, nifti_files, tmp_path):
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory="s3://no-such-bucket-anywhere/x")
    with pytest.raises(S3BucketNotFound) as err:
        sink.run(cwd=str(tmp_path))
    assert "'no-such-bucket-anywhere' does not exist at " + seaweedfs.url in str(err.value)


def test_odd_names_and_empty_files(seaweedfs, weed_bucket, tmp_path):
    odd = tmp_path / "_séance 1" / "T1w map (v2).nii"
    odd.parent.mkdir()
    odd.write_bytes(b"")
    sink = _sink({"anat": str(odd)}, base_directory=f"s3://{weed_bucket}/odd")
    sink.run(cwd=str(tmp_path))
    key = "odd/anat/_séance 1/T1w map (v2).nii"
    assert _keys(seaweedfs.client(), weed_bucket) == [key]
    assert seaweedfs.client().head_object(Bucket=weed_bucket, Key=key)["ContentLength"] == 0
    sink.run(cwd=str(tmp_path))  # and unchanged on re-run


def test_progress_bar(seaweedfs, weed_bucket, nifti_files, tmp_path, capsys):
    sink = _sink({"anat": nifti_files["anatomical.nii"]},
                 base_directory=f"s3://{weed_bucket}/p", progress=True)
    sink.run(cwd=str(tmp_path))
    assert "upload" in capsys.readouterr().err
