"""The docker / apptainer / plain command lines EC2ContainerRun runs, exactly."""

import pytest

from nipype_s3.agent.onejob import build_command


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "input").mkdir()
    t1 = tmp_path / "input" / "sub-01_T1w.nii.gz"
    t1.write_bytes(b"x")
    return str(t1), str(tmp_path / "output"), str(tmp_path / "input")


def test_docker(paths):
    t1, out, indir = paths
    argv = build_command(runtime="docker", image="neuronets/kwyk:latest-cpu",
                         command="kwyk -m bvwn_multi_prior {input} {output_dir}/kwyk",
                         input_path=t1, output_dir=out, env={"OMP_NUM_THREADS": "4"})
    assert argv == ["docker", "run", "--rm", "-v", f"{indir}:/input:ro", "-v", f"{out}:/output",
                    "-e", "OMP_NUM_THREADS=4", "neuronets/kwyk:latest-cpu", "kwyk", "-m",
                    "bvwn_multi_prior", "/input/sub-01_T1w.nii.gz", "/output/kwyk"]


def test_docker_gpu_and_folder_input(paths):
    _, out, indir = paths
    argv = build_command(runtime="docker", image="img:1", command="run {input} {output_dir}",
                         input_path=indir, output_dir=out, gpu=True)
    assert argv == ["docker", "run", "--rm", "--gpus", "all", "-v", f"{indir}:/input:ro",
                    "-v", f"{out}:/output", "img:1", "run", "/input", "/output"]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer(paths, runtime):
    t1, out, indir = paths
    argv = build_command(runtime=runtime, image="neuronets/kwyk:latest-gpu",
                         command="kwyk {input} {output_dir}/kwyk", input_path=t1,
                         output_dir=out, gpu=True, env={"A": "b"})
    assert argv == [runtime, "exec", "--cleanenv", "--nv", "-B", f"{indir}:/input:ro",
                    "-B", f"{out}:/output", "--env", "A=b",
                    "docker://neuronets/kwyk:latest-gpu", "kwyk", "/input/sub-01_T1w.nii.gz",
                    "/output/kwyk"]


def test_apptainer_sif_is_used_as_is(paths):
    t1, out, _ = paths
    argv = build_command(runtime="apptainer", image="/opt/kwyk.sif", command="kwyk {input}",
                         input_path=t1, output_dir=out)
    assert "/opt/kwyk.sif" in argv and "docker:///opt/kwyk.sif" not in argv


def test_plain_command_quotes_paths(tmp_path):
    odd = tmp_path / "a b" / "x y.nii"
    argv = build_command(runtime="none", image=None, command="bet {input} {output_dir}/brain",
                         input_path=str(odd), output_dir=str(tmp_path / "out dir"))
    assert argv == ["/bin/bash", "-c",
                    f"bet '{odd}' '{tmp_path / 'out dir'}'/brain"]


def test_container_needs_an_image(paths):
    t1, out, _ = paths
    with pytest.raises(ValueError, match="needs an image"):
        build_command(runtime="docker", image=None, command="x", input_path=t1, output_dir=out)
