"""Where EC2Plugin runs a node, how it summarises dispatch times, how agents fork workers."""

import json
import os
import sys

import pytest
from nipype import Node
from nipype.interfaces.io import DataSink

from nipype_s3 import S3DataGrabber, S3DataSink
from nipype_s3.agent import forked
from nipype_s3.ec2.jobs import RunLayout
from nipype_s3.plugins.ec2 import (
    _cached_always_run,
    _credential_inputs,
    _input_paths,
    _orchestrates_instances,
    _output_targets,
    _writes_local_files,
    dispatch_summary,
)


@pytest.mark.parametrize("make, local", [
    (lambda tmp: DataSink(base_directory=str(tmp)), True),
    (lambda tmp: DataSink(), True),  # the node's own folder: the controller's
    (lambda tmp: DataSink(base_directory="s3://bucket/out"), False),
    (lambda tmp: S3DataSink(base_directory="s3://bucket/out"), False),
    (lambda tmp: S3DataSink(base_directory="s3://bucket/out", local_copy=str(tmp)), True),
    (lambda tmp: S3DataGrabber(), False),  # into its node's folder, which comes back
    (lambda tmp: S3DataGrabber(local_directory=str(tmp)), True),  # a folder of the user's
])
def test_sinks_writing_the_controllers_folders_run_there(tmp_path, make, local):
    assert _writes_local_files(Node(make(tmp_path), "sink").interface) is local


def test_credentials_and_container_runs_keep_a_node_on_the_controller(tmp_path):
    """A node naming a key file (ours or nipype's DataSink) would have it staged to S3
    and an instance, and a profile of this machine is not on an instance at all;
    EC2ContainerRun would bill an instance to wait for another."""
    from nipype_s3 import EC2ContainerRun

    keyed = [S3DataSink(base_directory="s3://b/o", creds_path=str(tmp_path / "k.csv")),
             S3DataGrabber(creds_path="/keys.csv"),
             DataSink(base_directory="s3://b/o", creds_path="/keys.csv")]
    assert [_credential_inputs(i) for i in keyed] == [["creds_path"]] * 3
    assert _credential_inputs(EC2ContainerRun(data_creds_path="/d.csv")) == ["data_creds_path"]
    assert _credential_inputs(S3DataSink(base_directory="s3://b/o", profile="lab")) == [
        "profile"]
    assert _credential_inputs(S3DataSink(base_directory="s3://b/o")) == []
    assert _credential_inputs(DataSink(base_directory="s3://b/o")) == []
    assert _orchestrates_instances(EC2ContainerRun(command="true"))
    assert not _orchestrates_instances(S3DataSink())


def _two_args(path, other):
    return path, other


def test_staged_inputs_are_the_nodes_paths_not_its_commands_environment(tmp_path):
    """``environ`` holds paths of the instance's own (FSLDIR, FREESURFER_HOME, HOME):
    staging them would copy software installs, or a home folder, through S3."""
    from nipype import Function
    from nipype.interfaces.base import CommandLine

    data = tmp_path / "t1.nii"
    data.write_text("x")
    cmd = Node(CommandLine("ls", args=str(data), environ={
        "FSLDIR": str(tmp_path), "HOME": os.path.expanduser("~")}), "cmd")
    assert _input_paths(cmd) == [str(data)]  # the argument, not the environment
    fn = Node(Function(input_names=["path", "other"], output_names=["n"],
                       function=_two_args), "fn")
    fn.inputs.path = str(data)
    fn.inputs.other = {"nested": [str(tmp_path)]}
    assert _input_paths(fn) == [str(data), str(tmp_path)]


def test_output_targets_are_new_paths_in_existing_folders(tmp_path):
    """``out_file="/data/derivs/brain.nii.gz"``: a path to write, in a folder that
    exists; not an input that exists, nor a path in no folder, nor the environment."""
    from nipype import Function

    data = tmp_path / "t1.nii"
    data.write_text("x")
    fn = Node(Function(input_names=["path", "other"], output_names=["n"],
                       function=_two_args), "fn")
    fn.inputs.path = str(data)
    fn.inputs.other = [str(tmp_path / "brain.nii.gz"), "/no/such/folder/x.nii",
                       "/top-level.nii", "relative.nii"]
    assert _output_targets(fn) == [str(tmp_path / "brain.nii.gz")]


