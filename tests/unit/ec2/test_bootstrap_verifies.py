"""The bootstrap installs the shipped package only when its SHA-256 is the one the
controller computed: an object planted at the package's (predictable) key is refused.

The package step of the real user-data runs in bash, with ``aws`` and the venv's
``python`` replaced by stand-ins that record what they are asked to do.
"""

import hashlib
import os
import re
import subprocess

import pytest

from nipype_s3.ec2.userdata import render_user_data
from nipype_s3.exceptions import ConfigurationError


def _package_step(script: str) -> str:
    """The line of the user-data that fetches and installs the package."""
    (line,) = [ln for ln in script.splitlines() if "/tmp/nipype_s3.zip" in ln]
    return line.strip()


def _run_step(tmp_path, served: bytes, sha256: str):
    script = render_user_data(run_id="r", config_json="{}", region="us-east-1",
                              worker_root="/w", requirements=["nipype"],
                              package_s3_uri="s3://bkt/p/cas/sha256/x",
                              package_sha256=sha256)
    step = _package_step(script).replace("/tmp/nipype_s3.zip", str(tmp_path / "pkg.zip"))
    bindir = tmp_path / "bin"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    bindir.mkdir()
    (tmp_path / "served.zip").write_bytes(served)
    # `aws s3 cp URI DEST` copies what the bucket serves
    (bindir / "aws").write_text(f'#!/bin/bash\ncp {tmp_path / "served.zip"} "$4"\n')
    (venv / "bin" / "python").write_text(
        f'#!/bin/bash\necho installed >> {tmp_path / "installed"}\n')
    for path in (bindir / "aws", venv / "bin" / "python"):
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", VENV=str(venv))
    return subprocess.run(["bash", "-c", step], env=env, capture_output=True, text=True)


def test_the_genuine_package_is_installed(tmp_path):
    data = b"PK genuine package bytes"
    proc = _run_step(tmp_path, data, hashlib.sha256(data).hexdigest())
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "installed").read_text() == "installed\n"


def test_a_planted_package_is_not_installed(tmp_path):
    genuine = b"PK genuine package bytes"
    proc = _run_step(tmp_path, b"PK planted: import os; os.system('...')",
                     hashlib.sha256(genuine).hexdigest())
    assert proc.returncode != 0
    assert not (tmp_path / "installed").exists()
    assert not (tmp_path / "pkg.zip").exists()  # nothing of it is left either
    assert re.search(r"does not match its SHA-256; not installed", proc.stderr)


@pytest.mark.parametrize("sha256", [None, "", "abc", "G" * 64, "AB" * 32])
def test_a_package_without_a_usable_digest_is_refused(sha256):
    with pytest.raises(ConfigurationError, match="package_sha256 must be the 64 hex"):
        render_user_data(run_id="r", config_json="{}", region="us-east-1", worker_root="/w",
                         requirements=[], package_s3_uri="s3://b/k", package_sha256=sha256)
