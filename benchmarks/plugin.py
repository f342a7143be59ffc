"""EC2Plugin overhead on LocalCloud, beside nipype's MultiProc on the same workflow.

    python benchmarks/plugin.py               # 50 trivial nodes, 4 agents, 3 repeats
    python benchmarks/plugin.py --nodes 8 --agents 2   # what --quick in run.py uses

Each repeat runs the workflow once with EC2Plugin (fresh instances: their start-up is
part of the figures, as it is on AWS), once with MultiProc (``n_procs`` = agents), and,
where a Docker engine and the test image are here, once with BatchPlugin on LocalCloud's
Batch (agents as Batch jobs, ``max_agents`` = agents).
Reported, each the median over the repeats:

* dispatch: submit → the node starts on an instance, and the node ends → the controller
  has its result (median and 95th percentile over the nodes of a run);
* wall time of both plugins;
* API calls per node: the controller's, the agents' (botocore), and native data
  transfers (awscrt), all counted by LocalCloud's recording proxy;
* billed instance-seconds against busy seconds (the cost report);
* a node with a large result (a 24 MB array of numbers, as a Function node returning a
  time series would): wall time under ``Linear`` and under EC2Plugin, whose result
  pickle travels from the instance and has its paths moved.

Imported by ``run.py``, which puts the rows in the same report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def increment(x):
    """The trivial node: all its cost is the plugin's."""
    return x + 1


def _workflow(nodes: int, base_dir: str, poll: float | None = 0.2):
    from nipype import Function, Node, Workflow
    from nipype.interfaces.utility import IdentityInterface

    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", list(range(nodes)))
    inc = Node(Function(input_names=["x"], output_names=["y"], function=increment), "inc")
    wf = Workflow("plugin_bench", base_dir=base_dir)
    wf.connect(src, "x", inc, "x")
    if poll is not None:
        wf.config["execution"]["poll_sleep_duration"] = poll
    return wf


def _classify(requests) -> dict:
    from nipype_s3.testing.localcloud import AGENT_APP_ID

    out = {"controller": 0, "agents": 0, "native": 0}
    for rec in requests:
        agent = rec.header("user-agent") or ""
        if agent.startswith("CRTS3NativeClient"):
            out["native"] += 1
        elif f"app/{AGENT_APP_ID}" in agent:
            out["agents"] += 1
        else:
            out["controller"] += 1
    return out


def _runs_bucket(cloud) -> str:
    """The bucket the benchmark's runs keep their files in (made once)."""
    import boto3

    bucket = "plugin-bench-runs"
    client = boto3.client("s3", region_name=cloud.region)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return bucket


