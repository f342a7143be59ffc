"""The bootstrap with ``image``: Docker, the image pulled (an ECR login first when it is
in ECR), the agent's verified code mounted read-only, the agent run inside the image;
and a clear line in the log when a step cannot be done. (The real thing runs against a
real engine in tests/functional/test_images.py.)"""

import subprocess

import pytest

from nipype_s3.backends.ec2.fleet import _has_gpus
from nipype_s3.backends.ec2.settings import EC2Settings
from nipype_s3.exceptions import ConfigurationError
from nipype_s3.remote.placement import check_node_args

ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/fsl:6.0.7"


def _script(image, gpus=False, **more):
    from nipype_s3.ec2.userdata import render_user_data

    return render_user_data(run_id="r1", config_json="{}", region="us-east-1",
                            worker_root="/var/lib/nipype-s3/work",
                            requirements=["boto3==1.0", "botocore==1.0"],
                            package_s3_uri="s3://b/p/cas/sha256/ab", package_sha256="a" * 64,
                            image=image, gpus=gpus, **more)


def test_the_agent_runs_inside_the_image_with_its_code_mounted():
    script = _script("nipype/nipype:py311")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "IMAGE=nipype/nipype:py311\n" in script
    assert "python3 -m venv" not in script and "/opt/nipype-s3/bin/python" not in script
    last = script[script.index("docker run --rm --name nipype-s3-agent"):]
    assert '-v "$AGENT_DIR:$AGENT_DIR:ro"' in last  # the agent's code, read-only
    assert '-e PYTHONPATH="$AGENT_DIR/lib:$AGENT_DIR/deps"' in last
    assert "--network host" in last and "--entrypoint python3" in last
    assert last.rstrip().endswith('"$IMAGE" -m nipype_s3.agent')
    assert "--gpus" not in script
    # the code is installed only when its SHA-256 is the controller's
    assert f'echo "{"a" * 64}  /tmp/nipype_s3.zip" | sha256sum -c' in script
    # boto3, only when the image lacks it, with the image's own pip
    assert "-m pip install --quiet --target /deps boto3==1.0 botocore==1.0" in script


def test_ecr_login_only_for_an_image_in_ecr_and_gpus_on_gpu_types():
    script = _script(ECR, gpus=True)
    assert "IMAGE=123456789012.dkr.ecr.eu-west-1.amazonaws.com/fsl:6.0.7" in script
    assert "ECR='^[0-9]{12}\\.dkr\\.ecr(-fips)?" in script  # for ECR registries only
    assert "docker login --username AWS --password-stdin" in script  # never in argv
    assert "--gpus all" in script
    assert _has_gpus("g5.xlarge") and _has_gpus("p4d.24xlarge") and _has_gpus("g4dn.xlarge")
    assert not _has_gpus("c6i.large") and not _has_gpus("m7g.large")


@pytest.mark.parametrize("registry, ecr", [
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com", True),
    ("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", True),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", True),
    ("123456789012.dkr.ecr.eu-west-1.amazonaws.com.evil.example", False),
    ("evil.example/123456789012.dkr.ecr.eu-west-1.amazonaws.com", False),
    ("docker.io", False),
])
def test_the_ecr_token_goes_only_to_an_ecr_registry(registry, ecr):
    lines = _script(f"{registry}/fsl:6").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("ECR="))
    test = f"REGISTRY={registry}\n{lines[at]}\n{lines[at + 1]} echo yes; else echo no; fi"
    said = subprocess.run(["bash", "-c", test], capture_output=True, text=True).stdout
    assert said.strip() == ("yes" if ecr else "no")


