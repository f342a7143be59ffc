"""BatchPlugin on LocalCloud's Batch (real containers): agents as Batch jobs give the
same results as Linear, an immediate re-run submits nothing, every agent job ends with
the run, a job definition is registered once per image and shape across runs, and an
image that cannot run fails the run saying what Batch said."""

from __future__ import annotations

import boto3
import pytest
from nipype import Function, JoinNode, MapNode, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

from nipype_s3 import BatchPlugin
from nipype_s3.backends.batch.jobs import _BOOT
from nipype_s3.exceptions import BatchError, ConfigurationError
from nipype_s3.testing import LocalCloud

from .test_ec2plugin import _mean_of_nifti  # the same real NIfTI step

pytestmark = [pytest.mark.docker, pytest.mark.slow]

#: AWS Batch's limits (moto holds none; LocalCloud holds them too)
SUBMIT_BYTES, OVERRIDES_CHARS, ARRAY_SIZE, DESCRIBE_IDS = 30 * 1024, 8192, 10_000, 100


@pytest.fixture(autouse=True)
def batch_calls(monkeypatch):
    """A botocore hook on every Batch client made during the test: each call is held
    against AWS's limits before it is sent, and recorded (operation, request body)."""
    import json

    import botocore.session

    calls, broken = [], []

    def check(model, params, **_):
        body = params.get("body") or b"{}"
        data = json.loads(body)
        calls.append((model.name, data))
        if model.name == "SubmitJob":
            overrides = json.dumps(data.get("containerOverrides") or {},
                                   separators=(",", ":"))
            size = (data.get("arrayProperties") or {}).get("size")
            if len(body) > SUBMIT_BYTES or len(overrides) > OVERRIDES_CHARS or \
                    (size is not None and not 2 <= size <= ARRAY_SIZE) or data.get(
                        "dependsOn"):
                broken.append((model.name, len(body), len(overrides), size))
        if model.name == "DescribeJobs" and len(data.get("jobs", [])) > DESCRIBE_IDS:
            broken.append((model.name, len(data["jobs"])))

    create = botocore.session.Session.create_client

    def create_client(self, service_name, *args, **kwargs):
        client = create(self, service_name, *args, **kwargs)
        if service_name == "batch":
            client.meta.events.register("before-call.batch.*", check)
        return client

    monkeypatch.setattr(botocore.session.Session, "create_client", create_client)
    yield calls
    assert broken == []


def _registrations(calls) -> int:
    return sum(1 for name, _ in calls if name == "RegisterJobDefinition")


def _square(x):
    return x * x


def _total(values):
    return sum(values)


def _workflow(base_dir):
    wf = Workflow("batched", base_dir=str(base_dir))
    src = Node(IdentityInterface(fields=["subject"]), name="src")
    src.iterables = ("subject", [1, 2, 3, 4])
    square = Node(Function(input_names=["x"], output_names=["y"], function=_square),
                  name="square")
    many = MapNode(Function(input_names=["x"], output_names=["y"], function=_square),
                   iterfield=["x"], name="many")
    many.inputs.x = [5, 6]
    join = JoinNode(Function(input_names=["values"], output_names=["total"],
                             function=_total), joinsource="src", joinfield="values",
                    name="join")
    wf.connect(src, "subject", square, "x")
    wf.connect(square, "y", join, "values")
    wf.add_nodes([many])
    return wf


def _results(result):
    out = {}
    for node in result.nodes():
        outputs = node.result.outputs
        if outputs is not None:
            values = outputs.trait_get() if hasattr(outputs, "trait_get") else \
                outputs.dictcopy()
            out[node.fullname] = {k: v for k, v in values.items() if not k.startswith("_")}
    return out


def _plugin(image, **more):
    return BatchPlugin(plugin_args=dict({
        "s3_prefix": "s3://batch-runs/runs", "job_queue": "nipype-s3-local",
        "image": image, "idle_timeout": 5, "max_agents": 2}, **more))