def one_repeat(cloud, nodes: int, agents: int, work: str) -> dict:

    from nipype_s3 import EC2Plugin

    bucket = _runs_bucket(cloud)
    plugin = EC2Plugin(plugin_args={
        "s3_prefix": f"s3://{bucket}", "max_instances": agents, "instance_type": "c6i.large",
        "idle_timeout": 20, "lease_timeout": 20, "poll_wait": 1, "scale_interval": 0.5,
        "visibility_timeout": 60, "heartbeat": 10})
    cloud.proxy.clear()
    wf = _workflow(nodes, os.path.join(work, "ec2"))
    start = time.perf_counter()
    wf.run(plugin=plugin)
    ec2_wall = time.perf_counter() - start
    calls = _classify(cloud.proxy.requests)
    cloud.wait_idle(60)
    # the agents' last calls (idle exit) land after the run: count them too
    calls = _classify(cloud.proxy.requests)
    report = plugin.cost_report or {}
    dispatch = report.get("dispatch") or {}

    cloud.wait_idle(60)
    # an unchanged re-run: nipype finds every node cached (default poll interval, as
    # users leave it), here and under Linear
    rerun = _workflow(nodes, os.path.join(work, "ec2"), poll=None)
    start = time.perf_counter()
    rerun.run(plugin=EC2Plugin(plugin_args=plugin.plugin_args))
    rerun_ec2 = time.perf_counter() - start
    _workflow(nodes, os.path.join(work, "linear"), poll=None).run(plugin="Linear")
    start = time.perf_counter()
    _workflow(nodes, os.path.join(work, "linear"), poll=None).run(plugin="Linear")
    rerun_linear = time.perf_counter() - start

    wf = _workflow(nodes, os.path.join(work, "multiproc"))
    start = time.perf_counter()
    wf.run(plugin="MultiProc", plugin_args={"n_procs": agents})
    mp_wall = time.perf_counter() - start
    batch = _batch_repeat(cloud, nodes, agents, work)
    parts = {f"{name}_median": (dispatch.get(name) or {}).get("median")
             for name in ("queued", "starting", "running", "storing", "collecting")}
    return {
        **parts,
        "ec2_wall": ec2_wall, "multiproc_wall": mp_wall,
        "rerun_ec2_wall": rerun_ec2, "rerun_linear_wall": rerun_linear,
        "to_start_median": (dispatch.get("to_start") or {}).get("median"),
        "to_start_p95": (dispatch.get("to_start") or {}).get("p95"),
        "to_seen_median": (dispatch.get("to_seen") or {}).get("median"),
        "to_seen_p95": (dispatch.get("to_seen") or {}).get("p95"),
        "calls_controller": calls["controller"] / nodes, "calls_agents": calls["agents"] / nodes,
        "calls_native": calls["native"] / nodes,
        "instances": len(report.get("instances", [])),
        "instance_seconds": report.get("instance_seconds"),
        "billed_seconds": report.get("billed_seconds"),
        "busy_seconds": report.get("busy_seconds"),
        "jobs_remote": report.get("jobs_remote"),
        **batch,
    }


#: the image BatchPlugin's agents run in here (tests/docker/build-images.sh builds it)
BATCH_IMAGE = "nipype-s3-test/nipype:local"


def _batch_image() -> str | None:
    """The test image, when this machine has a Docker engine, the image, and the image
    matches this Python and nipype (else the Batch row is left out, saying why)."""
    import json as _json
    import subprocess

    from nipype_s3.remote.versions import mismatch, runtime_versions

    try:
        probe = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "python3", BATCH_IMAGE, "-c",
             "import json, platform, nipype, nibabel; print(json.dumps({'python': "
             "platform.python_version(), 'nipype': nipype.__version__, 'nibabel': "
             "nibabel.__version__}))"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if probe.returncode != 0 or mismatch(runtime_versions(), _json.loads(probe.stdout)):
        return None
    return BATCH_IMAGE


def _batch_repeat(cloud, nodes: int, agents: int, work: str) -> dict:
    """The same workflow under BatchPlugin on LocalCloud's Batch (agents as Batch jobs,
    real containers): its wall time and dispatch, beside EC2Plugin's and MultiProc's."""
    from nipype_s3 import BatchPlugin

    empty = {"batch_wall": None, "batch_to_start_median": None,
             "batch_to_seen_median": None}
    image = _batch_image()
    if image is None:
        return empty
    plugin = BatchPlugin(plugin_args={
        "s3_prefix": f"s3://{_runs_bucket(cloud)}", "job_queue": cloud.batch.QUEUE,
        "image": image, "max_agents": agents, "agent_vcpus": 2, "idle_timeout": 20,
        "lease_timeout": 20, "poll_wait": 1, "scale_interval": 0.5,
        "visibility_timeout": 60, "heartbeat": 10})
    wf = _workflow(nodes, os.path.join(work, "batch"))
    start = time.perf_counter()
    wf.run(plugin=plugin)
    wall = time.perf_counter() - start
    dispatch = (plugin.cost_report or {}).get("dispatch") or {}
    return {"batch_wall": wall,
            "batch_to_start_median": (dispatch.get("to_start") or {}).get("median"),
            "batch_to_seen_median": (dispatch.get("to_seen") or {}).get("median")}


def large_array(n):
    """A node with a large result: ``n`` numbers (8 bytes each) that gzip well."""
    import numpy as np

    return np.arange(n, dtype=float)


