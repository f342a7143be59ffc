"""``nipype-s3 demo``: a real pipeline on an embedded S3 server, no AWS account needed."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time

__all__ = ["run_demo", "mean_and_tsnr", "print_tree"]

DEMO_BUCKET = "nipype-s3-demo"


def mean_and_tsnr(in_file):
    """Mean image and temporal SNR (mean / std over time) of a 4D NIfTI."""
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
    stem = os.path.basename(in_file).split(".")[0]
    mean_file = os.path.abspath(f"{stem}_mean.nii.gz")
    tsnr_file = os.path.abspath(f"{stem}_tsnr.nii.gz")
    nib.save(nib.Nifti1Image(mean.astype("float32"), img.affine), mean_file)
    nib.save(nib.Nifti1Image(tsnr.astype("float32"), img.affine), tsnr_file)
    return mean_file, tsnr_file


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


@contextlib.contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _say(text: str) -> None:
    print(f"[nipype-s3 demo] {text}", flush=True)


def run_demo(keep: str | None = None, plugin: str = "Linear") -> int:
    """Run the demo; return the exit status."""
    import boto3
    import nibabel
    from nipype import Function, Node, Workflow
    from nipype.interfaces.utility import IdentityInterface

    from .interfaces import S3DataSink
    from .s3 import DownloadItem, UploadItem, download_files, list_objects, upload_files
    from .testing.servers import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, MotoServer

    start = time.monotonic()
    data = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    dataset = {
        "sub-01/func/sub-01_task-rest_bold.nii": os.path.join(data, "functional.nii"),
        "sub-01/anat/sub-01_T1w.nii": os.path.join(data, "anatomical.nii"),
        "sub-02/func/sub-02_task-rest_bold.nii.gz": os.path.join(data, "example4d.nii.gz"),
        "sub-02/anat/sub-02_T1w.nii": os.path.join(data, "anatomical.nii"),
    }
    workdir = tempfile.mkdtemp(prefix="nipype-s3-demo-")
    server = MotoServer(log_path=os.path.join(workdir, "s3-server.log"))
    _say(f"starting an embedded S3 server at {server.url} ...")
    try:
        server.start()
        with _environment(AWS_ENDPOINT_URL=server.url, AWS_ACCESS_KEY_ID=FAKE_ACCESS_KEY,
                          AWS_SECRET_ACCESS_KEY=FAKE_SECRET_KEY,
                          AWS_DEFAULT_REGION="us-east-1", AWS_SESSION_TOKEN=None):
            os.environ.pop("AWS_PROFILE", None)
            client = boto3.client("s3", region_name="us-east-1")
            client.create_bucket(Bucket=DEMO_BUCKET)
            _say(f"uploading a BIDS-like dataset (2 subjects, real NIfTI) to "
                 f"s3://{DEMO_BUCKET}/rawdata/ ...")
            upload_files(client, DEMO_BUCKET, [UploadItem(src, f"rawdata/{key}")
                                               for key, src in dataset.items()])

            _say("fetching the functional runs ...")
            listing = list_objects(client, DEMO_BUCKET, "rawdata/")
            inputs = os.path.join(workdir, "inputs")
            bold = {}
            items = []
            for key, info in listing.items():
                if "_bold" in key:
                    dest = os.path.join(inputs, key[len("rawdata/"):])
                    items.append(DownloadItem(key, dest, info.size, info.etag))
                    bold[key.split("/")[1]] = dest
            download_files(client, DEMO_BUCKET, items)

            _say(f"running the workflow (mean image and tSNR per subject, plugin={plugin}) ...")
            info = Node(IdentityInterface(fields=["subject"]), "info")
            info.iterables = ("subject", sorted(bold))
            pick = Node(Function(input_names=["subject", "files"], output_names=["bold"],
                                 function=_pick), "pick")
            pick.inputs.files = bold
            stats = Node(Function(input_names=["in_file"],
                                  output_names=["mean_file", "tsnr_file"],
                                  function=mean_and_tsnr), "stats")
            sink = Node(S3DataSink(base_directory=f"s3://{DEMO_BUCKET}/derivatives"), "sink")
            if keep:
                sink.inputs.local_copy = os.path.abspath(keep)
            sink.inputs.regexp_substitutions = [(r"/_subject_[^/]+", "")]
            wf = Workflow("demo", base_dir=os.path.join(workdir, "work"))
            wf.config["execution"]["poll_sleep_duration"] = 0.2
            wf.connect(info, "subject", pick, "subject")
            wf.connect(info, "subject", sink, "container")
            wf.connect(pick, "bold", stats, "in_file")
            wf.connect(stats, "mean_file", sink, "func.@mean")
            wf.connect(stats, "tsnr_file", sink, "func.@tsnr")
            wf.run(plugin=plugin, plugin_args={"n_procs": 2} if plugin == "MultiProc" else {})

            keys = sorted(list_objects(client, DEMO_BUCKET, "derivatives/"))
            if len(keys) != 2 * len(bold):
                raise RuntimeError(f"the demo expected {2 * len(bold)} outputs in "
                                   f"s3://{DEMO_BUCKET}/derivatives/ and found {len(keys)}")
            print()
            print(f"s3://{DEMO_BUCKET}/")
            print_tree(keys)
            print()
            _say(f"done in {time.monotonic() - start:.1f} s: {len(keys)} outputs in "
                 f"s3://{DEMO_BUCKET}/derivatives/")
            if keep:
                _say(f"local copy of the outputs: {os.path.abspath(keep)}")
            _say("next: README.md (S3DataSink), docs/ for every input and credentials mode")
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _pick(subject, files):
    return files[subject]