def test_same_results_as_linear_rerun_submits_nothing_all_agents_ended(
        docker_images, tmp_path, batch_calls):
    linear = _results(_workflow(tmp_path / "linear").run(plugin="Linear"))
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        plugin = _plugin(docker_images["test"])
        remote = _results(_workflow(tmp_path / "batch").run(plugin=plugin))
        assert cloud.batch.submitted >= 1 and plugin.stats["remote_done"] >= 6
        assert plugin.cost_report["vcpu_seconds"] > 0
        jobs = cloud.batch.jobs.values()
        assert all(j["status"] in ("SUCCEEDED", "FAILED") for j in jobs)
        submitted = cloud.batch.submitted
        again = _results(_workflow(tmp_path / "batch").run(plugin=_plugin(
            docker_images["test"])))
        assert cloud.batch.submitted == submitted  # the re-run submitted nothing
        definitions = cloud.client("batch", direct=True).describe_job_definitions(
            status="ACTIVE")["jobDefinitions"]
    assert remote == linear and again == linear
    assert len([d for d in definitions if d["jobDefinitionName"].startswith("nipype-s3-")]) \
        == 1  # one per image and shape, across both runs
    assert _registrations(batch_calls) == 1
    assert {name for name, _ in batch_calls} >= {"SubmitJob", "DescribeJobs",
                                                  "TerminateJob"}


def test_an_image_that_cannot_run_stops_the_run_saying_why(docker_images, tmp_path):
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        with pytest.raises(BatchError) as err:
            _workflow(tmp_path / "w").run(plugin=_plugin("nipype-s3-test/not-here:1",
                                                         max_boot_failures=2))
        jobs = list(cloud.batch.jobs.values())
    assert "CannotPullContainerError" in str(err.value)
    assert "nipype-s3 check-image" in str(err.value)
    assert all(j["status"] in ("SUCCEEDED", "FAILED") for j in jobs)


def test_settings_are_checked_before_anything_is_submitted(tmp_path):
    with pytest.raises(ConfigurationError, match="job_queue"):
        BatchPlugin(plugin_args={"s3_prefix": "s3://batch-runs/runs", "image": "a/b:1"})
    with pytest.raises(ConfigurationError, match="'image'"):
        BatchPlugin(plugin_args={"s3_prefix": "s3://batch-runs/runs", "job_queue": "q"})
    with pytest.raises(ConfigurationError, match="MultiProc's"):
        BatchPlugin(plugin_args={"s3_prefix": "s3://batch-runs/runs", "job_queue": "q",
                                 "image": "a/b:1", "n_procs": 4})


def _sleep_then(x, seconds):
    import time

    time.sleep(seconds)
    return x


def _slow_workflow(base_dir, seconds, values=(1, 2)):
    wf = Workflow("slow", base_dir=str(base_dir))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["x"]), name="src")
    src.iterables = ("x", list(values))
    slow = Node(Function(input_names=["x", "seconds"], output_names=["y"],
                         function=_sleep_then), name="slow")
    slow.inputs.seconds = seconds
    wf.connect(src, "x", slow, "x")
    return wf


FAST = {"visibility_timeout": 6, "heartbeat": 1.5, "poll_wait": 1, "lease_timeout": 8}


def test_a_spot_reclaim_mid_node_runs_it_again_once_and_throttling_is_waited_out(
        docker_images, tmp_path):
    import threading

    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        cloud.batch.throttle("SubmitJob", times=2)  # the first submits: backed off
        plugin = _plugin(docker_images["test"], agent_vcpus=1, **FAST)
        reclaimed = []

        def reclaim_once_busy():
            import time

            deadline = time.time() + 90
            while time.time() < deadline and not reclaimed:
                if any(j.started for j in plugin._by_job_id.values()):
                    reclaimed.append(cloud.batch.reclaim())
                time.sleep(0.2)

        killer = threading.Thread(target=reclaim_once_busy, daemon=True)
        killer.start()
        result = _slow_workflow(tmp_path, 3).run(plugin=plugin)
        killer.join(5)
    assert reclaimed
    assert sorted(n.result.outputs.y for n in result.nodes() if n.name == "slow") == [1, 2]
    attempts = sorted(j.report.get("attempt") for j in plugin._by_job_id.values())
    assert attempts[-1] == 2 and attempts[0] == 1  # the reclaimed node ran again, once


