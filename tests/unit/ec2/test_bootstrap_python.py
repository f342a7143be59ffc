"""The bootstrap finds the controller's Python on an image whose python3 is older
(Amazon Linux 2023: 3.9): on the image, from dnf, or a standalone build through uv; and
stops with a clear message when there is none. The real user-data runs in bash, with
stand-ins for python, dnf, aws and shutdown that record what they are asked."""

import os
import subprocess

import pytest

from nipype_s3.ec2.userdata import render_user_data

_PYTHON = """#!/bin/bash
# a stand-in Python {version}: answers the version check, makes a venv whose python
# records every call
if [ "$1" = "-c" ]; then echo {version}; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/bash\\necho "venv-python $*" >> {calls}\\n' > "$3/bin/python"
  chmod +x "$3/bin/python"; exit 0
fi
echo "python{version} $*" >> {calls}
"""


def _stub(folder, name, text):
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def _boot(tmp_path, *, on_image=False, dnf_has=False, uv_works=False, version="3.12"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    extra = tmp_path / "extra"  # where dnf and uv put the Python they install
    extra.mkdir()
    calls = tmp_path / "calls.log"
    python = _PYTHON.format(version=version, calls=calls)
    if on_image:
        _stub(bin_dir, f"python{version}", python)
    _stub(bin_dir, "dnf", f"#!/bin/bash\necho \"dnf $*\" >> {calls}\n" + (
        f"cat > {bin_dir}/python{version} <<'PY'\n{python}PY\nchmod +x "
        f"{bin_dir}/python{version}\n" if dnf_has else "exit 1\n"))
    uv_python = _stub(extra, "uv-python", python) if uv_works else None
    _stub(bin_dir, "python3", f"""#!/bin/bash
echo "python3 $*" >> {calls}
case "$*" in
  *"pip install"*) {"exit 0" if uv_works else "exit 1"} ;;
  *"uv python install"*) exit 0 ;;
  *"uv python find"*) echo {uv_python} ;;
  *) echo 3.9 ;;
esac
""")
    _stub(bin_dir, "shutdown", f"#!/bin/bash\necho \"shutdown $*\" >> {calls}\n")
    _stub(bin_dir, "aws", f"#!/bin/bash\necho \"aws $*\" >> {calls}\n")
    script = render_user_data(run_id="r1", config_json="{}", region="us-east-1",
                              worker_root=str(tmp_path / "work"), requirements=["nipype"],
                              python_version=version)
    log = tmp_path / "agent.log"
    script = script.replace("/var/log/nipype-s3-agent.log", str(log)).replace(
        "/opt/nipype-s3", str(tmp_path / "opt" / "nipype-s3"))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)
    return proc, (calls.read_text() if calls.exists() else ""), \
        (log.read_text() if log.exists() else "")


@pytest.mark.parametrize("where", ["on_image", "dnf_has", "uv_works"])
def test_the_controllers_python_is_found_and_the_agent_started_with_it(tmp_path, where):
    proc, calls, log = _boot(tmp_path, **{where: True})
    assert "venv-python -m pip install --quiet nipype" in calls, log
    assert "venv-python -m nipype_s3.agent" in calls, log
    assert ("dnf install" in calls) is (where != "on_image")
    assert ("uv python install" in calls) is (where == "uv_works")
    assert calls.rstrip().endswith("shutdown -h now")  # the agent ended: so does the instance
    assert os.path.isdir(tmp_path / "opt" / "nipype-s3" / "bin")


def test_no_python_of_the_controllers_version_is_a_clear_message_and_no_agent(tmp_path):
    proc, calls, log = _boot(tmp_path)
    assert "nipype-s3: no Python 3.12 on this instance" in log
    assert "Use an AMI with python3.12" in log
    assert "nipype_s3.agent" not in calls
    assert calls.rstrip().endswith("shutdown -h now")
