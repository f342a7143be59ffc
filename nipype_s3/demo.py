"""``nipype-s3 demo``: a real pipeline on an embedded S3 server, no AWS account needed."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

__all__ = ["run_demo", "mean_and_tsnr", "print_tree"]

DEMO_BUCKET = "nipype-s3-demo"
DEMO_RUNS_BUCKET = "nipype-s3-demo-runs"


def mean_and_tsnr(in_file):
    """Mean image, temporal SNR (mean / std over time) and a brain mask of a 4D NIfTI."""
    import os

    import nibabel as nib
    import numpy as np

    img = nib.load(in_file)
    data = np.asanyarray(img.dataobj, dtype="float64")
    if data.ndim == 3:
        data = data[..., None]
    mean = data.mean(axis=3)
    std = data.std(axis=3)
    tsnr = np.divide(mean, std, out=np.zeros_like(mean), where=std > 0)
    mask = (mean > np.percentile(mean[mean > 0], 30)) if (mean > 0).any() else mean > 0
    stem = os.path.basename(in_file).split(".")[0]
    outputs = []
    for name, array, dtype in (("mean", mean, "float32"), ("tsnr", tsnr, "float32"),
                               ("mask", mask, "uint8")):
        path = os.path.abspath(f"{stem}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(array.astype(dtype), img.affine), path)
        outputs.append(path)
    return tuple(outputs)


def print_tree(keys, out=sys.stdout) -> None:
    """Print S3 keys as an indented tree."""
    shown: set[str] = set()
    for key in sorted(keys):
        parts = key.split("/")
        for depth in range(len(parts) - 1):
            folder = "/".join(parts[: depth + 1])
            if folder not in shown:
                shown.add(folder)
                print("  " * depth + parts[depth] + "/", file=out)
        print("  " * (len(parts) - 1) + parts[-1], file=out)


def _say(text: str) -> None:
    print(f"[nipype-s3 demo] {text}", flush=True)


#: the image the Batch demo runs its nodes in (tests/docker/build-images.sh builds it)
DEMO_IMAGE = "nipype-s3-test/nipype:local"


def _check_demo_image(image: str) -> None:
    """The Batch demo runs its nodes in ``image`` on this machine's Docker engine: say
    what is missing before anything starts."""
    import shutil as _shutil
    import subprocess

    from .exceptions import ConfigurationError

    if not _shutil.which("docker") or subprocess.run(
            ["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        raise ConfigurationError(
            "demo --backend batch runs the nodes as Batch jobs in containers: it needs a "
            "running Docker engine (docker info fails here). Start dockerd, or run the "
            "demo without --backend batch.")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                      timeout=60).returncode != 0:
        raise ConfigurationError(
            f"demo --backend batch runs the nodes in the image {image}, which is not on "
            "this machine: build it with tests/docker/build-images.sh (from a clone of "
            "nipype_s3), or give --image with python3, nipype and boto3.")


def run_demo(keep: str | None = None, plugin: str = "EC2",
             image: str = DEMO_IMAGE) -> int:
    """Run the demo; return the exit status."""
    import boto3
    import nibabel
    from nipype import Function, Node, Workflow
    from nipype.interfaces.utility import IdentityInterface

    from .interfaces import S3DataGrabber, S3DataSink
    from .plugins import EC2Plugin
    from .s3 import UploadItem, list_objects, upload_files
    from .testing import LocalCloud

    if plugin == "Batch":
        _check_demo_image(image)
    start = time.monotonic()
    data = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    dataset = {
        "sub-01/func/sub-01_task-rest_bold.nii": os.path.join(data, "functional.nii"),
        "sub-01/anat/sub-01_T1w.nii": os.path.join(data, "anatomical.nii"),
        "sub-02/func/sub-02_task-rest_bold.nii.gz": os.path.join(data, "example4d.nii.gz"),
        "sub-02/anat/sub-02_T1w.nii": os.path.join(data, "anatomical.nii"),
    }
    subjects = ["sub-01", "sub-02"]
    workdir = tempfile.mkdtemp(prefix="nipype-s3-demo-")
    _say("starting LocalCloud: an AWS account on 127.0.0.1 (S3, EC2, SQS, SSM, Batch) ...")
    try:
        with LocalCloud(directory=os.path.join(workdir, "cloud")) as cloud:
            _say(f"embedded S3 server at {cloud.server.url}")
            client = boto3.client("s3", region_name=cloud.region)
            client.create_bucket(Bucket=DEMO_BUCKET)
            _say(f"uploading a BIDS-like dataset ({len(subjects)} subjects, real NIfTI) to "
                 f"s3://{DEMO_BUCKET}/rawdata/ ...")
            upload_files(client, DEMO_BUCKET, [UploadItem(src, f"rawdata/{key}")
                                               for key, src in dataset.items()])

            info = Node(IdentityInterface(fields=["subject"]), "info")
            info.iterables = ("subject", subjects)
            grab = Node(S3DataGrabber(infields=["subject"], outfields=["bold"]), "grab")
            grab.inputs.bucket = DEMO_BUCKET
            grab.inputs.bucket_path = "rawdata/"
            grab.inputs.template = "%s/func/%s_task-rest_bold.nii*"
            grab.inputs.template_args = {"bold": [["subject", "subject"]]}
            stats = Node(Function(input_names=["in_file"],
                                  output_names=["mean_file", "tsnr_file", "mask_file"],
                                  function=mean_and_tsnr), "stats")
            sink = Node(S3DataSink(base_directory=f"s3://{DEMO_BUCKET}/derivatives"), "sink")
            if keep:
                sink.inputs.local_copy = os.path.abspath(keep)
            sink.inputs.regexp_substitutions = [(r"/_subject_[^/]+", "")]
            wf = Workflow("demo", base_dir=os.path.join(workdir, "work"))
            wf.config["execution"]["poll_sleep_duration"] = 0.2
            wf.connect(info, "subject", grab, "subject")
            wf.connect(info, "subject", sink, "container")
            wf.connect(grab, "bold", stats, "in_file")
            wf.connect(stats, "mean_file", sink, "func.@mean")
            wf.connect(stats, "tsnr_file", sink, "func.@tsnr")
            wf.connect(stats, "mask_file", sink, "func.@mask")

            if plugin == "EC2":
                client.create_bucket(Bucket=DEMO_RUNS_BUCKET)
                runner = EC2Plugin(plugin_args={
                    "s3_prefix": f"s3://{DEMO_RUNS_BUCKET}", "max_instances": 2,
                    "instance_type": "c6i.large", "idle_timeout": 30, "lease_timeout": 20,
                    "poll_wait": 1, "scale_interval": 0.5, "visibility_timeout": 30,
                    "heartbeat": 5})
                _say("running the workflow (grab -> mean/tSNR/mask -> sink) with EC2Plugin on "
                     "up to 2 LocalCloud instances ...")
                wf.run(plugin=runner)
            elif plugin == "Batch":
                runner = _run_on_batch(wf, client, image)
            else:
                runner = None
                _say(f"running the workflow with nipype's {plugin} plugin ...")
                wf.run(plugin=plugin, plugin_args={"n_procs": 2}
                       if plugin == "MultiProc" else {})

            keys = sorted(list_objects(client, DEMO_BUCKET, "derivatives/"))
            expected = 3 * len(subjects)
            if len(keys) != expected:
                raise RuntimeError(f"the demo expected {expected} outputs in "
                                   f"s3://{DEMO_BUCKET}/derivatives/ and found {len(keys)}")
            print()
            print(f"s3://{DEMO_BUCKET}/")
            print_tree(keys)
            print()
            if plugin == "Batch":
                report = runner.cost_report
                _say(f"run {runner.run_id}: {len(report['agent_jobs'])} agent job(s), "
                     f"{report['vcpu_seconds']:.0f} vCPU-s; {report['jobs_remote']} jobs on "
                     f"Batch, {report['jobs_local']} on the controller")
                from .backends.batch import teardown

                teardown("nipype-s3-demo", boto3.client, poll=0.2)
                _say("removed the job queue, compute environment and roles "
                     "(nipype-s3 batch teardown --name nipype-s3-demo)")
            elif runner is not None and runner.cost_report:
                report = runner.cost_report
                _say(f"run {runner.run_id}: {len(report['instances'])} instance(s), "
                     f"{report['billed_seconds']:.0f} instance-s billed vs "
                     f"{report['busy_seconds']:.0f} s busy, ~${report['usd_estimate']:.4f} "
                     f"if it were AWS; {report['jobs_remote']} jobs on instances, "
                     f"{report['jobs_local']} on the controller")
                _say(f"cost report: s3://{DEMO_RUNS_BUCKET}/runs/{runner.run_id}/cost.json")
            if not cloud.wait_idle(15):
                raise RuntimeError(f"instances still running after the run: "
                                   f"{cloud.live_instances()}")
            if any(j["status"] not in ("SUCCEEDED", "FAILED")
                   for j in cloud.batch.jobs.values()):
                raise RuntimeError("Batch jobs still running after the run")
            _say(f"done in {time.monotonic() - start:.1f} s: {len(keys)} outputs in "
                 f"s3://{DEMO_BUCKET}/derivatives/, no instance left running"
                 + (", no Batch job left running" if plugin == "Batch" else ""))
            if keep:
                _say(f"local copy of the outputs: {os.path.abspath(keep)}")
            _say("next: README.md and docs/ (S3DataSink, S3DataGrabber, EC2Plugin, BatchPlugin, "
                 "LocalCloud)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _run_on_batch(wf, client, image: str):
    """Make a job queue as ``nipype-s3 batch setup`` does, and run ``wf`` on it with
    BatchPlugin, its nodes in ``image``."""
    import boto3

    from .backends.batch import BatchEnvironment, BatchPlugin, setup

    client.create_bucket(Bucket=DEMO_RUNS_BUCKET)
    _say("making a Batch job queue as 'nipype-s3 batch setup --name nipype-s3-demo --spot' "
         "does (compute environment, job queue, job and instance roles) ...")
    made = setup(BatchEnvironment("nipype-s3-demo", f"s3://{DEMO_RUNS_BUCKET}", spot=True,
                                  max_vcpus=8), boto3.client, poll=0.2)
    runner = BatchPlugin(plugin_args=dict(
        made, s3_prefix=f"s3://{DEMO_RUNS_BUCKET}", image=image, max_agents=2,
        idle_timeout=10, lease_timeout=20, poll_wait=1, scale_interval=0.5,
        visibility_timeout=30, heartbeat=5))
    _say(f"running the workflow (grab -> mean/tSNR/mask -> sink) with BatchPlugin: up to 2 "
         f"agent jobs in {image} on LocalCloud's Batch ...")
    wf.run(plugin=runner)
    return runner