def test_interrupt_terminates_every_agent_job(docker_images, tmp_path):
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")

        class Interrupted(BatchPlugin):
            def _poll(self):
                super()._poll()
                if any(j.started for j in self._by_job_id.values()):
                    raise KeyboardInterrupt  # as Ctrl-C in the middle of the run

        plugin = Interrupted(plugin_args={
            "s3_prefix": "s3://batch-runs/runs", "job_queue": "nipype-s3-local",
            "image": docker_images["test"], "idle_timeout": 30, **FAST})
        with pytest.raises(KeyboardInterrupt):
            _slow_workflow(tmp_path, 60).run(plugin=plugin)
        statuses = {j["jobId"]: (j["status"], j.get("statusReason")) for j in
                    cloud.batch.jobs.values()}
    assert statuses and all(s in ("SUCCEEDED", "FAILED") for s, _ in statuses.values())
    assert any(reason and reason.startswith("nipype-s3 run ") for _, reason in
               statuses.values())


def test_a_node_that_asks_runs_as_a_batch_job_of_its_own(docker_images, tmp_path):
    wf = _workflow(tmp_path / "own")
    big = wf.get_node("join")
    big.plugin_args = {"batch": "job"}
    big.n_procs, big._mem_gb = 1, 1.5  # as Node(..., n_procs=1, mem_gb=1.5) sets them
    linear = _results(_workflow(tmp_path / "linear").run(plugin="Linear"))
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        remote = _results(wf.run(plugin=_plugin(docker_images["test"])))
        jobs = list(cloud.batch.jobs.values())
    assert remote == linear
    own = [j for j in jobs if j["jobName"].endswith("-node")]
    # done by itself, or ended with the run a moment before it would have been
    assert own and all(j["status"] == "SUCCEEDED" or j["statusReason"].startswith(
        "nipype-s3 run ") for j in own)
    assert {j["container"]["vcpus"] for j in own} == {1}
    assert {j["container"]["memory"] for j in own} == {1536}
    with pytest.raises(ConfigurationError, match="can only be 'job'"):
        big.plugin_args = {"batch": "array"}
        wf.run(plugin=_plugin(docker_images["test"]))


