"""EC2Plugin on LocalCloud: real agents in subprocesses, no shared file system."""

import os
import threading

import boto3
import pytest
from nipype import Function, MapNode, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import EC2Plugin
from nipype_s3.testing import LocalCloud

pytestmark = pytest.mark.slow

FAST = {"idle_timeout": 15, "lease_timeout": 8, "visibility_timeout": 6, "heartbeat": 1.5,
        "poll_wait": 1, "scale_interval": 0.5, "done_scan_interval": 5}


def _double(x):
    return x * 2


def _write(value):
    import os

    path = os.path.abspath(f"value_{value}.txt")
    with open(path, "w") as fobj:
        fobj.write(str(value))
    return path


def _read_plus_one(path):
    with open(path) as fobj:
        return int(fobj.read()) + 1


def _square(x):
    return x * x


def _total(values):
    return sum(values)


def _boom(x):
    raise ValueError(f"remote failure for input {x}")


def _sleep_then(x, seconds=4):
    import time

    time.sleep(seconds)
    return x


def _mean_of_nifti(in_file):
    import os

    import nibabel as nib
    import numpy as np

    img = nib.load(in_file)
    mean = np.asanyarray(img.dataobj, dtype="float32").mean(axis=-1)
    out = os.path.abspath("mean.nii.gz")
    nib.save(nib.Nifti1Image(mean, img.affine), out)
    return out


def _fn(name, function, inputs, outputs):
    return Node(Function(input_names=inputs, output_names=outputs, function=function), name)


def build_workflow(base_dir, nifti):
    """A Function chain three levels deep, a MapNode, iterables, and a real NIfTI step."""
    wf = Workflow("wf", base_dir=str(base_dir))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", [1, 2])
    a = _fn("a", _double, ["x"], ["y"])
    b = _fn("b", _write, ["value"], ["path"])
    c = _fn("c", _read_plus_one, ["path"], ["v"])
    sq = MapNode(Function(input_names=["x"], output_names=["y"], function=_square),
                 iterfield=["x"], name="sq")
    sq.inputs.x = [1, 2, 3]
    tot = _fn("tot", _total, ["values"], ["s"])
    mean = _fn("mean", _mean_of_nifti, ["in_file"], ["out"])
    mean.inputs.in_file = nifti
    wf.connect(src, "x", a, "x")
    wf.connect(a, "y", b, "value")
    wf.connect(b, "path", c, "path")
    wf.connect(sq, "y", tot, "values")
    wf.add_nodes([mean])
    return wf


def _outputs(result_graph):
    out = {}
    for node in result_graph.nodes():
        outputs = node.result.outputs
        if outputs is None:
            out[node.fullname] = None
        else:
            out[node.fullname] = dict(outputs.dictcopy() if hasattr(outputs, "dictcopy")
                                      else outputs.get())
    return out


def _normalise(outputs, base):
    def fix(v):
        if isinstance(v, str):
            return v.replace(str(base), "<base>")
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return {k: {kk: fix(vv) for kk, vv in (v or {}).items()} for k, v in outputs.items()}


def _plugin(**extra):
    args = {"s3_prefix": "s3://my-bucket/nipype-runs", "max_instances": 2, **FAST}
    args.update(extra)
    return EC2Plugin(plugin_args=args)


@pytest.fixture
def cloud():
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="my-bucket")
        yield cloud
        assert cloud.errors == []


def _count_jobs(cloud):
    return cloud.proxy.count(action="AmazonSQS.SendMessage")