def large_result(cloud, work: str, n: int = 3_000_000) -> dict:
    """Wall time of one node returning ``n`` floats, ``Linear`` against EC2Plugin."""
    from nipype import Function, Node, Workflow

    from nipype_s3 import EC2Plugin

    bucket = _runs_bucket(cloud)
    walls = {}
    for name in ("Linear", "EC2"):
        wf = Workflow("large_result", base_dir=os.path.join(work, name))
        wf.config["execution"]["poll_sleep_duration"] = 0.2
        node = Node(Function(input_names=["n"], output_names=["out"], function=large_array),
                    "big")
        node.inputs.n = n
        wf.add_nodes([node])
        plugin = "Linear" if name == "Linear" else EC2Plugin(plugin_args={
            "s3_prefix": f"s3://{bucket}", "max_instances": 1, "idle_timeout": 20,
            "lease_timeout": 20, "poll_wait": 1, "scale_interval": 0.5})
        start = time.perf_counter()
        wf.run(plugin=plugin)
        walls[name] = time.perf_counter() - start
    return {"large_linear_wall": walls["Linear"], "large_ec2_wall": walls["EC2"]}


def sleep_then(x, seconds):
    """A node that works ``seconds`` (as a real step would, without the CPU)."""
    import time

    time.sleep(seconds)
    return x


def scaling(cloud, work: str, nodes: int, seconds: float, agents: int) -> dict:
    """Billed against busy instance-seconds for ``nodes`` nodes of ``seconds`` each."""
    from nipype import Function, Node, Workflow
    from nipype.interfaces.utility import IdentityInterface

    from nipype_s3 import EC2Plugin

    src = Node(IdentityInterface(fields=["x"]), "src")
    src.iterables = ("x", list(range(nodes)))
    step = Node(Function(input_names=["x", "seconds"], output_names=["y"],
                         function=sleep_then), "step")
    step.inputs.seconds = seconds
    wf = Workflow("scaling", base_dir=os.path.join(work, "scaling"))
    wf.connect(src, "x", step, "x")
    plugin = EC2Plugin(plugin_args={
        "s3_prefix": "s3://plugin-bench-runs", "max_instances": agents, "idle_timeout": 20,
        "lease_timeout": 20, "poll_wait": 1, "scale_interval": 0.5})
    wf.run(plugin=plugin)
    report = plugin.cost_report or {}
    return {"scale_nodes": nodes, "scale_seconds": seconds,
            "scale_instances": len(report.get("instances", [])),
            "scale_billed": report.get("billed_seconds"), "scale_busy": report.get("busy_seconds")}


def run(nodes: int = 50, agents: int = 4, repeats: int = 3, work: str | None = None,
        large_n: int = 3_000_000, scale: tuple[int, float] = (50, 10.0)) -> dict:
    """Median of each figure over ``repeats`` runs (and the runs themselves); the large
    result and the scaling case once."""
    from nipype_s3.testing import LocalCloud

    os.environ.setdefault("NIPYPE_NO_ET", "1")
    own = work is None  # a folder made here is removed here
    work = work or tempfile.mkdtemp(prefix="nipype-s3-plugin-bench-")
    runs = []
    try:
        with LocalCloud(directory=os.path.join(work, "cloud"), agents_via_proxy=True) as cloud:
            for rep in range(repeats):
                runs.append(one_repeat(cloud, nodes, agents, os.path.join(work, f"r{rep}")))
                print(f"  plugin repeat {rep + 1}: EC2Plugin {runs[-1]['ec2_wall']:.1f} s, "
                      f"MultiProc {runs[-1]['multiproc_wall']:.1f} s", flush=True)
            once = large_result(cloud, os.path.join(work, "large"), large_n)
            cloud.wait_idle(60)
            once.update(scaling(cloud, work, scale[0], scale[1], agents))
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
    summary = {"nodes": nodes, "agents": agents, "repeats": repeats, "runs": runs,
               "large_mb": large_n * 8 / 1e6, **once}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        summary[key] = statistics.median(values) if values else None
    return summary