def _sleeper(batch, image):
    return batch.register_job_definition(
        jobDefinitionName="nipype-s3-sleeper", type="container", containerProperties={
            "image": image, "command": ["sleep", "300"],
            "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                     {"type": "MEMORY", "value": "512"}]},
    )["jobDefinitionArn"]


def test_cleanup_ends_the_batch_jobs_a_dead_controller_left(docker_images):
    from nipype_s3.ops import cleanup

    with LocalCloud() as cloud:
        batch = boto3.client("batch")
        definition = _sleeper(batch, docker_images["test"])
        run = "20261206-070000-abc123"
        ours = batch.submit_job(jobName=f"nipype-s3-{run}-agents", jobQueue=cloud.batch.QUEUE,
                                jobDefinition=definition)["jobId"]
        other = batch.submit_job(jobName="someone-elses", jobQueue=cloud.batch.QUEUE,
                                 jobDefinition=definition)["jobId"]
        assert cleanup(run_id=run, dry_run=True)["batch_jobs"] == [ours]
        assert cloud.batch.jobs[ours]["status"] not in ("SUCCEEDED", "FAILED")
        assert cleanup(run_id=run)["batch_jobs"] == [ours]
        assert cloud.batch.jobs[ours]["status"] == "FAILED"
        assert cloud.batch.jobs[ours]["statusReason"] == f"nipype-s3 cleanup of run {run}"
        assert cloud.batch.jobs[other]["status"] not in ("SUCCEEDED", "FAILED")


def test_a_job_definition_is_reused_only_when_it_holds_exactly_what_the_run_needs():
    """Anyone who may register job definitions can add a revision under a name they can
    work out: it is not used (an attacker's image, privileged)."""
    with LocalCloud(boot="direct") as cloud:
        plugin = BatchPlugin(plugin_args={"s3_prefix": "s3://batch-runs/runs",
                                          "job_queue": "nipype-s3-local", "image": "a/b:1"})
        plugin.batch = cloud.client("batch")
        first = plugin._job_definition("a/b:1")
        name = first.rsplit("/", 1)[1].split(":")[0]
        plugin.batch.register_job_definition(
            jobDefinitionName=name, type="container", containerProperties={
                "image": "attacker/evil:latest", "command": ["sh"], "privileged": True,
                "resourceRequirements": [{"type": "VCPU", "value": "2"},
                                         {"type": "MEMORY", "value": "4096"}]})
        assert plugin._job_definition("a/b:1") == first
        assert plugin._job_definition("a/b:1").endswith(":1")
        # the same container, with what else a definition may hold: not reused either
        same = {"image": "a/b:1", "command": ["python3", "-c", _BOOT],
                "resourceRequirements": [{"type": "VCPU", "value": "2"},
                                         {"type": "MEMORY", "value": "4096"}]}
        for extra, top in (({"logConfiguration": {"logDriver": "splunk", "options": {
                "splunk-url": "https://attacker.example"}}}, {}),
                ({"ulimits": [{"name": "nofile", "softLimit": 16, "hardLimit": 16}]}, {}),
                ({}, {"timeout": {"attemptDurationSeconds": 60}}),
                ({}, {"retryStrategy": {"attempts": 10}})):
            plugin.batch.register_job_definition(
                jobDefinitionName=name, type="container",
                containerProperties=dict(same, **extra), **top)
            assert plugin._job_definition("a/b:1") == first, (extra, top)


def test_cleanup_by_a_shortened_run_id_ends_no_batch_job(docker_images):
    from nipype_s3.ops import cleanup

    with LocalCloud() as cloud:
        batch = boto3.client("batch")
        definition = _sleeper(batch, docker_images["test"])
        job = batch.submit_job(jobName="nipype-s3-20261206-070000-abc123-agents",
                               jobQueue=cloud.batch.QUEUE, jobDefinition=definition)["jobId"]
        assert cleanup(run_id="20261206")["batch_jobs"] == []
        assert cleanup(run_id="20261206-070000-abc12")["batch_jobs"] == []
        assert cloud.batch.jobs[job]["status"] not in ("SUCCEEDED", "FAILED")


def _fails(x):
    print(f"about to fail on subject {x}")
    raise ValueError(f"bad subject {x}")


def test_a_failing_node_crash_file_has_the_traceback_batch_job_log_stream_and_tail(
        docker_images, tmp_path):
    wf = Workflow("failing", base_dir=str(tmp_path / "wf"))
    wf.config["execution"].update(crashdump_dir=str(tmp_path / "crash"),
                                  crashfile_format="txt", poll_sleep_duration=0.3)
    node = Node(Function(input_names=["x"], output_names=["y"], function=_fails),
                name="fails")
    node.inputs.x = 7
    wf.add_nodes([node])
    with LocalCloud() as cloud:
        boto3.client("s3").create_bucket(Bucket="batch-runs")
        with pytest.raises(RuntimeError):
            wf.run(plugin=_plugin(docker_images["test"]))
        streams = {j["jobId"]: j["container"].get("logStreamName")
                   for j in cloud.batch.jobs.values()}
    (crash,) = (tmp_path / "crash").glob("crash-*fails*.txt")
    text = crash.read_text()
    assert "ValueError: bad subject 7" in text
    assert "about to fail on subject 7" in text  # the job's own log, its last lines
    (agent,) = [j for j, stream in streams.items() if stream and f"on Batch job {j} " in text]
    assert ("[nipype_s3] job queue nipype-s3-local; CloudWatch Logs group /aws/batch/job, "
            f"stream {streams[agent]}") in text


def _double(x):
    return 2 * x


def _study(base_dir, nifti, sink_to, own_jobs=False):
    """The shapes of the issue: iterables over 25 subjects joined by a JoinNode, a
    MapNode over 30 items, a real NIfTI step, and grab -> process -> sink."""
    from nipype_s3 import S3DataGrabber, S3DataSink

    wf = Workflow("study", base_dir=str(base_dir))
    wf.config["execution"]["poll_sleep_duration"] = 0.3
    src = Node(IdentityInterface(fields=["subject"]), name="src")
    src.iterables = ("subject", list(range(1, 26)))
    square = Node(Function(input_names=["x"], output_names=["y"], function=_square),
                  name="square")
    join = JoinNode(Function(input_names=["values"], output_names=["total"],
                             function=_total), joinsource="src", joinfield="values",
                    name="join")
    many = MapNode(Function(input_names=["x"], output_names=["y"], function=_double),
                   iterfield=["x"], name="many")
    many.inputs.x = list(range(30))
    nifti_mean = Node(Function(input_names=["in_file"], output_names=["out"],
                               function=_mean_of_nifti), name="nifti_mean")
    nifti_mean.inputs.in_file = nifti
    grab = Node(S3DataGrabber(outfields=["func"]), "grab")
    grab.inputs.bucket = "batch-runs"
    grab.inputs.bucket_path = "raw/"
    grab.inputs.template = "*"
    grab.inputs.field_template = {"func": "sub-01/func/*_bold.nii.gz"}
    grab.inputs.template_args = {"func": [[]]}
    grabbed_mean = Node(Function(input_names=["in_file"], output_names=["out"],
                                 function=_mean_of_nifti), name="grabbed_mean")
    sink = Node(S3DataSink(base_directory=f"s3://batch-runs/{sink_to}"), "sink")
    wf.connect(src, "subject", square, "x")
    wf.connect(square, "y", join, "values")
    wf.connect(grab, "func", grabbed_mean, "in_file")
    wf.connect(grabbed_mean, "out", sink, "sub-01.@mean")
    wf.add_nodes([many, nifti_mean])
    if own_jobs:  # not the 25 subjects' and 30 items' nodes: each job boots an agent
        # (about 8 s a wave of 8 here; all 60 take 80 s, too long for CI's budget)
        for node in (join, nifti_mean, grab, grabbed_mean, sink):
            node.plugin_args = {"batch": "job"}
    return wf


def _files_and_values(result, base_dir):
    import hashlib

    out = {}
    for node in result.nodes():
        for name, value in _results_of(node).items():
            values = value if isinstance(value, list) else [value]
            out[f"{node.fullname}.{name}"] = [
                hashlib.sha256(open(v, "rb").read()).hexdigest()
                if isinstance(v, str) and v.startswith(str(base_dir)) else v for v in values]
    return out


def _results_of(node):
    outputs = node.result.outputs
    if outputs is None:
        return {}
    values = outputs.trait_get() if hasattr(outputs, "trait_get") else outputs.dictcopy()
    return {k: v for k, v in values.items() if not k.startswith("_")}


@pytest.mark.parametrize("own_jobs", [False, True], ids=["agents", "a-job-per-node"])
def test_the_issue_shapes_match_linear_byte_for_byte_in_both_modes(
        docker_images, tmp_path, nifti_files, own_jobs, batch_calls):
    import hashlib

    with LocalCloud() as cloud:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="batch-runs")
        s3.upload_file(nifti_files["example4d.nii.gz"], "batch-runs",
                       "raw/sub-01/func/sub-01_task-rest_bold.nii.gz")
        base_linear, base_batch = tmp_path / "linear", tmp_path / "batch"
        linear = _files_and_values(_study(base_linear, nifti_files["functional.nii"],
                                          "linear").run(plugin="Linear"), base_linear)
        remote = _files_and_values(_study(base_batch, nifti_files["functional.nii"], "batch",
                                          own_jobs).run(plugin=_plugin(
            docker_images["test"], max_agents=3)), base_batch)
        sunk = {where: hashlib.sha256(s3.get_object(
            Bucket="batch-runs", Key=f"{where}/sub-01/mean.nii.gz")["Body"].read()).hexdigest()
            for where in ("linear", "batch")}
        own = [j for j in cloud.batch.jobs.values() if j["jobName"].endswith("-node")]
        assert all(j["status"] in ("SUCCEEDED", "FAILED") for j in cloud.batch.jobs.values())
    assert remote.pop("study.sink.out_file") == ["s3://batch-runs/batch/sub-01/mean.nii.gz"]
    assert linear.pop("study.sink.out_file") == ["s3://batch-runs/linear/sub-01/mean.nii.gz"]
    assert remote == linear
    assert sunk["linear"] == sunk["batch"]
    assert len(own) == (5 if own_jobs else 0)
    assert _registrations(batch_calls) == 1