def test_same_outputs_as_linear_and_rerun_submits_nothing(cloud, tmp_path, nifti_files):
    import nibabel as nib
    import numpy as np

    linear = build_workflow(tmp_path / "linear", nifti_files["example4d.nii.gz"]).run(
        plugin="Linear")
    wf = build_workflow(tmp_path / "ec2", nifti_files["example4d.nii.gz"])
    remote = wf.run(plugin=_plugin())
    assert _normalise(_outputs(remote), tmp_path / "ec2") == \
        _normalise(_outputs(linear), tmp_path / "linear")
    # the NIfTI made on an agent is in the controller's node directory, byte-equal
    mean_ec2 = tmp_path / "ec2" / "wf" / "mean" / "mean.nii.gz"
    mean_lin = tmp_path / "linear" / "wf" / "mean" / "mean.nii.gz"
    assert np.allclose(nib.load(mean_ec2).get_fdata(), nib.load(mean_lin).get_fdata())
    assert cloud.live_instances() == []
    sent = _count_jobs(cloud)
    assert sent >= 9  # a x2, b x2, c x2, sq x3, tot, mean: some ran remotely

    again = build_workflow(tmp_path / "ec2", nifti_files["example4d.nii.gz"])
    again.run(plugin=_plugin())
    assert _count_jobs(cloud) == sent  # an immediate re-run submits zero jobs
    assert cloud.live_instances() == []
    logs = "".join(i.log() for i in cloud.instance_list())
    assert "started in a fork of the agent" in logs  # one-CPU jobs: no interpreter start


def _grab_process_sink(base_dir):
    """The usual shape: S3DataGrabber -> a step -> S3DataSink (both always run)."""
    from nipype_s3 import S3DataGrabber, S3DataSink

    wf = Workflow("study", base_dir=str(base_dir))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    grab = Node(S3DataGrabber(outfields=["func"]), "grab")
    grab.inputs.bucket = "my-bucket"
    grab.inputs.bucket_path = "raw/"
    grab.inputs.template = "*"
    grab.inputs.field_template = {"func": "sub-01/func/*_bold.nii.gz"}
    grab.inputs.template_args = {"func": [[]]}
    mean = _fn("mean", _mean_of_nifti, ["in_file"], ["out"])
    sink = Node(S3DataSink(base_directory="s3://my-bucket/derivatives"), "sink")
    wf.connect(grab, "func", mean, "in_file")
    wf.connect(mean, "out", sink, "sub-01.@mean")
    return wf


def test_rerun_with_a_grabber_and_a_sink_launches_nothing(cloud, tmp_path, nifti_files):
    """nipype runs grabbers and sinks on every run. Re-run with nothing changed, they
    run on the controller (a LIST each, nothing transferred) instead of booting an
    instance; once their data has changed, the sink goes to an instance again."""
    import nibabel as nib
    import numpy as np

    s3 = boto3.client("s3")
    key = "raw/sub-01/func/sub-01_task-rest_bold.nii.gz"
    s3.upload_file(nifti_files["example4d.nii.gz"], "my-bucket", key)

    def mean_in_s3():
        path = tmp_path / "mean_from_s3.nii.gz"
        s3.download_file("my-bucket", "derivatives/sub-01/mean.nii.gz", str(path))
        return nib.load(path).get_fdata()

    def expected_mean(source):
        return np.asanyarray(nib.load(source).dataobj, dtype="float32").mean(axis=-1)

    _grab_process_sink(tmp_path).run(plugin=_plugin())
    assert np.allclose(mean_in_s3(), expected_mean(nifti_files["example4d.nii.gz"]))
    launched, sent = cloud.proxy.count(action="RunInstances"), _count_jobs(cloud)
    assert sent == 3  # grab, mean and sink all ran on instances the first time

    def data_puts():  # uploads of data: to the sink's prefix or the content store
        return [r.path for r in cloud.proxy.requests if r.method == "PUT"
                and ("/derivatives/" in r.path or "/cas/" in r.path)]

    puts = data_puts()

    _grab_process_sink(tmp_path).run(plugin=_plugin())
    assert cloud.proxy.count(action="RunInstances") == launched
    assert _count_jobs(cloud) == sent
    assert data_puts() == puts

    # new data at the source: the grab (here) fetches it, the step and the sink run on
    # instances again, and the sink's file is the new mean
    four_d = nib.load(nifti_files["example4d.nii.gz"])
    changed = tmp_path / "changed_bold.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(four_d.dataobj)[..., :2] * 2.0, four_d.affine),
             changed)
    s3.upload_file(str(changed), "my-bucket", key)
    _grab_process_sink(tmp_path).run(plugin=_plugin())
    assert _count_jobs(cloud) == sent + 2  # mean and sink
    assert np.allclose(mean_in_s3(), expected_mean(changed))
    assert cloud.live_instances() == []


