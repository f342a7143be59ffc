"""Test harness: fake AWS credentials for every test, and local S3 servers.

Fixtures (markers go on the tests that use them, never here):

* ``s3_inprocess`` — moto in the test process (``mock_aws``): a boto3 client;
* ``moto_server`` — one moto server per session on 127.0.0.1, reset before each test
  that uses it; ``AWS_ENDPOINT_URL`` points at it for the test;
* ``seaweedfs`` — one SeaweedFS server per session; each test gets a fresh bucket.

A test that uses ``moto_server`` or ``seaweedfs`` must carry the marker of the same
name (checked at collection).
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ["NIPYPE_NO_ET"] = "1"

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

from nipype import config as _nipype_config  # noqa: E402


def _scratch(prefix: str) -> str:
    """A temporary folder for this test process, removed when it exits (not when a child
    forked from it does)."""
    path, owner = tempfile.mkdtemp(prefix=prefix), os.getpid()

    def remove():
        if os.getpid() == owner:
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


# crash files of tests that expect a crash go to a temporary folder, not the work tree
_nipype_config.set("execution", "crashdump_dir", _scratch("nipype-s3-test-crashes-"))

# the digest cache of a test run is its own (not the user's ~/.cache)
os.environ["NIPYPE_S3_DIGEST_CACHE"] = os.path.join(
    _scratch("nipype-s3-test-digests-"), "digests.sqlite")

from nipype_s3.testing.servers import FAKE_ACCESS_KEY, FAKE_SECRET_KEY  # noqa: E402

#: A bucket on the SeaweedFS server that anyone may list and read (like OpenNeuro's).
PUBLIC_BUCKET = "nipype-s3-public"

_FIXTURE_MARKERS = {"moto_server": "moto_server", "moto_endpoint": "moto_server",
                    "seaweedfs": "seaweedfs", "weed_bucket": "seaweedfs",
                    "docker_images": "docker"}

#: the images tests/docker/build-images.sh builds (.ci/run does, with a Docker engine)
TEST_IMAGE = "nipype-s3-test/nipype:local"
OLDER_NIPYPE_IMAGE = "nipype-s3-test/nipype-older:local"
BASE_IMAGE = "nipype-s3-test/debian:bookworm"


def _docker_problem() -> str | None:
    """Why the tests marked ``docker`` cannot run here (None when they can)."""
    import subprocess

    from nipype_s3.remote.versions import mismatch, runtime_versions
    from nipype_s3.testing.sandbox import sandbox_available

    if not shutil.which("docker"):
        return "no docker command (.ci/run installs docker.io and starts dockerd)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers 'docker info' (.ci/run starts dockerd)"
    for image in (BASE_IMAGE, TEST_IMAGE, OLDER_NIPYPE_IMAGE):
        if subprocess.run(["docker", "image", "inspect", image],
                          capture_output=True).returncode != 0:
            return f"no image {image}: run tests/docker/build-images.sh"
    why = sandbox_available()
    if why:
        return f"LocalCloud cannot boot instances from their user-data here: {why}"
    probe = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python3", TEST_IMAGE, "-c",
         "import json, platform, nipype, nibabel; print(json.dumps({'python': "
         "platform.python_version(), 'nipype': nipype.__version__, "
         "'nibabel': nibabel.__version__}))"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{TEST_IMAGE} does not start: {probe.stderr.strip()[-300:]}"
    import json

    why = mismatch(runtime_versions(), json.loads(probe.stdout), TEST_IMAGE)
    if why:
        return f"rebuild the test images for this Python (tests/docker/build-images.sh): {why}"
    return None


@pytest.fixture(scope="session")
def docker_images():
    """The test images (see TEST_IMAGE), or a skip saying what is missing."""
    why = _docker_problem()
    if why:
        pytest.skip(f"needs Docker and the test images: {why}")
    return {"test": TEST_IMAGE, "older": OLDER_NIPYPE_IMAGE, "base": BASE_IMAGE}


def pytest_addoption(parser):
    parser.addoption("--run-aws", action="store_true", default=False,
                     help="also run tests marked 'aws' (they use a real AWS account and "
                          "may cost money)")


def pytest_collection_modifyitems(config, items):
    run_aws = config.getoption("--run-aws")
    skip_aws = pytest.mark.skip(reason="needs a real AWS account: run with --run-aws")
    for item in items:
        if "aws" in item.keywords and not run_aws:
            item.add_marker(skip_aws)
        for fixture, marker in _FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()) and marker not in item.keywords:
                raise pytest.UsageError(
                    f"{item.nodeid} uses the {fixture!r} fixture but lacks "
                    f"@pytest.mark.{marker}")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path_factory):
    """Fake credentials, no profile, no endpoint, no shared config for every test."""
    home = tmp_path_factory.mktemp("aws-home")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NIPYPE_NO_ET", "1")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    from nipype_s3.s3 import session as _session

    _session._region_cache.clear()
    yield


@pytest.fixture
def s3_inprocess():
    """A boto3 S3 client on moto in this process (no server)."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


@pytest.fixture(scope="session")
def _moto_server_session(tmp_path_factory):
    from nipype_s3.testing import MotoServer

    server = MotoServer(log_path=str(tmp_path_factory.mktemp("moto") / "moto.log"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def moto_server(_moto_server_session, monkeypatch):
    """The session's moto server, emptied, with ``AWS_ENDPOINT_URL`` pointing at it."""
    _moto_server_session.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", _moto_server_session.url)
    return _moto_server_session


@pytest.fixture(scope="session")
def _seaweedfs_session():
    from nipype_s3.testing import SeaweedFS

    server = SeaweedFS(public_buckets=(PUBLIC_BUCKET,))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def seaweedfs(_seaweedfs_session, monkeypatch):
    """The session's SeaweedFS server; the environment holds its keys and endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _seaweedfs_session.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _seaweedfs_session.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", _seaweedfs_session.url)
    return _seaweedfs_session


@pytest.fixture
def weed_bucket(seaweedfs):
    """A fresh, empty bucket on SeaweedFS (its name)."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    seaweedfs.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def nifti_files():
    """Real NIfTI files shipped with nibabel's tests."""
    import nibabel

    data = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data")
    files = {name: os.path.join(data, name) for name in
             ("example4d.nii.gz", "anatomical.nii", "functional.nii", "example_nifti2.nii.gz")}
    missing = [p for p in files.values() if not os.path.exists(p)]
    assert not missing, f"nibabel test data missing: {missing}"
    return files