def test_an_interface_defined_in_the_users_script_runs_on_the_controller(caplog):
    """An instance cannot import ``__main__.MyInterface``: sent there, the job failed to
    unpickle after an instance had been paid for."""
    from nipype.interfaces.base import BaseInterfaceInputSpec, SimpleInterface, TraitedSpec

    from nipype_s3 import EC2Plugin

    class MyInterface(SimpleInterface):  # as if written in the script itself
        input_spec = BaseInterfaceInputSpec
        output_spec = TraitedSpec

    MyInterface.__module__ = "__main__"
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/runs"})
    assert plugin._runs_locally(Node(MyInterface(), "mine"))
    assert "defined in the script that runs the workflow" in caplog.text
    MyInterface.__module__ = "mylab.interfaces"
    assert not plugin._runs_locally(Node(MyInterface(), "mine"))


def test_always_run_nodes_come_back_here_only_when_nothing_they_read_changed(tmp_path):
    """nipype reruns grabbers and sinks every time; once they ran with these inputs and
    no input file changed since, the re-run is a check the controller makes itself."""
    from copy import deepcopy

    from nipype import config
    from nipype.interfaces.io import SelectFiles

    data = tmp_path / "bids"
    (data / "sub-01").mkdir(parents=True)
    (data / "sub-01" / "T1w.nii").write_text("image")

    def node(**kw):
        made = Node(SelectFiles({"t1": "sub-01/T1w.nii"}, base_directory=str(data)),
                    "select", base_dir=str(tmp_path / "work"))
        made.config = deepcopy(config._sections)  # as a workflow gives its nodes
        for name, value in kw.items():
            setattr(made, name, value)
        return made

    assert not _cached_always_run(node())  # never ran
    node().run()
    assert _cached_always_run(node())
    assert not _cached_always_run(node(overwrite=True))  # the user asked for a real run
    os.utime(data / "sub-01" / "T1w.nii", (4e9, 4e9))  # a file below an input folder
    assert not _cached_always_run(node())
    ordinary = Node(DataSink(), "not_always")
    ordinary.interface._always_run = False
    assert not _cached_always_run(ordinary)


def test_dispatch_summary_median_and_p95():
    timings = [{"submitted": 0.0, "node_started": float(i), "node_finished": i + 1.0,
                "collected": i + 1.5} for i in range(1, 21)]
    timings.append({"submitted": 0.0, "node_started": None, "node_finished": None,
                    "collected": 3.0})  # a job that never ran its node: not counted
    summary = dispatch_summary(timings)
    assert summary["jobs"] == 21
    assert summary["to_start"] == {"median": 10.5, "p95": 19.0}
    assert summary["to_seen"] == {"median": 0.5, "p95": 0.5}
    assert summary["queued"] is None  # no "received" times given
    empty = dispatch_summary([])
    assert empty["jobs"] == 0 and all(v is None for k, v in empty.items() if k != "jobs")


def test_forked_worker_runs_with_its_own_streams_env_and_folder(tmp_path, monkeypatch):
    """The child gets the job's log as stdout/stderr, the job's env and folder, and its
    exit code comes back; the agent's own environment is left alone."""
    monkeypatch.setattr(forked, "_preloaded", True)
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored whatever the child does
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    log = tmp_path / "log.txt"

    def fake_main(argv):
        print("child says", os.environ["JOB_VAR"], os.getcwd(), argv[0], flush=True)
        json.dump({"ok": True}, open(argv[1], "w"))
        return 3

    import nipype_s3.agent.worker as worker

    monkeypatch.setattr(worker, "main", fake_main)
    proc = forked.ForkedWorker.start(str(spec), str(tmp_path / "out.json"), str(log),
                                     str(tmp_path), {"JOB_VAR": "v1"})
    assert proc.wait() == 3
    assert proc.poll() == 3
    assert "JOB_VAR" not in os.environ
    assert log.read_text().strip() == f"child says v1 {tmp_path} {spec}"
    assert json.loads((tmp_path / "out.json").read_text()) == {"ok": True}


