"""The docker / apptainer / plain command lines EC2ContainerRun runs, exactly; hostile
file names and literal braces, run for real; env values kept out of argv and logs."""

import os
import subprocess

import pytest

from nipype_s3.agent.command import INPUT_VAR, OUTPUT_VAR, argv_words
from nipype_s3.agent.onejob import build_command


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "input").mkdir()
    t1 = tmp_path / "input" / "sub-01_T1w.nii.gz"
    t1.write_bytes(b"x")
    return str(t1), str(tmp_path / "output"), str(tmp_path / "input")


def test_docker(paths):
    t1, out, indir = paths
    cmd = build_command(runtime="docker", image="neuronets/kwyk:latest-cpu",
                        command="kwyk -m bvwn_multi_prior {input} {output_dir}/kwyk",
                        input_path=t1, output_dir=out, env={"OMP_NUM_THREADS": "4"})
    assert cmd.argv == ["docker", "run", "--rm", "-v", f"{indir}:/input:ro", "-v",
                        f"{out}:/output", "-e", "OMP_NUM_THREADS", "-e", INPUT_VAR, "-e",
                        OUTPUT_VAR, "neuronets/kwyk:latest-cpu", "kwyk", "-m",
                        "bvwn_multi_prior", "/input/sub-01_T1w.nii.gz", "/output/kwyk"]
    assert cmd.env == {"OMP_NUM_THREADS": "4", INPUT_VAR: "/input/sub-01_T1w.nii.gz",
                       OUTPUT_VAR: "/output"}


def test_docker_gpu_and_folder_input(paths):
    _, out, indir = paths
    cmd = build_command(runtime="docker", image="img:1", command="run {input} {output_dir}",
                        input_path=indir, output_dir=out, gpu=True)
    assert cmd.argv == ["docker", "run", "--rm", "--gpus", "all", "-v", f"{indir}:/input:ro",
                        "-v", f"{out}:/output", "-e", INPUT_VAR, "-e", OUTPUT_VAR, "img:1",
                        "run", "/input", "/output"]


@pytest.mark.parametrize("runtime", ["apptainer", "singularity"])
def test_apptainer(paths, runtime):
    t1, out, indir = paths
    cmd = build_command(runtime=runtime, image="neuronets/kwyk:latest-gpu",
                        command="kwyk {input} {output_dir}/kwyk", input_path=t1,
                        output_dir=out, gpu=True, env={"A": "b"})
    assert cmd.argv == [runtime, "exec", "--cleanenv", "--nv", "-B", f"{indir}:/input:ro",
                        "-B", f"{out}:/output", "docker://neuronets/kwyk:latest-gpu", "kwyk",
                        "/input/sub-01_T1w.nii.gz", "/output/kwyk"]
    prefix = "APPTAINERENV_" if runtime == "apptainer" else "SINGULARITYENV_"
    assert cmd.env == {f"{prefix}A": "b", f"{prefix}{INPUT_VAR}": "/input/sub-01_T1w.nii.gz",
                       f"{prefix}{OUTPUT_VAR}": "/output"}


def test_apptainer_sif_is_used_as_is(paths):
    t1, out, _ = paths
    argv = build_command(runtime="apptainer", image="/opt/kwyk.sif", command="kwyk {input}",
                         input_path=t1, output_dir=out).argv
    assert "/opt/kwyk.sif" in argv and "docker:///opt/kwyk.sif" not in argv


def test_plain_command_gets_the_paths_from_its_environment(tmp_path):
    odd = tmp_path / "a b" / "x y.nii"
    cmd = build_command(runtime="none", image=None, command="bet {input} {output_dir}/brain",
                        input_path=str(odd), output_dir=str(tmp_path / "out dir"))
    assert cmd.argv == ["/bin/bash", "-c",
                        'bet "${NIPYPE_S3_INPUT}" "${NIPYPE_S3_OUTPUT_DIR}"/brain']
    assert cmd.env == {INPUT_VAR: str(odd), OUTPUT_VAR: str(tmp_path / "out dir")}


