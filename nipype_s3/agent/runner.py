"""Run one nipype node the way nipype's batch plugins do, leaving a result file."""

from __future__ import annotations

import os
import socket
from traceback import format_exception

__all__ = ["run_node", "write_failure_result"]


def write_failure_result(node, traceback_lines, result=None) -> str:
    """Write ``result_<name>.pklz`` holding a failure, as nipype's batch script does.

    The distributed plugin base reads such a file back as a crash with that traceback.
    """
    from nipype.utils.filemanip import savepkl

    outdir = node.output_dir()
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"result_{node.name}.pklz")
    savepkl(path, dict(result=result, hostname=socket.gethostname(),
                       traceback=list(traceback_lines)))
    return path


def run_node(node, updatehash: bool = False) -> list[str] | None:
    """Run ``node``; return None on success or the traceback lines on failure.

    On success nipype itself wrote ``result_<name>.pklz`` in the node's directory; on
    failure a result file holding the traceback is written there instead.
    """
    try:
        node.run(updatehash=updatehash)
        return None
    except Exception as exc:  # the node's own error: reported, not raised
        lines = format_exception(type(exc), exc, exc.__traceback__)
        write_failure_result(node, lines, result=getattr(node, "result", None)
                             if os.path.exists(node.output_dir()) else None)
        return lines