def test_forked_worker_crash_is_an_exit_code_with_a_traceback_in_the_log(tmp_path,
                                                                        monkeypatch):
    import nipype_s3.agent.worker as worker

    def boom(argv):
        raise RuntimeError("worker blew up")

    monkeypatch.setattr(worker, "main", boom)
    log = tmp_path / "log.txt"
    proc = forked.ForkedWorker.start("s", "o", str(log), str(tmp_path), {})
    assert proc.wait() == 1
    assert "RuntimeError: worker blew up" in log.read_text()


def test_forked_worker_can_be_killed(tmp_path, monkeypatch):
    import nipype_s3.agent.worker as worker

    def hang(argv):
        import time

        time.sleep(60)

    monkeypatch.setattr(worker, "main", hang)
    proc = forked.ForkedWorker.start("s", "o", str(tmp_path / "log"), str(tmp_path), {})
    assert proc.poll() is None
    proc.kill()
    assert proc.wait() == -9


def test_no_fork_unless_preloaded_and_single_threaded(monkeypatch):
    import threading

    monkeypatch.setattr(forked, "_preloaded", False)
    assert not forked.can_fork()
    monkeypatch.setattr(forked, "_preloaded", True)
    # native threads count too (a CRT event loop started by an earlier test, say)
    assert forked.can_fork() is (threading.active_count() == 1 and forked._os_threads() == 1)
    stop = threading.Event()
    extra = threading.Thread(target=stop.wait)
    extra.start()
    try:
        assert not forked.can_fork()
    finally:
        stop.set()
        extra.join()


def test_a_failed_fork_closes_what_it_opened(tmp_path, monkeypatch):
    def no_fork():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(os, "fork", no_fork)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="allocate"):
        forked.ForkedWorker.start("s", "o", str(tmp_path / "log"), str(tmp_path), {})
    assert len(os.listdir("/proc/self/fd")) == before


def _finished_jobs(n):
    from nipype_s3.plugins.ec2 import _Job

    return [_Job(i, f"{i:05d}-n", Node(DataSink(), f"n{i}"), f"/nowhere/{i}", 0.0, 1, 0.0)
            for i in range(n)]


def test_jobs_that_end_together_are_fetched_together():
    """Fetching a result is a few requests, mostly waiting: jobs seen in one poll are
    fetched at once (if one after the other, the barrier would never fill)."""
    import threading

    from nipype_s3 import EC2Plugin

    jobs = _finished_jobs(3)
    together = threading.Barrier(3, timeout=30)
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://bucket/runs"})

    def fetch(job):
        together.wait()
        job.report = {"status": "ok", "started": 1.0, "finished": 3.0}
        return 4.0

    plugin._fetch = fetch
    plugin._collect(jobs)
    assert all(job.done for job in jobs) and plugin.stats["remote_done"] == 3
    assert plugin._busy_seconds == 6.0 and [t["collected"] for t in plugin.timings] == [4.0] * 3


def test_a_failed_fetch_is_charged_to_its_own_job_only(tmp_path):
    """Collecting job 1 fails (a full disk): jobs 0 and 2 are booked as finished, job 1
    gets a crash file saying why, and nothing escapes into nipype's loop (which would
    report whichever node it polled as crashed)."""
    from nipype.utils.filemanip import loadpkl

    from nipype_s3 import EC2Plugin
    from nipype_s3.plugins.ec2 import _Job

    jobs = [_Job(i, f"{i:05d}-n", Node(DataSink(), f"n{i}", base_dir=str(tmp_path)),
                 str(tmp_path / f"n{i}"), 0.0, 1, 0.0) for i in range(3)]
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://bucket/runs"})
    plugin.layout = RunLayout("bucket", "runs", "r1")

    def fetch(job):
        if job.taskid == 1:
            raise OSError("disk full")
        job.report = {"status": "ok"}
        return 1.0

    plugin._fetch = fetch
    plugin._collect(jobs)
    assert [job.done for job in jobs] == [True, True, True]
    assert [job.report for job in jobs] == [{"status": "ok"}, None, {"status": "ok"}]
    crash = loadpkl(str(tmp_path / "n1" / "result_n1.pklz"))
    assert "OSError: disk full" in "".join(crash["traceback"])
    assert "could not be brought back" in "".join(crash["traceback"])
    assert not (tmp_path / "n0" / "result_n0.pklz").exists()