def test_container_needs_an_image(paths):
    t1, out, _ = paths
    with pytest.raises(ValueError, match="needs an image"):
        build_command(runtime="docker", image=None, command="x", input_path=t1, output_dir=out)


# -- hostile file names ----------------------------------------------------------------
#: A name S3 (and Linux) allows, which runs commands wherever it becomes shell text.
HOSTILE = ("sub-01_$(touch PWNED-dollar)_`touch PWNED-backtick`_'; touch PWNED-quote; '"
           '_"; touch PWNED-dquote; "_${IFS}_\n_* ?.nii.gz')

#: Every way of quoting {input} in a plain command (a shell reads it).
SHELL_TEMPLATES = [
    "cp {input} {output_dir}/",
    'cp "{input}" "{output_dir}/"',
    "cp '{input}' '{output_dir}'/",
    "cp -- {input} {output_dir} && ls {output_dir} > /dev/null",
    "sh -c 'cp {input} {output_dir}/'",
    "sh -c 'cp \"{input}\" \"{output_dir}\"/'",
    'sh -c "cp {input} {output_dir}/"',
    "bash -c \"cp '{input}' '{output_dir}'/\"",
    "bash -lc 'sh -c \"cp {input} {output_dir}/\"'",
    "for f in {input}; do cp \"$f\" {output_dir}/; done",
    "cp $(printf %s {input} | head -c 0){input} {output_dir}/",
]

#: The same for a container's command words (no shell, unless the words start one).
CONTAINER_TEMPLATES = [
    "cp {input} {output_dir}/",
    "cp '{input}' '{output_dir}'",
    'cp "{input}" {output_dir}/',
    "sh -c 'cp {input} {output_dir}/'",
    "sh -c 'cp \"{input}\" {output_dir}/'",
    'sh -c "cp \'{input}\' {output_dir}/"',
    "/bin/bash -ec 'cp -- {input} {output_dir}/'",
]


@pytest.fixture
def hostile(tmp_path):
    """A staged input with a hostile name, an empty output folder, and a clean cwd."""
    indir, out, cwd = tmp_path / "input", tmp_path / "output", tmp_path / "cwd"
    for path in (indir, out, cwd):
        path.mkdir()
    src = indir / HOSTILE
    src.write_bytes(b"NIfTI bytes")
    return str(src), str(out), cwd


def _ran_safely(src, out, cwd, tmp_path):
    """The file was copied under its own name, and no name-borne command ran."""
    pwned = [p for p in tmp_path.rglob("PWNED*")] + [p for p in cwd.iterdir()]
    assert pwned == []
    assert os.listdir(out) == [HOSTILE]
    with open(os.path.join(out, HOSTILE), "rb") as fobj:
        assert fobj.read() == b"NIfTI bytes"


