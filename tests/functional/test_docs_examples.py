"""Every example the documentation shows runs: the example programs, and the docstrings."""

import doctest
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "docs", "examples", "*.py")))


def test_every_example_is_included_in_a_page():
    pages = "".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "docs", "*.rst")))
    assert EXAMPLES
    for example in EXAMPLES:
        assert f"examples/{os.path.basename(example)}" in pages, example


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=os.path.basename)
def test_example_runs(example, tmp_path):
    env = dict(os.environ, NIPYPE_NO_ET="1")
    proc = subprocess.run([sys.executable, example], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("module", [
    "nipype_s3.interfaces.sink", "nipype_s3.interfaces.grabber",
    "nipype_s3.interfaces.container", "nipype_s3.testing.servers",
    "nipype_s3.testing.proxy", "nipype_s3.s3.uri",
])
def test_docstring_examples(module):
    import importlib

    mod = importlib.import_module(module)
    failures, _ = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert failures == 0
