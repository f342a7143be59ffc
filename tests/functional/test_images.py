"""EC2Plugin's ``image=`` on LocalCloud booting from the real user-data, with a real
Docker engine: the agent runs inside the image, next to a tool only the image has."""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import subprocess

import boto3
import nibabel as nib
import numpy as np
import pytest

from nipype_s3 import EC2Plugin
from nipype_s3.exceptions import ConfigurationError
from nipype_s3.testing import LocalCloud

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKFLOW = os.path.join(os.path.dirname(HERE), "docker", "realign.py")


def _realign():
    spec = importlib.util.spec_from_file_location("realign_workflow", WORKFLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def series(tmp_path):
    """Two small 4-D NIfTI series."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "bold"
    folder.mkdir()
    paths = []
    for subject in ("01", "02"):
        path = folder / f"sub-{subject}_bold.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(100, 5, (6, 6, 4, 5)).astype(np.int16),
                                 np.eye(4)), str(path))
        paths.append(str(path))
    return paths


def _outputs(base_dir) -> dict[str, bytes]:
    """Every result file of the workflow, by its path below the workflow folder (NIfTI
    files decompressed: a gzip header holds a time)."""
    out = {}
    for dirpath, _, names in os.walk(base_dir):
        for name in names:
            if name.endswith((".nii.gz", ".par")) and "_report" not in dirpath:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as fobj:
                    data = fobj.read()
                out[os.path.relpath(path, base_dir)] = (
                    gzip.decompress(data) if name.endswith(".gz") else data)
    return out


def _jobs_by_instance(cloud) -> list[tuple[bool, list[str]]]:
    """(whether the instance ran the agent in an image, the nodes it ran) per instance."""
    out = []
    for inst in cloud.instance_list():
        with open(os.path.join(inst.root, "sandbox", "user-data.sh")) as fobj:
            image = "\nIMAGE=" in fobj.read()
        out.append((image, re.findall(r"job \S+ \((\S+)\) started", inst.log())))
    return out


def _plugin(**more):
    return EC2Plugin(plugin_args=dict({"s3_prefix": "s3://image-runs/runs",
                                       "idle_timeout": 5, "boot_timeout": 300}, **more))


def test_node_runs_where_the_image_tool_is_same_outputs_as_linear_in_it(
        docker_images, series, tmp_path):
    # Linear, inside the image (the same paths as the controller's, mounted)
    inside = tmp_path / "linear"
    data = os.path.dirname(series[0])
    subprocess.run(["docker", "run", "--rm", "--network", "none",
                    "-v", f"{data}:{data}:ro", "-v", f"{inside}:{inside}",
                    "-v", f"{WORKFLOW}:/wf/realign.py:ro", "--entrypoint", "python3",
                    docker_images["test"], "/wf/realign.py", str(inside), *series],
                   check=True, capture_output=True)
    expected = _outputs(inside)
    assert sorted(os.path.basename(p) for p in expected) == sorted(
        ["sub-01_bold_mcf.nii.gz", "sub-01_bold_mcf.nii.gz.par", "mean.nii.gz",
         "sub-02_bold_mcf.nii.gz", "sub-02_bold_mcf.nii.gz.par", "mean.nii.gz"])
    # here, the tool does not exist
    with pytest.raises(Exception, match="mcflirt"):
        _realign().build(str(tmp_path / "here"), series).run(plugin="Linear")
    with LocalCloud(boot="user-data") as cloud:
        boto3.client("s3").create_bucket(Bucket="image-runs")
        remote = tmp_path / "ec2"
        _realign().build(str(remote), series).run(
            plugin=_plugin(image=docker_images["test"]))
        ran = _jobs_by_instance(cloud)
    assert _outputs(remote) == expected
    assert ran and all(image for image, _ in ran)  # every instance ran the image


def test_per_node_image(docker_images, series, tmp_path):
    """Only the node that names the image runs in it; the others need no image."""
    wf = _realign().build(str(tmp_path / "ec2"), series)
    wf.get_node("mcflirt").plugin_args = {"image": docker_images["test"]}
    with LocalCloud(boot="user-data") as cloud:
        boto3.client("s3").create_bucket(Bucket="image-runs")
        wf.run(plugin=_plugin())
        ran = _jobs_by_instance(cloud)
    assert len(_outputs(tmp_path / "ec2")) == 6
    in_image = sorted(n for image, nodes in ran if image for n in nodes)
    elsewhere = sorted(n for image, nodes in ran if not image for n in nodes)
    assert in_image
    assert all("mcflirt" in n for n in in_image), in_image
    assert elsewhere and all("mean" in n for n in elsewhere), elsewhere


def test_version_mismatch_is_refused_naming_both(docker_images, series, tmp_path):
    with LocalCloud(boot="user-data") as cloud:
        boto3.client("s3").create_bucket(Bucket="image-runs")
        with pytest.raises(ConfigurationError) as err:
            _realign().build(str(tmp_path / "ec2"), series).run(
                plugin=_plugin(image=docker_images["older"]))
        assert cloud.wait_idle(60)
    text = str(err.value)
    assert "nipype 1.10.0 where the controller runs 1.11" in text or \
        "nipype 1.10.0 where the controller runs" in text, text
    assert "Run the controller in that image" in text


def _tabulate_version():
    import tabulate

    return tabulate.__version__


def test_requirements_are_installed_beside_the_agent_the_image_unchanged(
        docker_images, tmp_path):
    from nipype import Function, Node, Workflow

    wf = Workflow("needs", base_dir=str(tmp_path))
    wf.add_nodes([Node(Function(input_names=[], output_names=["v"],
                                function=_tabulate_version), name="probe")])
    with LocalCloud(boot="user-data"):
        boto3.client("s3").create_bucket(Bucket="image-runs")
        result = wf.run(plugin=_plugin(image=docker_images["test"],
                                       requirements=["tabulate==0.9.0"]))
    assert list(result.nodes())[0].result.outputs.v == "0.9.0"
    unchanged = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3",
                                docker_images["test"], "-c", "import tabulate"],
                               capture_output=True)
    assert unchanged.returncode != 0


def test_check_image_says_which_images_will_do(docker_images):
    """``nipype-s3 check-image``: the versions beside the controller's, the agent's
    self-test in the image, and exit status 1 naming the problem."""
    import sys

    def check(image):
        return subprocess.run([sys.executable, "-m", "nipype_s3.cli", "check-image", image,
                               "--no-pull"], capture_output=True, text=True, timeout=300)

    good = check(docker_images["test"])
    assert good.returncode == 0, good.stderr
    assert "agent    ok: " in good.stdout and "the image can run this controller's nodes" \
        in good.stdout
    older = check(docker_images["older"])
    assert older.returncode == 1
    assert "nipype 1.10.0 where the controller runs" in older.stdout
    bare = check(docker_images["base"])
    assert bare.returncode == 1 and "has no working python3 on its PATH" in bare.stdout
    missing = check("nipype-s3-test/no-such-image:1")
    assert missing.returncode == 1
    assert "is not on this machine (and --no-pull)" in missing.stderr
