"""What nipype users met in their own pipelines under EC2Plugin, each compared with
what ``Linear``/``MultiProc`` do (LocalCloud)."""

import glob
import os

import boto3
import pytest
from nipype import Function, Node, Workflow

from nipype_s3 import EC2Plugin
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow

FAST = {"idle_timeout": 10, "lease_timeout": 8, "visibility_timeout": 6, "heartbeat": 1.5,
        "poll_wait": 1, "scale_interval": 0.5, "done_scan_interval": 2}


def _plugin_args(**extra):
    return {"s3_prefix": "s3://my-bucket/nipype-runs", "max_instances": 1, **FAST, **extra}


@pytest.fixture
def cloud():
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="my-bucket")
        yield cloud
        assert cloud.errors == []
        assert cloud.live_instances() == []


def _boom(x):
    raise ValueError(f"remote failure for input {x}")


def _crash(base, plugin):
    wf = Workflow("crashing", base_dir=base)
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    wf.config["execution"]["crashdump_dir"] = os.path.join(base, "crashes")
    bad = Node(Function(input_names=["x"], output_names=["y"], function=_boom), "bad")
    bad.inputs.x = 42
    wf.add_nodes([bad])
    with pytest.raises(RuntimeError) as err:
        wf.run(plugin=plugin)
    from nipype.utils.filemanip import loadcrash

    (crash,) = glob.glob(os.path.join(base, "crashes", "crash-*.pklz"))
    return (str(err.value), "".join(loadcrash(crash)["traceback"]),
            sorted(os.listdir(os.path.join(base, "crashing", "bad"))))


def test_a_remote_failure_leaves_what_multiproc_leaves(cloud, tmp_path):
    _, mp_text, mp_files = _crash(str(tmp_path / "mp"), "MultiProc")
    error, text, files = _crash(str(tmp_path / "ec2"), EC2Plugin(plugin_args=_plugin_args()))
    assert files == mp_files == ["_inputs.pklz", "_node.pklz", "_report", "result_bad.pklz"]
    from nipype.pipeline.engine.utils import load_resultfile

    result = load_resultfile(str(tmp_path / "ec2" / "crashing" / "bad" / "result_bad.pklz"))
    assert result.runtime is not None  # nipype's own result, as MultiProc leaves it
    assert "could not be found" not in text
    assert "ValueError: remote failure for input 42" in text
    for shown in (error, text):  # the controller's paths, not the instance's
        assert "/instances/i-" not in shown
    assert str(tmp_path / "ec2" / "crashing" / "bad") in text


def _double(x):
    return 2 * x


def _one_node(base, x):
    wf = Workflow("twice", base_dir=base)
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = Node(Function(input_names=["x"], output_names=["y"], function=_double), "double")
    node.inputs.x = x
    wf.add_nodes([node])
    return wf


def test_one_plugin_object_runs_two_workflows_and_the_string_form_works(cloud, tmp_path):
    plugin = EC2Plugin(plugin_args=_plugin_args())
    for x in (1, 2):
        (node,) = _one_node(str(tmp_path / f"w{x}"), x).run(plugin=plugin).nodes()
        assert node.result.outputs.y == 2 * x
    (node,) = _one_node(str(tmp_path / "w3"), 5).run(
        plugin="EC2", plugin_args=_plugin_args()).nodes()
    assert node.result.outputs.y == 10


def _is_link(in_file):
    import os

    with open(in_file) as fobj:
        text = fobj.read()
    return [os.path.islink(in_file), text]


@pytest.mark.parametrize("chain", [False, True])
def test_a_linked_file_input_arrives_as_a_link(cloud, tmp_path, chain):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub-01_T1w.nii").write_text("image bytes")
    link = tmp_path / "t1.nii"
    if chain:
        os.symlink(data / "sub-01_T1w.nii", tmp_path / "middle.nii")
        os.symlink(tmp_path / "middle.nii", link)
    else:
        os.symlink(data / "sub-01_T1w.nii", link)
    results = {}
    for name, plugin in (("Linear", "Linear"), ("EC2", EC2Plugin(plugin_args=_plugin_args()))):
        wf = Workflow("links", base_dir=str(tmp_path / name))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        node = Node(Function(input_names=["in_file"], output_names=["out"],
                             function=_is_link), "look")
        node.inputs.in_file = str(link)
        wf.add_nodes([node])
        (done,) = wf.run(plugin=plugin).nodes()
        results[name] = done.result.outputs.out
    assert results["EC2"] == results["Linear"] == [True, "image bytes"]