def test_the_package_uri_is_quoted_wherever_it_is_used(tmp_path):
    from nipype_s3.ec2.userdata import render_user_data

    marker = tmp_path / "injected"
    script = render_user_data(run_id="r1", config_json="{}", region="us-east-1",
                              worker_root="/w", requirements=[],
                              package_s3_uri=f's3://b/p$(touch {marker})"`id`.zip',
                              package_sha256="a" * 64, image="x/y:1")
    line = next(x for x in script.splitlines() if x.startswith("PKG_URI="))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("aws", "sha256sum"):  # the download works, the digest does not match
        (bin_dir / name).write_text("#!/bin/bash\n" + ("exit 1" if name == "sha256sum"
                                                       else "exit 0") + "\n")
        (bin_dir / name).chmod(0o755)
    subprocess.run(["bash", "-c", line], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                   capture_output=True, timeout=30)
    assert not marker.exists()


def _run_with(tmp_path, docker_info_works: bool):
    """The image bootstrap in bash, with stand-ins that record what they are asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name, body in {
        "docker": f'echo "docker $*" >> {calls}\n'
                  f'[ "$1" = info ] && exit {0 if docker_info_works else 1}\nexit 0',
        "systemctl": f'echo "systemctl $*" >> {calls}',
        "shutdown": f'echo "shutdown $*" >> {calls}',
        "aws": f'echo "aws $*" >> {calls}; cp /dev/null "$4"',
        "sha256sum": "exit 0", "seq": "echo 1", "sleep": "exit 0", "chown": "exit 0",
    }.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body + "\n")
        path.chmod(0o755)
    log = tmp_path / "agent.log"
    script = _script(ECR).replace("/var/log/nipype-s3-agent.log", str(log)).replace(
        "/opt/nipype-s3-agent", str(tmp_path / "agent")).replace(
        "/var/lib/nipype-s3/work", str(tmp_path / "work")).replace(
        "/tmp/nipype_s3.zip", str(tmp_path / "p.zip"))
    subprocess.run(["bash", "-c", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                   capture_output=True, text=True, timeout=60)
    return calls.read_text(), log.read_text() if log.exists() else ""


def test_a_docker_that_does_not_start_is_said_and_the_instance_ends(tmp_path):
    calls, log = _run_with(tmp_path, docker_info_works=False)
    assert "nipype-s3: the Docker daemon did not start" in log
    assert "docker run" not in calls and "docker pull" not in calls
    assert calls.rstrip().endswith("shutdown -h now")


def test_the_image_bootstrap_steps_in_order(tmp_path):
    calls, log = _run_with(tmp_path, docker_info_works=True)
    order = ["systemctl start docker", "aws ecr get-login-password --region eu-west-1",
             f"docker image inspect {ECR}", "aws s3 cp s3://b/p/cas/sha256/ab",
             "-m zipfile -e", "docker run --rm --name nipype-s3-agent", "shutdown -h now"]
    at = [calls.find(step) for step in order]
    assert -1 not in at and at == sorted(at), (calls, log)


@pytest.mark.parametrize("image", ["Bad Image", "x; rm -rf /", "-v/:/host", "", 7])
def test_an_image_that_is_not_a_reference_is_refused_naming_it(image):
    with pytest.raises(ConfigurationError) as err:
        EC2Settings.from_plugin_args({"s3_prefix": "s3://my-bucket/p", "image": image})
    assert "must be a container image reference" in str(err.value) or "must be text" in \
        str(err.value)
    assert repr(image) in str(err.value)


def test_a_nodes_image_is_checked_before_anything_runs():
    from nipype import Node
    from nipype.interfaces.utility import IdentityInterface

    node = Node(IdentityInterface(fields=["a"]), name="realign")
    node.plugin_args = {"image": "FSL 6"}
    with pytest.raises(ConfigurationError, match="Node realign: plugin_args\\['image'\\]"):
        check_node_args(node, {"image": str})
    node.plugin_args = {"image": ECR}
    check_node_args(node, {"image": str})


@pytest.mark.parametrize("root", ["/etc", "/", "relative/work", "/var/lib/../../etc", "/tmp"])
def test_a_work_folder_that_is_a_system_one_is_refused(root):
    """With an image it is mounted into the container and given to the image's user."""
    with pytest.raises(ConfigurationError, match="worker_root"):
        EC2Settings.from_plugin_args({"s3_prefix": "s3://my-bucket/p", "worker_root": root})