def test_a_transient_fetch_error_leaves_the_job_for_the_next_poll():
    import botocore.exceptions

    from nipype_s3 import EC2Plugin

    jobs = _finished_jobs(2)
    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://bucket/runs"})

    def fetch(job):
        if job.taskid == 1:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3")
        job.report = {"status": "ok"}
        return 1.0

    plugin._fetch = fetch
    plugin._collect(jobs)
    assert [job.done for job in jobs] == [True, False]


def test_instances_end_before_the_run_waits_for_a_send_under_way():
    """A job still being sent when the run stops (Ctrl-C, an error) is not waited for
    while instances run: they are terminated first; jobs not started are not sent."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nipype_s3 import EC2Plugin

    plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://bucket/runs"})
    order, release = [], threading.Event()
    plugin._senders = ThreadPoolExecutor(max_workers=1)
    under_way = plugin._senders.submit(lambda: release.wait(30) and order.append("sent"))
    queued = plugin._senders.submit(order.append, "queued job sent")

    def terminate():
        order.append("terminated")
        release.set()

    plugin._terminate_instances = terminate
    plugin._finish_run()
    assert order == ["terminated", "sent"]
    assert under_way.done() and queued.cancelled()


@pytest.mark.parametrize("args, message", [
    ({"instance_typo": "c6i.large"},
     "EC2Plugin does not know plugin_args 'instance_typo' (did you mean 'instance_type'?); "
     "the known ones are ["),
    ({"colour": "blue"}, "EC2Plugin does not know plugin_args 'colour'; the known ones are ["),
    ({"max_instances": 0}, "EC2Plugin plugin_args['max_instances'] must be at least 1, not 0."),
    ({}, "EC2Plugin needs plugin_args['s3_prefix']"),
])
def test_bad_plugin_args_are_named_before_anything_runs(args, message):
    from nipype_s3 import ConfigurationError, EC2Plugin

    with pytest.raises(ConfigurationError) as err:
        EC2Plugin(plugin_args={"s3_prefix": "s3://bucket/runs", **args} if args else {})
    assert str(err.value).startswith(message)


def test_a_report_writes_back_only_into_what_the_job_may_write(tmp_path, caplog):
    """The controller puts a job's written files in place only within the folders it
    was given and the paths it was told to write; a file another node changed
    meanwhile is replaced with a warning."""
    import boto3
    from moto import mock_aws

    from nipype_s3 import EC2Plugin
    from nipype_s3.pickles import PathMap
    from nipype_s3.plugins.ec2 import _Job
    from nipype_s3.s3.cas import ContentStore

    worker = tmp_path / "worker"
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    (subjects / "log.txt").write_text("changed here meanwhile")
    made = {"subjects/sub-01/T1.mgz": "T1", "subjects/log.txt": "the job's log",
            "elsewhere/evil.txt": "not asked for"}
    for rel, text in made.items():
        path = worker / str(tmp_path).lstrip("/") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="my-bucket")
        plugin = EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/runs"})
        plugin.store = ContentStore(client, "my-bucket", "runs")
        entries = plugin.store.put([str(worker / str(tmp_path).lstrip("/") / rel)
                                    for rel in made], expand_dirs=False)
        report = {"written": [dict(e.to_json(), was=[5, 1.0]) for e in entries]}
        job = _Job(1, "00001-recon", Node(DataSink(), "recon"), str(tmp_path / "n"), 0.0,
                   1, 0.0, writable=(str(subjects),))
        plugin._write_back(job, report, PathMap(str(worker)))
    assert (subjects / "sub-01" / "T1.mgz").read_text() == "T1"
    assert (subjects / "log.txt").read_text() == "the job's log"
    assert not (tmp_path / "elsewhere").exists()
    assert "reported 1 file(s) outside what it may write" in caplog.text
    assert "log.txt, which another node changed while it ran" in caplog.text


def test_the_type_suggested_for_a_big_node_is_the_cheapest_that_fits():
    from nipype_s3.ec2.pricing import smallest_fitting

    assert smallest_fitting(16, 20, "c6i.large") == "c6i.4xlarge"
    assert smallest_fitting(2, 12, "c6i.large") == "r5.large"  # no c6i has the memory
    assert smallest_fitting(1, 1, "m5.large") == "t3.micro"
    assert smallest_fitting(64, 512) is None
