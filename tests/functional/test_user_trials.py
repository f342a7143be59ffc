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
    # the error is the last line, as under MultiProc (where it ran and its log come first)
    assert text.strip().splitlines()[-1] == mp_text.strip().splitlines()[-1]
    assert "ValueError: remote failure for input 42" in text.strip().splitlines()[-1]
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


def _sleepy(x):
    import time

    time.sleep(2)
    return x


def _sleepy_workflow(base, n):
    from nipype.interfaces.utility import IdentityInterface

    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", list(range(n)))
    step = Node(Function(input_names=["x"], output_names=["y"], function=_sleepy), "step")
    wf = Workflow("capped", base_dir=base)
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    wf.config["execution"]["crashdump_dir"] = os.path.join(base, "crashes")
    wf.connect(src, "x", step, "x")
    return wf


def test_a_cost_cap_below_one_instance_launches_nothing_and_says_so(cloud, tmp_path):
    from nipype_s3.exceptions import EC2Error

    with pytest.raises(EC2Error, match=r"max_cost_usd=\$0\.001.*node\(s\) not run: "
                                       r"capped\.step\.a0"):
        _sleepy_workflow(str(tmp_path), 3).run(
            plugin=EC2Plugin(plugin_args=_plugin_args(max_cost_usd=0.001)))
    assert cloud.proxy.count(action="RunInstances") == 0


def test_a_cost_cap_limits_the_instances_launched(cloud, tmp_path):
    """A cap that pays for one instance's minimum: one instance, the run completes."""
    plugin = EC2Plugin(plugin_args=_plugin_args(max_instances=3, max_cost_usd=0.002))
    result = _sleepy_workflow(str(tmp_path), 6).run(plugin=plugin)
    assert sorted(n.result.outputs.y for n in result.nodes() if n.name.startswith("step")) \
        == list(range(6))
    assert cloud.proxy.count(action="RunInstances") == 1
    assert plugin.cost_report["usd_estimate"] <= 0.002


def test_an_unpriced_type_with_a_cost_cap_is_named(cloud, tmp_path):
    from nipype_s3 import ConfigurationError

    with pytest.raises(ConfigurationError, match="'c1.medium' is not in nipype_s3's price"):
        _sleepy_workflow(str(tmp_path), 1).run(plugin=EC2Plugin(plugin_args=_plugin_args(
            max_cost_usd=1.0, instance_type="c1.medium")))


def _slow_double(x):
    import time

    time.sleep(5)
    return 2 * x


def test_a_spot_notice_mid_job_runs_the_job_again_elsewhere_at_once(cloud, tmp_path):
    """EC2's two-minute notice: the agent hands its job back (visible again at once, not
    after the visibility timeout) and stops; the job runs again on another instance,
    once, and the workflow's result is unchanged."""
    import threading
    import time

    wf = Workflow("spot", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = Node(Function(input_names=["x"], output_names=["y"], function=_slow_double),
                "slow")
    node.inputs.x = 21
    wf.add_nodes([node])
    noticed = []
    threading.Thread(target=lambda: noticed.append(cloud.spot_notice()), daemon=True).start()
    started = time.time()
    (done,) = wf.run(plugin=EC2Plugin(plugin_args=_plugin_args(
        max_instances=2, visibility_timeout=120, heartbeat=5))).nodes()
    assert done.result.outputs.y == 42
    assert time.time() - started < 90  # not the 120 s visibility timeout
    (reclaimed,) = noticed
    logs = {i.instance_id: i.log() for i in cloud.instance_list()}
    assert "handed back to the queue: spot interruption notice" in logs[reclaimed]
    assert "agent stops: spot interruption notice (terminate" in logs[reclaimed]
    finished = [iid for iid, text in logs.items() if "finished: ok" in text]
    assert finished and reclaimed not in finished