def _recon(subjects_dir, subject_id):
    """What FreeSurfer's recon-all does to the subjects_dir it is given."""
    import os

    subject = os.path.join(subjects_dir, subject_id)
    os.makedirs(os.path.join(subject, "mri"), exist_ok=True)  # as recon-all -i does
    with open(os.path.join(subject, "mri", "T1.mgz"), "w") as fobj:
        fobj.write(f"T1 of {subject_id}")
    with open(os.path.join(subject, "notes.txt"), "a") as fobj:  # a file it had
        fobj.write("done\n")
    with open(os.path.join(subjects_dir, "recon.log"), "a") as fobj:  # shared by all
        fobj.write(f"{subject_id} done\n")
    os.symlink("mri/T1.mgz", os.path.join(subject, "T1_link.mgz"))
    return os.path.join(subject, "mri", "T1.mgz")


def _read_text(path):
    with open(path) as fobj:
        return fobj.read()


def _tree_of(folder):
    found = {}
    for dirpath, dirnames, names in os.walk(folder):
        for name in names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            found[rel] = ("link", os.readlink(path)) if os.path.islink(path) else \
                _read_text(path)
    return found


def test_what_a_node_writes_into_a_folder_it_was_given_comes_back(cloud, tmp_path, caplog):
    """recon-all writes its subject into the subjects_dir it is given (outside its node
    folder); under Linear the user finds it there, and the next node reads it. On
    EC2Plugin the instance's copy of the folder was all that had it. A file that two
    nodes on different instances both change keeps one version, with a warning."""
    outside = tmp_path / "freesurfer" / "fsaverage"
    outside.mkdir(parents=True)
    (outside / "surf").write_text("template")

    def make_subjects_dir(where):
        for subject in ("sub-01", "sub-02"):
            (where / subject).mkdir(parents=True)
            (where / subject / "notes.txt").write_text("start\n")
        (where / "recon.log").write_text("start\n")
        os.symlink(outside, where / "fsaverage")  # as FreeSurfer links its templates
        return str(where)

    def build(base, subjects_dir):
        wf = Workflow("fs", base_dir=str(base))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        src = Node(IdentityInterface(fields=["subject_id"]), "src")
        src.iterables = ("subject_id", ["sub-01", "sub-02"])
        recon = _fn("recon", _recon, ["subjects_dir", "subject_id"], ["t1"])
        recon.inputs.subjects_dir = subjects_dir
        read = _fn("read", _read_text, ["path"], ["text"])
        wf.connect(src, "subject_id", recon, "subject_id")
        wf.connect(recon, "t1", read, "path")
        return wf

    linear_dir = make_subjects_dir(tmp_path / "subjects_linear")
    build(tmp_path / "linear", linear_dir).run(plugin="Linear")
    ec2_dir = make_subjects_dir(tmp_path / "subjects_ec2")
    result = build(tmp_path / "ec2", ec2_dir).run(plugin=_plugin())

    ec2_tree, linear_tree = _tree_of(ec2_dir), _tree_of(linear_dir)
    assert linear_tree.pop("recon.log") == "start\nsub-01 done\nsub-02 done\n"
    # both lines when the jobs shared an instance (as on one machine); else each
    # instance had its own copy, and the last to end wins, with a warning
    log = ec2_tree.pop("recon.log")
    if log.count("done") == 1:
        assert log in ("start\nsub-01 done\n", "start\nsub-02 done\n")
        assert "which another node changed while it ran" in caplog.text
    else:
        assert log in ("start\nsub-01 done\nsub-02 done\n", "start\nsub-02 done\nsub-01 done\n")
    assert ec2_tree == linear_tree
    assert sorted(ec2_tree) == ["fsaverage", "sub-01/T1_link.mgz", "sub-01/mri/T1.mgz",
                                "sub-01/notes.txt", "sub-02/T1_link.mgz",
                                "sub-02/mri/T1.mgz", "sub-02/notes.txt"]
    assert ec2_tree["sub-01/notes.txt"] == "start\ndone\n"
    assert os.readlink(os.path.join(ec2_dir, "fsaverage")) == str(outside)
    texts = sorted(n.result.outputs.text for n in result.nodes() if n.name == "read")
    assert texts == ["T1 of sub-01", "T1 of sub-02"]
    assert (outside / "surf").read_text() == "template"  # a linked folder is not written

    # a new, empty subjects_dir has no file to stage: it is made on the instance
    empty = tmp_path / "subjects_new"
    empty.mkdir()
    result = build(tmp_path / "ec2_new", str(empty)).run(plugin=_plugin())
    texts = sorted(n.result.outputs.text for n in result.nodes() if n.name == "read")
    assert texts == ["T1 of sub-01", "T1 of sub-02"]
    for subject in ("sub-01", "sub-02"):
        assert (empty / subject / "mri" / "T1.mgz").read_text() == f"T1 of {subject}"


