"""The benchmark's quick mode runs (no timing is asserted: speed is reported, not tested)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "latest.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
                           "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, NIPYPE_NO_ET="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    for tool in ("S3DataSink", "S3DataGrabber", "nipype DataSink", "s5cmd", "cp -r (local disk)"):
        assert f"| {tool} |" in table
    rerun = [line for line in table.splitlines() if line.startswith("| rerun |")
             and ("S3DataSink" in line or "S3DataGrabber" in line)]
    assert len(rerun) == 2
    assert all("0 PUT, 0 GET of data" in line for line in rerun)
    # the plugin case ran: EC2Plugin on LocalCloud beside MultiProc, every figure filled
    assert "## EC2Plugin on LocalCloud: 8 trivial nodes" in table
    plugin_rows = [line for line in table.split("## EC2Plugin", 1)[1].splitlines()
                   if line.startswith("| ") and not line.startswith("| figure")]
    # BatchPlugin's rows are filled where a Docker engine and the test image are here
    from ..conftest import _docker_problem

    batch_rows = [line for line in plugin_rows if "BatchPlugin" in line]
    assert len(plugin_rows) == 18 and len(batch_rows) == 2
    filled = plugin_rows if _docker_problem() is None else [
        line for line in plugin_rows if line not in batch_rows]
    assert not any("–" in line for line in filled), plugin_rows
    assert "| one node with a 2 MB result: Linear / EC2Plugin wall time (s) |" in table
    # requests per file, counted through a proxy: one GET or PUT per small file, plus a LIST
    for direction, tool in (("upload", "S3DataSink"), ("download", "S3DataGrabber")):
        row = next(line for line in table.splitlines()
                   if line.startswith(f"| small | {direction} | {tool} |"))
        per_file = float(row.split("|")[7])
        assert 1.0 <= per_file <= 1.1, row
