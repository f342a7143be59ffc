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


def _needs_docker(example: str) -> bool:
    return "Needs a Docker engine" in open(example).read()


@pytest.mark.slow
@pytest.mark.parametrize("example", [
    pytest.param(e, marks=pytest.mark.docker) if _needs_docker(e) else e for e in EXAMPLES],
    ids=os.path.basename)
def test_example_runs(example, tmp_path, request):
    if _needs_docker(example):
        request.getfixturevalue("docker_images")  # skips, saying why, without an engine
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


def _literal_blocks(page):
    """The indented literal blocks (after a line ending in '::') of an .rst page."""
    lines = open(os.path.join(ROOT, "docs", page)).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::") and not lines[i].lstrip().startswith(".."):
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            blocks.append("\n".join(block).strip() + "\n")
        else:
            i += 1
    return blocks


def test_every_creds_format_shown_in_the_docs_is_read(tmp_path):
    from nipype_s3.s3.credentials import read_creds_file

    blocks = _literal_blocks("credentials.rst")
    assert len(blocks) == 4
    for n, block in enumerate(blocks):
        text = block.replace("...", "FAKEVALUE0000") if "AWSAccessKeyId" in block else block
        path = tmp_path / f"creds{n}"
        path.write_text(text)
        creds = read_creds_file(str(path))
        assert creds.access_key and creds.secret_key


def test_iam_policy_in_the_docs_is_valid_json():
    import json

    agent, controller = [json.loads(b) for b in _literal_blocks("ec2plugin.rst")
                         if b.startswith("{")]
    actions = {a for st in agent["Statement"] for a in (
        st["Action"] if isinstance(st["Action"], list) else [st["Action"]])}
    assert {"s3:GetObject", "sqs:ReceiveMessage", "ssm:GetParameter"} <= actions
    actions = {a for st in controller["Statement"] for a in (
        st["Action"] if isinstance(st["Action"], list) else [st["Action"]])}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= actions