def test_an_absolute_output_path_a_node_is_told_to_write_comes_back(cloud, tmp_path,
                                                                     nifti_files, caplog):
    """``tsnr_file="/data/derivs/tsnr.nii.gz"``: under Linear the file is there, and the
    next node reads it; on an instance it was written where the controller never saw it
    (or not at all: the instance has no /data/derivs). LocalCloud's instances share this
    machine's disk, so the file must be seen to come back through the store."""
    import nibabel as nib
    import numpy as np
    from nipype.algorithms.confounds import TSNR

    derivs = tmp_path / "derivs"
    derivs.mkdir()

    def build(base, out):
        wf = Workflow("abs", base_dir=str(base))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        tsnr = Node(TSNR(in_file=nifti_files["example4d.nii.gz"], tsnr_file=out), "tsnr")
        size = _fn("size", _mean_of_nifti, ["in_file"], ["out"])
        wf.connect(tsnr, "tsnr_file", size, "in_file")
        return wf

    build(tmp_path / "linear", str(derivs / "linear_tsnr.nii.gz")).run(plugin="Linear")
    result = build(tmp_path / "ec2", str(derivs / "ec2_tsnr.nii.gz")).run(plugin=_plugin())
    assert np.allclose(nib.load(derivs / "ec2_tsnr.nii.gz").get_fdata(),
                       nib.load(derivs / "linear_tsnr.nii.gz").get_fdata())
    tsnr = next(n for n in result.nodes() if n.name == "tsnr")
    assert tsnr.result.outputs.tsnr_file == str(derivs / "ec2_tsnr.nii.gz")
    assert _count_jobs(cloud) == 2  # both ran on instances
    assert "abs.tsnr wrote 1 file(s)" in caplog.text  # below the worker root, then here


def _folder_with_links(in_file):
    import os

    folder = os.path.abspath("subject")
    os.makedirs(os.path.join(folder, "surf"))
    with open(os.path.join(folder, "surf", "lh.white"), "w") as fobj:
        fobj.write("white")
    os.symlink(os.path.join(folder, "surf"), os.path.join(folder, "surf_link"))
    os.symlink(os.path.join(folder, "surf", "lh.white"), os.path.join(folder, "white"))
    os.symlink(in_file, os.path.join(folder, "input"))
    os.symlink(os.path.join(folder, "not-made"), os.path.join(folder, "broken"))
    return folder