@pytest.mark.parametrize("template", SHELL_TEMPLATES)
def test_hostile_name_in_a_plain_command_is_only_a_name(hostile, tmp_path, template):
    src, out, cwd = hostile
    cmd = build_command(runtime="none", image=None, command=template, input_path=src,
                        output_dir=out)
    assert all(HOSTILE not in word for word in cmd.argv)  # never shell text
    proc = subprocess.run(cmd.argv, env={**os.environ, **cmd.env}, cwd=str(cwd),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _ran_safely(src, out, cwd, tmp_path)


@pytest.mark.parametrize("template", CONTAINER_TEMPLATES)
def test_hostile_name_in_a_container_command_is_only_a_name(hostile, tmp_path, template):
    """What the container runs: the words, with the paths in its environment (here the
    host's paths stand for /input/<name> and /output)."""
    src, out, cwd = hostile
    values = {INPUT_VAR: src, OUTPUT_VAR: out}
    words = argv_words(template, values)
    proc = subprocess.run(words, env={**os.environ, **values}, cwd=str(cwd),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _ran_safely(src, out, cwd, tmp_path)


def test_hostile_name_in_docker_words_is_one_argument(hostile):
    src, out, _ = hostile
    cmd = build_command(runtime="docker", image="img:1", command="bet {input} {output_dir}/b",
                        input_path=src, output_dir=out)
    assert cmd.argv[-3:] == ["bet", f"/input/{HOSTILE}", "/output/b"]
    cmd = build_command(runtime="docker", image="img:1",
                        command="sh -c 'bet {input} {output_dir}/b'", input_path=src,
                        output_dir=out)
    assert cmd.argv[-3:] == ["sh", "-c", 'bet "${NIPYPE_S3_INPUT}" "${NIPYPE_S3_OUTPUT_DIR}"/b']
    assert cmd.env[INPUT_VAR] == f"/input/{HOSTILE}"


# -- literal braces ---------------------------------------------------------------------
def test_braces_other_than_the_placeholders_are_literal(tmp_path):
    indir, out = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    out.mkdir()
    (indir / "table.tsv").write_text("a 1\nb 2\n")
    command = ("awk '{print $1}' {input}/table.tsv > {output_dir}/first.txt && "
               "echo \"${HOME:-none}\" {} > {output_dir}/home.txt && "
               "find {input} -name '*.tsv' -exec cp {} {output_dir}/ \\; && "
               "printf '{{input}} {x}' > {output_dir}/braces.txt")
    cmd = build_command(runtime="none", image=None, command=command, input_path=str(indir),
                        output_dir=str(out))
    env = {**os.environ, **cmd.env, "HOME": "/home/me"}
    proc = subprocess.run(cmd.argv, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "first.txt").read_text() == "a\nb\n"
    assert (out / "home.txt").read_text() == "/home/me {}\n"
    assert (out / "table.tsv").read_text() == "a 1\nb 2\n"
    assert (out / "braces.txt").read_text() == "{" + str(indir) + "} {x}"


def test_braces_in_container_words_are_literal(paths):
    t1, out, _ = paths
    cmd = build_command(runtime="docker", image="img:1",
                        command="find {input} -exec cp {} {output_dir}/ ; awk '{print $1}'",
                        input_path=t1, output_dir=out)
    assert cmd.argv[cmd.argv.index("img:1") + 1:] == [
        "find", "/input/sub-01_T1w.nii.gz", "-exec", "cp", "{}", "/output/", ";", "awk",
        "{print $1}"]


# -- env values -------------------------------------------------------------------------
SECRET = "FS-LICENCE-8c1f2e77b0c94d21"


@pytest.mark.parametrize("runtime", ["docker", "apptainer", "singularity", "none"])
def test_env_values_never_reach_the_command_line(paths, runtime):
    t1, out, _ = paths
    cmd = build_command(runtime=runtime, image="img:1", command="recon {input} {output_dir}",
                        input_path=t1, output_dir=out, env={"FS_LICENSE_KEY": SECRET})
    assert not any(SECRET in word for word in cmd.argv)
    assert SECRET in cmd.env.values()
    assert SECRET not in repr(cmd) and "FS_LICENSE_KEY" in repr(cmd)


@pytest.mark.parametrize("name", ["A=B", "1ABC", "has space", "", INPUT_VAR, OUTPUT_VAR])
def test_bad_env_names_are_refused_without_the_value(paths, name):
    t1, out, _ = paths
    with pytest.raises(ValueError) as err:
        build_command(runtime="docker", image="img:1", command="x", input_path=t1,
                      output_dir=out, env={name: SECRET})
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("name", ["DOCKER_HOST", "PATH", "HOME", "LD_PRELOAD"])
def test_names_the_docker_command_reads_are_refused_for_docker_only(paths, name):
    t1, out, _ = paths
    with pytest.raises(ValueError, match=f"env may not set {name} with runtime='docker'"):
        build_command(runtime="docker", image="img:1", command="x", input_path=t1,
                      output_dir=out, env={name: SECRET})
    cmd = build_command(runtime="apptainer", image="img:1", command="x", input_path=t1,
                        output_dir=out, env={name: SECRET})
    assert cmd.env[f"APPTAINERENV_{name}"] == SECRET
