"""No credential in anything a run leaves: node dirs, crash files, logs, S3, user-data."""

import gzip
import os

import boto3
import pytest
from nipype import Function, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import EC2Plugin, S3DataSink
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow

TOKEN = "fake-session-token-that-must-never-be-written-down"


def _make_file(x):
    import os

    path = os.path.abspath(f"out_{x}.txt")
    with open(path, "w") as fobj:
        fobj.write(str(x))
    return path


def _explode(path):
    raise RuntimeError(f"cannot process {path}")


def _files(root):
    """Every regular file below ``root`` (an instance's overlay holds device nodes)."""
    import stat

    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                yield path


def _readable(path):
    data = open(path, "rb").read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except OSError:
            pass
    return data


def test_no_secret_anywhere_after_a_run(tmp_path, monkeypatch):
    with LocalCloud(directory=str(tmp_path / "cloud"), keep=True) as cloud:
        monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)  # the controller has a session token
        secrets = [os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], TOKEN]
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="my-bucket")
        wf = Workflow("secretive", base_dir=str(tmp_path / "work"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
        src = Node(IdentityInterface(fields=["x"]), "src")  # runs on the controller
        src.inputs.x = 5
        make = Node(Function(input_names=["x"], output_names=["path"], function=_make_file),
                    "make")
        sink = Node(S3DataSink(base_directory="s3://my-bucket/derivatives"), "sink")
        bad = Node(Function(input_names=["path"], output_names=["y"], function=_explode),
                   "bad")
        wf.connect(src, "x", make, "x")
        wf.connect(make, "path", sink, "result")
        wf.connect(make, "path", bad, "path")
        with pytest.raises(RuntimeError, match="cannot process"):
            wf.run(plugin=EC2Plugin(plugin_args={
                "s3_prefix": "s3://my-bucket/nipype-runs", "poll_wait": 1,
                "scale_interval": 0.5, "lease_timeout": 8, "idle_timeout": 10}))
        assert list((tmp_path / "crashes").glob("crash-*")), "a crash file was expected"

        found = []
        for root in (tmp_path / "work", tmp_path / "crashes", tmp_path / "cloud" / "instances"):
            for path in _files(root):
                data = _readable(path)
                found += [(path, s) for s in secrets if s.encode() in data]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="my-bucket"):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket="my-bucket", Key=obj["Key"])["Body"].read()
                if body[:2] == b"\x1f\x8b":
                    try:
                        body = gzip.decompress(body)
                    except OSError:
                        pass
                found += [(obj["Key"], s) for s in secrets if s.encode() in body]
        assert found == []
        scripts = list((tmp_path / "cloud" / "instances").glob("*/user-data.sh"))
        assert scripts and all(s.encode() not in p.read_bytes() for p in scripts
                               for s in secrets)
        assert cloud.live_instances() == []


def _sink_workflow(base, creds_path, **plugin_args):
    wf = Workflow("keyed", base_dir=str(base))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    make = Node(Function(input_names=["x"], output_names=["path"], function=_make_file),
                "make")
    make.inputs.x = 3
    sink = Node(S3DataSink(base_directory="s3://my-bucket/derivatives",
                           creds_path=str(creds_path)), "sink")
    if plugin_args:
        sink.plugin_args = plugin_args
    wf.connect(make, "path", sink, "result")
    return wf


def test_a_node_with_a_key_file_runs_on_the_controller_and_its_keys_stay_here(tmp_path):
    """A key file named by creds_path is an existing file among the node's inputs: run
    remotely, it was staged like any input, into the run's S3 prefix and onto an
    instance. Such nodes now run on the controller; asking otherwise is an error."""
    from nipype_s3 import ConfigurationError

    with LocalCloud(directory=str(tmp_path / "cloud"), keep=True) as cloud:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="my-bucket")
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
        creds = tmp_path / "keys.csv"
        creds.write_text(f"Access key ID,Secret access key\n"
                         f"{os.environ['AWS_ACCESS_KEY_ID']},{secret}\n")
        plugin = {"s3_prefix": "s3://my-bucket/nipype-runs", "poll_wait": 1,
                  "scale_interval": 0.5, "lease_timeout": 8, "idle_timeout": 10}
        _sink_workflow(tmp_path / "work", creds).run(plugin=EC2Plugin(plugin_args=plugin))
        assert s3.get_object(Bucket="my-bucket", Key="derivatives/result/out_3.txt")[
            "Body"].read() == b"3"
        bodies = [_readable_body(s3, o["Key"]) for page in s3.get_paginator(
            "list_objects_v2").paginate(Bucket="my-bucket") for o in page.get("Contents", [])]
        assert bodies and not [b for b in bodies if secret.encode() in b]
        assert not [p for p in _files(tmp_path / "cloud" / "instances")
                    if secret.encode() in _readable(p)]

        with pytest.raises(ConfigurationError, match=r"Node keyed\.sink: creds_path names "
                                                     r"credentials of this machine"):
            _sink_workflow(tmp_path / "again", creds, local=False).run(
                plugin=EC2Plugin(plugin_args=plugin))
        assert cloud.live_instances() == []


def _readable_body(s3, key):
    body = s3.get_object(Bucket="my-bucket", Key=key)["Body"].read()
    if body[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(body)
        except OSError:
            pass
    return body


def _list_folder(folder):
    import os

    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, _, names in os.walk(folder) for n in names)


def test_a_home_folder_as_input_is_staged_without_its_aws_files(tmp_path, monkeypatch):
    """An input folder holding ~/.aws (a home folder, handed over whole) reaches the
    instance without it: the shared credentials never go to S3 or an instance."""
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[lab]\naws_access_key_id = fake-id\naws_secret_access_key = {TOKEN}\n")
    (home / "notes.txt").write_text("analysis notes")
    monkeypatch.setenv("HOME", str(home))
    with LocalCloud(directory=str(tmp_path / "cloud"), keep=True) as cloud:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="my-bucket")
        wf = Workflow("homely", base_dir=str(tmp_path / "work"))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        look = Node(Function(input_names=["folder"], output_names=["names"],
                             function=_list_folder), "look")
        look.inputs.folder = str(home)
        wf.add_nodes([look])
        result = wf.run(plugin=EC2Plugin(plugin_args={
            "s3_prefix": "s3://my-bucket/nipype-runs", "poll_wait": 1,
            "scale_interval": 0.5, "lease_timeout": 8, "idle_timeout": 10}))
        (node,) = result.nodes()
        assert node.result.outputs.names == ["notes.txt"]
        bodies = [_readable_body(s3, o["Key"]) for page in s3.get_paginator(
            "list_objects_v2").paginate(Bucket="my-bucket") for o in page.get("Contents", [])]
        assert not [b for b in bodies if TOKEN.encode() in b]
        assert not [p for p in _files(tmp_path / "cloud" / "instances")
                    if TOKEN.encode() in _readable(p)]
        assert cloud.live_instances() == []
