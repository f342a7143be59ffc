"""Faults on the wire (loopback only): dropped connections, stalls, 500/503 answers."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from nipype_s3 import S3DataGrabber, S3DataSink, TransferFailed
from nipype_s3.config import MiB
from nipype_s3.testing.proxy import RecordingProxy

pytestmark = [pytest.mark.seaweedfs, pytest.mark.slow]

N_FILES = 200


@pytest.fixture
def many_files(tmp_path):
    root = tmp_path / "_subject_id_sub-01" / "derivatives"
    root.mkdir(parents=True)
    sums = {}
    for i in range(N_FILES):
        data = os.urandom(1024 + 37 * i)
        path = root / f"file_{i:03d}.bin"
        path.write_bytes(data)
        sums[path.name] = hashlib.sha256(data).hexdigest()
    return root, sums


def _sink(root, bucket, **inputs):
    sink = S3DataSink(base_directory=f"s3://{bucket}/faulty", max_concurrency=16, **inputs)
    sink.inputs.files = sorted(str(p) for p in root.iterdir())
    return sink


def _remote_sums(client, bucket, prefix):
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"].rsplit("/", 1)[-1]] = hashlib.sha256(body).hexdigest()
    return out


def test_ten_percent_faults_sink_and_grab_every_byte(seaweedfs, weed_bucket, many_files,
                                                     tmp_path, monkeypatch):
    root, sums = many_files
    monkeypatch.setenv("NIPYPE_S3_READ_TIMEOUT", "2")
    with RecordingProxy(seaweedfs.url, fault_rate=0.10, faults=("503", "500", "drop", "stall"),
                        stall_seconds=4, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        _sink(root, weed_bucket).run(cwd=str(tmp_path))
        injected = sum(1 for r in proxy.requests if r.status in (0, 500, 503))
        assert injected > 10  # the faults really happened
        assert _remote_sums(seaweedfs.client(), weed_bucket, "faulty/") == sums

        grab = S3DataGrabber()
        grab.inputs.bucket = weed_bucket
        grab.inputs.bucket_path = "faulty/files/"
        grab.inputs.template = "_subject_id_sub-01/*.bin"
        grab.inputs.local_directory = str(tmp_path / "grabbed")
        result = grab.run(cwd=str(tmp_path))
    got = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
           for p in result.outputs.outfiles}
    assert got == sums


def test_all_faults_fail_clearly_and_leave_nothing(seaweedfs, weed_bucket, tmp_path,
                                                   monkeypatch):
    big = tmp_path / "_run_1" / "bold.nii.gz"
    big.parent.mkdir()
    big.write_bytes(os.urandom(40 * MiB))
    monkeypatch.setenv("NIPYPE_S3_MAX_ATTEMPTS", "3")

    def part_uploads(method, path, query):
        return method == "PUT" and "partNumber" in query

    with RecordingProxy(seaweedfs.url, fault_rate=1.0, faults=("503",),
                        fault_filter=part_uploads) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        sink = S3DataSink(base_directory=f"s3://{weed_bucket}/big")
        sink.inputs.bold = str(big)
        started = time.monotonic()
        with pytest.raises(TransferFailed) as err:
            sink.run(cwd=str(tmp_path))
        assert time.monotonic() - started < 120  # bounded retries, no hang
    assert "1 of 1 files failed to upload to s3://" in str(err.value)
    assert "SlowDown" in str(err.value)
    client = seaweedfs.client()
    assert client.list_multipart_uploads(Bucket=weed_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=weed_bucket).get("KeyCount") == 0


SINK_SCRIPT = r'''
import os, sys
os.environ["NIPYPE_NO_ET"] = "1"
from nipype_s3 import S3DataSink
sink = S3DataSink(base_directory=sys.argv[1], max_concurrency=2)
sink.inputs.files = sorted(os.path.join(sys.argv[2], f) for f in os.listdir(sys.argv[2]))
sink.run(cwd=sys.argv[3])
'''


def test_sigkill_mid_sink_then_rerun_sends_only_the_rest(seaweedfs, weed_bucket, many_files,
                                                         tmp_path, monkeypatch):
    root, sums = many_files
    script = tmp_path / "sink.py"
    script.write_text(SINK_SCRIPT)
    with RecordingProxy(seaweedfs.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = subprocess.Popen([sys.executable, str(script), f"s3://{weed_bucket}/killed",
                                 str(root), str(tmp_path)], env=dict(os.environ))
        deadline = time.time() + 120
        while proxy.count("PUT") < 40 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1)  # requests the proxy was still forwarding land (or fail) now
        client = seaweedfs.client()
        remote = {o["Key"].rsplit("/", 1)[-1]: o["ETag"].strip('"') for o in
                  client.list_objects_v2(Bucket=weed_bucket, Prefix="killed/").get(
                      "Contents", [])}
        intact = sum(1 for name, etag in remote.items()
                     if hashlib.md5((root / name).read_bytes()).hexdigest() == etag)
        assert 0 < intact < N_FILES
        proxy.clear()
        sink = S3DataSink(base_directory=f"s3://{weed_bucket}/killed")
        sink.inputs.files = sorted(str(p) for p in root.iterdir())
        sink.run(cwd=str(tmp_path))
        assert proxy.count("PUT") == N_FILES - intact  # only the missing or broken ones
    assert _remote_sums(seaweedfs.client(), weed_bucket, "killed/") == sums


GRAB_SCRIPT = r'''
import os, sys
os.environ["NIPYPE_NO_ET"] = "1"
from nipype_s3 import S3DataGrabber
grab = S3DataGrabber(max_concurrency=2)
grab.inputs.bucket = sys.argv[1]
grab.inputs.bucket_path = "src/"
grab.inputs.template = "*.bin"
grab.inputs.local_directory = sys.argv[2]
grab.run(cwd=sys.argv[3])
'''


def test_sigkill_mid_grab_then_rerun_fetches_only_the_rest(seaweedfs, weed_bucket, many_files,
                                                           tmp_path, monkeypatch):
    root, sums = many_files
    client = seaweedfs.client()
    for path in root.iterdir():
        client.upload_file(str(path), weed_bucket, f"src/{path.name}")
    script = tmp_path / "grab.py"
    script.write_text(GRAB_SCRIPT)
    dest = tmp_path / "dest"
    with RecordingProxy(seaweedfs.url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proc = subprocess.Popen([sys.executable, str(script), weed_bucket, str(dest),
                                 str(tmp_path)], env=dict(os.environ))
        deadline = time.time() + 120
        while proxy.count("GET") < 40 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        complete = {p.name for p in dest.iterdir() if p.name.endswith(".bin")} \
            if dest.exists() else set()
        # whatever is at a destination path is whole: partial data only in temporary files
        for name in complete:
            assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == sums[name]
        assert 0 < len(complete) < N_FILES
        proxy.clear()
        grab = S3DataGrabber()
        grab.inputs.bucket = weed_bucket
        grab.inputs.bucket_path = "src/"
        grab.inputs.template = "*.bin"
        grab.inputs.local_directory = str(dest)
        result = grab.run(cwd=str(tmp_path))
        object_gets = proxy.count("GET") - proxy.count("GET", query_has="list-type")
        assert object_gets == N_FILES - len(complete)
        # the killed run's temporary files are gone too (swept: their process is dead)
        assert not [p.name for p in dest.iterdir() if ".nipype-s3-" in p.name]
    got = {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
           for p in result.outputs.outfiles}
    assert got == sums