def _describe_folder(folder):
    import os

    seen = []
    for dirpath, dirnames, names in os.walk(folder):
        dirnames.sort()
        for name in sorted(names + [d for d in dirnames if os.path.islink(
                os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            kind = "link" if os.path.islink(path) else "file"
            target = os.readlink(path).replace(folder, "<folder>") if kind == "link" else ""
            content = open(path).read() if os.path.isfile(path) else None
            seen.append([os.path.relpath(path, folder), kind, target, content])
    return seen


def test_symbolic_links_in_node_folders_arrive_as_links(cloud, tmp_path):
    """A node's links (to its own files and folders, to an input, broken) are made again
    on the controller and on the next node's instance, as Linear leaves them; os.walk
    alone would drop the linked folder and fail on the broken link."""
    in_file = tmp_path / "t1.nii"
    in_file.write_text("input image")

    def build(base):
        wf = Workflow("links", base_dir=str(base))
        wf.config["execution"]["poll_sleep_duration"] = 0.3
        make = _fn("make", _folder_with_links, ["in_file"], ["folder"])
        make.inputs.in_file = str(in_file)
        look = _fn("look", _describe_folder, ["folder"], ["seen"])
        wf.connect(make, "folder", look, "folder")
        return wf

    linear = _outputs(build(tmp_path / "linear").run(plugin="Linear"))
    remote = _outputs(build(tmp_path / "ec2").run(plugin=_plugin(max_instances=1)))
    seen = {row[0]: row for row in remote["links.look"]["seen"]}
    # a link out of the folder handed on is followed: the next instance may not have
    # its target, so it gets the content (the same bytes, as a file)
    assert seen.pop("input") == ["input", "file", "", "input image"]
    assert seen == {row[0]: row for row in linear["links.look"]["seen"]
                    if row[0] != "input"}
    assert seen["surf_link"][1:3] == ["link", "<folder>/surf"]
    assert seen["white"][1:] == ["link", "<folder>/surf/lh.white", "white"]
    assert seen["broken"][1] == "link"
    folder = tmp_path / "ec2" / "links" / "make" / "subject"  # the controller's copy
    assert os.readlink(folder / "surf_link") == str(folder / "surf")
    assert os.readlink(folder / "input") == str(in_file)
    assert os.path.islink(folder / "broken") and not os.path.exists(folder / "broken")
    assert cloud.live_instances() == []


def test_remote_crash_is_an_ordinary_crash_with_the_remote_traceback(cloud, tmp_path):
    wf = Workflow("crashing", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
    bad = _fn("bad", _boom, ["x"], ["y"])
    bad.inputs.x = 42
    wf.add_nodes([bad])
    with pytest.raises(RuntimeError) as err:
        wf.run(plugin=_plugin())
    assert "remote failure for input 42" in str(err.value)
    crashes = list((tmp_path / "crashes").glob("crash-*bad*.pklz"))
    assert len(crashes) == 1
    from nipype.utils.filemanip import loadcrash

    crash = loadcrash(str(crashes[0]))
    text = "".join(crash["traceback"])
    assert "ValueError: remote failure for input 42" in text
    assert "[nipype_s3] node crashing.bad ran as job" in text
    assert "on instance i-" in text and "agent log: s3://my-bucket/nipype-runs/runs/" in text
    assert "[nipype_s3] log tail:" in text
    assert cloud.live_instances() == []


def test_killed_agent_job_is_retried_elsewhere(cloud, tmp_path):
    wf = Workflow("retry", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", [1, 2, 3])
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.seconds = 3
    wf.connect(src, "x", slow, "x")
    plugin = _plugin(agent_vcpus=1, max_instances=2)
    killed = []
    killer = threading.Thread(target=lambda: killed.append(cloud.kill_agent()), daemon=True)
    killer.start()
    result = wf.run(plugin=plugin)
    killer.join(5)
    assert killed and killed[0].startswith("i-")
    values = sorted(n.result.outputs.y for n in result.nodes() if n.name == "slow")
    assert values == [1, 2, 3]
    attempts = [j.report.get("attempt") for j in plugin._by_job_id.values()]
    assert max(attempts) >= 2  # the killed job ran again, on another agent
    assert cloud.live_instances() == []


def test_max_instances_is_never_exceeded(cloud, tmp_path):
    wf = Workflow("wide", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", list(range(6)))
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.seconds = 1
    wf.connect(src, "x", slow, "x")
    plugin = _plugin(agent_vcpus=1, max_instances=2)
    wf.run(plugin=plugin)
    assert cloud.peak_alive <= 2 and plugin.pool.peak <= 2 and plugin.peak <= 2
    assert cloud.peak_alive >= 1
    assert plugin.cost_report["peak_instances"] <= 2
    assert cloud.live_instances() == []


def test_interrupt_leaves_no_instance(cloud, tmp_path):
    wf = Workflow("interrupted", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", [1, 2])
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.seconds = 60
    wf.connect(src, "x", slow, "x")

    class Interrupted(EC2Plugin):
        def _poll(self):
            super()._poll()
            if cloud.proxy.count(action="AmazonSQS.SendMessage") >= 2 and \
                    cloud.busy_agents():
                raise KeyboardInterrupt  # as Ctrl-C in the middle of the run

    with pytest.raises(KeyboardInterrupt):
        wf.run(plugin=Interrupted(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                               **FAST}))
    assert cloud.live_instances() == []
    assert cloud.wait_idle(10)


def test_capacity_failure_is_clear_and_leaves_nothing(cloud, tmp_path):
    cloud.fail_launches("InsufficientInstanceCapacity", times=50)
    wf = Workflow("nocap", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 1
    wf.add_nodes([node])
    with pytest.raises(Exception) as err:
        wf.run(plugin=_plugin())
    assert "EC2 has no capacity for c6i.large right now (InsufficientInstanceCapacity)" \
        in str(err.value)
    assert cloud.live_instances() == []


@pytest.mark.parametrize("args, message", [
    ({"ami": "ami-00000000000000000"}, "AMI 'ami-00000000000000000' cannot be used"),
    ({"iam_instance_profile": "no-such-profile"}, "Instance profile 'no-such-profile' does "
                                                  "not exist"),
])
def test_bad_launch_settings_are_clear(cloud, tmp_path, args, message):
    wf = Workflow("badlaunch", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 1
    wf.add_nodes([node])
    with pytest.raises(Exception) as err:
        wf.run(plugin=_plugin(**args))
    assert message in str(err.value)
    assert cloud.live_instances() == []


def test_an_instance_type_that_does_not_exist_is_named_before_anything_is_made(cloud,
                                                                               tmp_path):
    from nipype_s3 import ConfigurationError

    wf = Workflow("badtype", base_dir=str(tmp_path))
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 1
    wf.add_nodes([node])
    with pytest.raises(ConfigurationError) as err:
        wf.run(plugin=_plugin(instance_type="c9.huge"))
    assert str(err.value).startswith("Instance type 'c9.huge' does not exist in us-east-1 (")
    assert "Check the instance_type (e.g. 'c6i.2xlarge')" in str(err.value)
    assert cloud.proxy.count(action="AmazonSQS.CreateQueue") == 0
    assert cloud.proxy.count(action="RunInstances") == 0
    assert not boto3.client("s3").list_objects_v2(Bucket="my-bucket").get("Contents")


def test_a_node_asking_for_a_type_that_does_not_exist_is_named(cloud, tmp_path):
    from nipype_s3 import ConfigurationError

    wf = Workflow("badnodetype", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("big", _double, ["x"], ["y"])
    node.inputs.x = 1
    node.plugin_args = {"instance_type": "r9.gigantic"}
    wf.add_nodes([node])
    with pytest.raises(ConfigurationError) as err:
        wf.run(plugin=_plugin())
    assert str(err.value).startswith(
        "Node badnodetype.big: Instance type 'r9.gigantic' does not exist in us-east-1 (")
    assert cloud.live_instances() == []
    queues = boto3.client("sqs", region_name="us-east-1").list_queues().get("QueueUrls", [])
    assert not [q for q in queues if "r9" in q]


def test_a_node_bigger_than_its_instance_type_is_named_before_anything_runs(cloud,
                                                                            tmp_path):
    """n_procs=16, mem_gb=20 on a c6i.large (2 vCPUs, 4 GiB): nipype's MultiProc refuses
    such a workflow; on an instance it would be killed for memory, again and again."""
    from nipype_s3 import ConfigurationError

    wf = Workflow("toobig", base_dir=str(tmp_path))
    small = _fn("small", _double, ["x"], ["y"])
    small.inputs.x = 1
    big = Node(Function(input_names=["x"], output_names=["y"], function=_double), "big",
               n_procs=16, mem_gb=20)
    wf.connect(small, "y", big, "x")
    with pytest.raises(ConfigurationError) as err:
        wf.run(plugin=_plugin())
    assert str(err.value).startswith(
        "Node toobig.big asks for 16 CPUs and 20 GB of memory (n_procs, mem_gb), but "
        "c6i.large has 2 vCPUs and 4 GiB. Give it a type that fits (node.plugin_args = "
        "{'instance_type': 'c6i.4xlarge'})")
    assert cloud.proxy.count(action="RunInstances") == 0
    assert _count_jobs(cloud) == 0  # not even the small node ran

    big.plugin_args = {"local": True}  # on the controller: its own business
    wf.run(plugin=_plugin())


def test_controller_calls_per_poll_do_not_grow_with_pending_jobs(cloud, tmp_path):
    wf = Workflow("many", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", list(range(16)))
    node = _fn("a", _double, ["x"], ["y"])
    wf.connect(src, "x", node, "x")
    checks = []

    class Counting(EC2Plugin):
        def _is_pending(self, taskid):
            checks.append(taskid)
            return super()._is_pending(taskid)

    plugin = Counting(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                   "max_instances": 1, "agent_vcpus": 4, **FAST})
    cloud.proxy.clear()
    wf.run(plugin=plugin)
    receives = cloud.proxy.count(action="AmazonSQS.ReceiveMessage")
    describes = cloud.proxy.count(action="DescribeInstances")
    polls = plugin.stats["polls"]
    assert len(checks) > 3 * polls  # nipype asked about every pending job, many times...
    assert receives <= polls + 16 // 10 + 1  # ...but each poll read the events queue once
    assert describes <= polls + 1


def test_user_data_is_small_secret_free_and_valid_bash(cloud, tmp_path):
    import subprocess

    wf = Workflow("ud", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 2
    wf.add_nodes([node])
    wf.run(plugin=_plugin())
    scripts = [os.path.join(i.root, "user-data.sh") for i in cloud.instance_list()]
    assert scripts
    for script in scripts:
        data = open(script, "rb").read()
        assert len(data) < 16 * 1024
        assert subprocess.run(["bash", "-n", script]).returncode == 0
        for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
            assert secret.encode() not in data
        assert b"nipype_s3.agent" in data and b"shutdown -h now" in data


def test_per_node_instance_type_spot_fallback_and_packing(cloud, tmp_path):
    cloud.fail_launches("InsufficientInstanceCapacity", times=2)  # spot is short today
    wf = Workflow("mixed", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", [1, 2, 3])
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.seconds = 2
    big = _fn("big", _double, ["x"], ["y"])
    big.plugin_args = {"instance_type": "r6i.large"}
    wf.connect(src, "x", slow, "x")
    wf.connect(slow, "y", big, "x")
    plugin = _plugin(spot=True, spot_retries=2, max_instances=3, agent_vcpus=4)
    result = wf.run(plugin=plugin)
    assert sorted(n.result.outputs.y for n in result.nodes() if n.name == "big") == [2, 4, 6]
    ec2 = boto3.client("ec2")
    types = {}
    for res in ec2.describe_instances()["Reservations"]:
        for inst in res["Instances"]:
            types.setdefault(inst["InstanceType"], []).append(
                inst.get("InstanceLifecycle", "on-demand"))
    assert set(types) == {"c6i.large", "r6i.large"}
    assert plugin._fleets["c6i.large"].pool.spot_failures == 2  # then on-demand
    # the three slow jobs were packed on one 4-vCPU agent and overlapped in time
    slow_jobs = [j.report for j in plugin._by_job_id.values() if "slow" in j.job_id]
    assert len({r["instance_id"] for r in slow_jobs}) == 1
    spans = sorted((r["started"], r["finished"]) for r in slow_jobs)
    assert spans[1][0] < spans[0][1]
    assert cloud.live_instances() == []


def test_job_longer_than_visibility_timeout_runs_once(cloud, tmp_path):
    wf = Workflow("long", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.x = 7
    slow.inputs.seconds = 10  # visibility_timeout is 6 s: only the heartbeat keeps it ours
    wf.add_nodes([slow])
    plugin = _plugin()
    result = wf.run(plugin=plugin)
    assert next(iter(result.nodes())).result.outputs.y == 7
    (job,) = plugin._by_job_id.values()
    assert job.report["attempt"] == 1
    logs = "".join(i.log() for i in cloud.instance_list())
    assert logs.count(", attempt ") == 1


def test_job_exceeding_its_attempts_is_a_clear_infrastructure_failure(cloud, tmp_path):
    wf = Workflow("doomed", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crashes")
    slow = _fn("slow", _sleep_then, ["x", "seconds"], ["y"])
    slow.inputs.x = 1
    slow.inputs.seconds = 30
    wf.add_nodes([slow])
    plugin = _plugin(max_attempts=1)
    killer = threading.Thread(target=cloud.kill_agent, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError) as err:
        wf.run(plugin=plugin)
    killer.join(5)
    assert "the job was started 1 times and no attempt finished" in str(err.value)
    assert "max_attempts=1" in str(err.value)
    (job,) = plugin._by_job_id.values()
    assert job.report["status"] == "failed"
    assert cloud.live_instances() == []


def test_broken_bootstrap_stops_the_run_instead_of_relaunching(cloud, tmp_path):
    cloud.fail_boots(10)
    wf = Workflow("noboot", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 1
    wf.add_nodes([node])
    plugin = _plugin(max_boot_failures=2, max_instances=1)
    with pytest.raises(Exception) as err:
        wf.run(plugin=plugin)
    assert "ended before their agent started" in str(err.value)
    assert "the bootstrap fails" in str(err.value)
    assert len(cloud.instance_list()) == 2  # it stopped launching after two broken boots
    assert cloud.live_instances() == []


def test_a_hanging_bootstrap_is_ended_and_counted(cloud, tmp_path):
    cloud.hang_boots(10)
    wf = Workflow("hangboot", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    node = _fn("a", _double, ["x"], ["y"])
    node.inputs.x = 1
    wf.add_nodes([node])
    plugin = _plugin(max_boot_failures=2, max_instances=1, boot_timeout=2)
    with pytest.raises(Exception) as err:
        wf.run(plugin=plugin)
    assert "ended before their agent started" in str(err.value)
    assert "boot_timeout=2 s" in str(err.value) and "hangs" in str(err.value)
    hung = cloud.instance_list()
    assert len(hung) == 2  # each ended after boot_timeout; no third launch
    assert all("waiting for the package index" in inst.log() for inst in hung)
    assert cloud.live_instances() == []
    assert cloud.wait_idle(10)  # and their processes were stopped


def _threads_env(x):
    import os

    return f"{x}:{os.environ.get('OMP_NUM_THREADS')}:{os.environ.get('OPENBLAS_NUM_THREADS')}"


def test_one_cpu_jobs_fork_and_multi_cpu_jobs_get_their_threads(cloud, tmp_path):
    wf = Workflow("threads", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    one = _fn("one", _threads_env, ["x"], ["y"])
    one.inputs.x = 1
    two = _fn("two", _threads_env, ["x"], ["y"])
    two.inputs.x = 2
    two.n_procs = 2
    wf.add_nodes([one, two])
    plugin = _plugin(max_instances=1)
    result = wf.run(plugin=plugin)
    outputs = sorted(n.result.outputs.y for n in result.nodes())
    assert outputs == ["1:1:1", "2:2:2"]
    logs = "".join(i.log() for i in cloud.instance_list())
    assert "(threads.one) started in a fork of the agent" in logs
    assert "(threads.two) started in a new interpreter" in logs
    assert cloud.live_instances() == []


def test_a_job_that_cannot_be_sent_stops_the_run_clearly(cloud, tmp_path):
    """Jobs are sent in the background (inputs stored, pickle and spec written, message
    queued); a failure there is the run's error, as it was when sending was inline."""
    import botocore.exceptions

    wf = Workflow("unsendable", base_dir=str(tmp_path))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", [1, 2, 3])
    node = _fn("a", _double, ["x"], ["y"])
    wf.connect(src, "x", node, "x")

    class Denied(EC2Plugin):
        def _deliver(self, name, inputs, raw, spec, queue_url):
            if spec["job_id"].startswith("00001"):
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                     "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
            return super()._deliver(name, inputs, raw, spec, queue_url)

    with pytest.raises(Exception) as err:
        wf.run(plugin=Denied(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                          "max_instances": 1, **FAST}))
    assert "my-bucket" in str(err.value) and "denied" in str(err.value).lower()
    assert "submit a job to" in str(err.value)
    assert cloud.live_instances() == []
