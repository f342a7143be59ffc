"""LocalCloud fails where AWS fails, where moto would not: an upload whose body does not
match the digest it carries is refused (moto stores it)."""

import base64
import hashlib

import boto3
import botocore.exceptions
import pytest

from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow


def test_an_upload_that_does_not_match_its_checksum_is_refused_as_on_s3():
    with LocalCloud() as cloud:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="my-bucket")
        data = b"the file as it was hashed"
        digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
        s3.put_object(Bucket="my-bucket", Key="ok", Body=data, ChecksumSHA256=digest)
        with pytest.raises(botocore.exceptions.ClientError) as err:
            s3.put_object(Bucket="my-bucket", Key="changed", Body=data + b" and appended",
                          ChecksumSHA256=digest)
        assert err.value.response["Error"]["Code"] == "BadDigest"
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="my-bucket")["Contents"]]
        assert keys == ["ok"]
        direct = cloud.client("s3", direct=True)  # moto itself takes it: the gap closed
        direct.put_object(Bucket="my-bucket", Key="moto-takes-it", Body=b"x",
                          ChecksumSHA256=digest)


# -- instances boot from their user-data, in a sandbox that plays Amazon Linux ----------

def _booted():
    """A LocalCloud whose instances run their real user-data (skip where it cannot)."""
    from nipype_s3.testing.sandbox import sandbox_available

    why = sandbox_available()
    if why:
        pytest.skip(f"LocalCloud cannot boot instances from their user-data here: {why}")
    cloud = LocalCloud(boot="user-data")
    return cloud


def _plugin(**more):
    from nipype_s3 import EC2Plugin

    return EC2Plugin(plugin_args=dict({"s3_prefix": "s3://fidelity/runs", "idle_timeout": 5,
                                       "boot_timeout": 600}, **more))


def _one_node_workflow(base_dir, source):
    """A workflow of one Function node made from ``source`` (code that names paths in
    its text travels as text: the paths are not inputs, so nothing is staged for them)."""
    from nipype import Function, Node, Workflow

    wf = Workflow("fidelity", base_dir=str(base_dir))
    wf.add_nodes([Node(Function(input_names=[], output_names=["out"], function=source),
                       name="probe")])
    return wf


_WHATS_THERE = """
def whats_there():
    import os
    import subprocess
    import sys

    return {{"python": "{{}}.{{}}".format(*sys.version_info[:2]),
             "executable": sys.executable, "sees_controller_tree": os.path.exists({path!r}),
             "python3": os.path.realpath("/usr/bin/python3"),
             # what would let a node out of its instance, onto this machine
             "docker_socket": os.path.exists("/run/docker.sock"),
             "etc_writable": os.access("/etc", os.W_OK),
             "disks": [d for d in os.listdir("/dev") if d[:2] in ("vd", "sd", "nv", "xv")],
             "unmounts": subprocess.run(["umount", "-l", "/root"],
                                        capture_output=True).returncode == 0}}
"""


def test_the_bootstrap_runs_and_the_agent_has_nothing_of_the_controllers(tmp_path):
    import sys

    with _booted() as cloud:
        boto3.client("s3").create_bucket(Bucket="fidelity")
        # the controller's own environment, named in the node's code
        wf = _one_node_workflow(tmp_path / "wf", _WHATS_THERE.format(path=sys.prefix))
        seen = list(wf.run(plugin=_plugin()).nodes())[0].result.outputs.out
        assert len(cloud.instance_list()) == 1
    assert seen["python"] == "{}.{}".format(*sys.version_info[:2])  # the bootstrap got it
    assert seen["executable"] == "/opt/nipype-s3/bin/python"  # in the bootstrap's venv
    assert not seen["sees_controller_tree"]  # the controller's folders are not there
    assert "{}.{}".format(*sys.version_info[:2]) not in seen["python3"]  # python3 is older
    # root on the instance, but not on this machine
    assert not seen["docker_socket"] and not seen["etc_writable"]
    assert seen["disks"] == [] and not seen["unmounts"]


_READ_SETTINGS = """
def read_settings():
    with open({path!r}) as fobj:
        return fobj.read()
"""


def test_a_node_reading_a_controller_file_it_was_not_given_fails_clearly(tmp_path):
    settings = tmp_path / "lab" / "config" / "settings.txt"
    settings.parent.mkdir(parents=True)
    settings.write_text("threshold=0.5\n")
    # a path in the node's code, not an input: Linear reads it (the file is here) ...
    source = _READ_SETTINGS.format(path=str(settings))
    wf = _one_node_workflow(tmp_path / "linear", source)
    assert list(wf.run(plugin="Linear").nodes())[0].result.outputs.out == "threshold=0.5\n"
    # ... an instance has no such file
    with _booted():
        boto3.client("s3").create_bucket(Bucket="fidelity")
        with pytest.raises(RuntimeError):
            _one_node_workflow(tmp_path / "ec2", source).run(plugin=_plugin())
    crash = _crash_text("probe")
    assert f"No such file or directory: '{settings}'" in crash
    assert f"{settings} exists on this machine but not on the instance" in crash
    assert "Give it as an input" in crash


def _crash_text(node: str) -> str:
    """The traceback of the newest crash file of ``node``."""
    import glob
    import os

    from nipype import config
    from nipype.utils.filemanip import loadcrash

    found = glob.glob(os.path.join(config.get("execution", "crashdump_dir"),
                                   f"crash-*-{node}-*.pklz"))
    assert found, f"no crash file of {node}"
    return "".join(loadcrash(max(found, key=os.path.getmtime))["traceback"])


def test_a_node_needing_a_package_only_here_fails_until_it_is_required(tmp_path):
    """ComputeDVARS needs nitime, which this machine has (Linear works) and an instance
    gets only when asked for."""
    import nibabel as nib
    import numpy as np
    from nipype import Node, Workflow
    from nipype.algorithms.confounds import ComputeDVARS

    rng = np.random.default_rng(3)
    series, mask = tmp_path / "bold.nii.gz", tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(100, 5, (6, 6, 4, 30)).astype(np.float32),
                             np.eye(4)), str(series))
    nib.save(nib.Nifti1Image(np.ones((6, 6, 4), dtype=np.uint8), np.eye(4)), str(mask))

    def workflow(name):
        wf = Workflow(name, base_dir=str(tmp_path))
        node = Node(ComputeDVARS(in_file=str(series), in_mask=str(mask)), name="dvars")
        wf.add_nodes([node])
        return wf

    here = list(workflow("linear").run(plugin="Linear").nodes())[0].result.outputs
    with _booted():
        boto3.client("s3").create_bucket(Bucket="fidelity")
        with pytest.raises(RuntimeError):
            workflow("bare").run(plugin=_plugin())
        crash = _crash_text("dvars")
        assert "No module named 'nitime'" in crash
        assert "add its package to plugin_args['requirements'] (e.g. ['nitime'])" in crash
        there = list(workflow("asked").run(plugin=_plugin(requirements=["nitime"])).nodes())[
            0].result.outputs
    with open(here.out_std) as a, open(there.out_std) as b:
        assert a.read() == b.read()