def markdown(summary: dict) -> list[str]:
    """The report's plugin section."""
    s = summary

    def f(value, fmt="{:.2f}"):
        return "–" if value is None else fmt.format(value)

    return [
        f"## EC2Plugin on LocalCloud: {s['nodes']} trivial nodes, up to {s['agents']} "
        f"instances (median of {s['repeats']} runs)",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| submit → node starts on an instance, median / p95 (s) | "
        f"{f(s['to_start_median'])} / {f(s['to_start_p95'])} |",
        f"| node ends → controller has the result, median / p95 (s) | "
        f"{f(s['to_seen_median'])} / {f(s['to_seen_p95'])} |",
        f"| … of that, waiting for a free slot, median (s) | {f(s['queued_median'])} |",
        f"| … of that, starting: fork, spec, pickle, inputs, median (s) | "
        f"{f(s['starting_median'])} |",
        f"| the node itself, median (s) | {f(s['running_median'])} |",
        f"| end → result: storing outputs and reporting, median (s) | {f(s['storing_median'])} |",
        f"| end → result: the controller noticing and fetching, median (s) | "
        f"{f(s['collecting_median'])} |",
        f"| wall time, EC2Plugin (s) | {f(s['ec2_wall'], '{:.1f}')} |",
        f"| wall time, MultiProc with n_procs={s['agents']} (s) | "
        f"{f(s['multiproc_wall'], '{:.1f}')} |",
        f"| EC2Plugin / MultiProc wall time | "
        f"{f(s['ec2_wall'] / s['multiproc_wall'] if s['multiproc_wall'] else None)}× |",
        f"| wall time, BatchPlugin, agents as Batch jobs (s) | "
        f"{f(s.get('batch_wall'), '{:.1f}')} |",
        f"| BatchPlugin: submit → node starts / node ends → result, median (s) | "
        f"{f(s.get('batch_to_start_median'))} / {f(s.get('batch_to_seen_median'))} |",
        f"| API calls per node: controller / agents / native data transfers | "
        f"{f(s['calls_controller'], '{:.1f}')} / {f(s['calls_agents'], '{:.1f}')} / "
        f"{f(s['calls_native'], '{:.1f}')} |",
        f"| instances launched | {f(s['instances'], '{:.0f}')} |",
        f"| billed instance-seconds / busy seconds | {f(s['billed_seconds'], '{:.0f}')} / "
        f"{f(s['busy_seconds'], '{:.0f}')} |",
        f"| unchanged re-run, nipype's default poll interval: Linear / EC2Plugin (s) | "
        f"{f(s.get('rerun_linear_wall'))} / {f(s.get('rerun_ec2_wall'))} |",
        f"| {s['scale_nodes']} nodes of {s['scale_seconds']:g} s: instances launched, "
        f"billed / busy instance-seconds | {f(s.get('scale_instances'), '{:.0f}')}, "
        f"{f(s.get('scale_billed'), '{:.0f}')} / {f(s.get('scale_busy'), '{:.0f}')} |",
        f"| one node with a {s['large_mb']:.0f} MB result: Linear / EC2Plugin wall time (s) | "
        f"{f(s.get('large_linear_wall'), '{:.1f}')} / "
        f"{f(s.get('large_ec2_wall'), '{:.1f}')} |",
        "",
        "Dispatch includes the first instances' start-up (an agent process on LocalCloud; "
        "on AWS add the instance's boot). BatchPlugin runs on LocalCloud's Batch: its agent "
        "jobs are containers of this machine's Docker engine (on AWS add Batch's own "
        "SUBMITTED → RUNNING time for the first agents); '–' where no engine or test image "
        "is here. Busy seconds are the workers' own time per job "
        "(fetch inputs, run, store outputs); billed seconds run from launch to "
        "termination, idle timeout included.",
        "",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    summary = run(args.nodes, args.agents, max(1, args.repeats))
    print("\n".join(markdown(summary)))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
