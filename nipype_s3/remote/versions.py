"""Which Python, nipype and nibabel a process runs, and whether a node pickled by one
process can be run by another.

A job travels as a pickle of its nipype node. A pickle made by one minor version of
Python or nipype may not load in another (classes move, traits change), and when it
does, the node may not behave the same. An agent therefore says which versions it runs
(in its signed ``agent-up`` event), and refuses to serve a controller whose versions it
cannot match; the controller then stops the run with a message naming both.
"""

from __future__ import annotations

import platform

__all__ = ["runtime_versions", "mismatch"]

#: what is compared, and how many leading parts of the version must agree
_MUST_AGREE = {"python": 2, "nipype": 2, "nibabel": 1}


def runtime_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "nipype": "1.11.0", "nibabel": "5.4.2"}`` of this process
    ("missing" for a package that cannot be imported)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("nipype", "nibabel"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def mismatch(controller: dict, agent: dict, where: str = "the agent's image") -> str | None:
    """Why a node pickled under ``controller``'s versions cannot run under ``agent``'s
    (a sentence naming both and what to do), or None when they agree."""
    if not isinstance(agent, dict):
        return None  # an agent that did not say (an older nipype_s3): nothing to compare
    wrong = []
    for name, parts in _MUST_AGREE.items():
        ours, theirs = str(controller.get(name, "?")), str(agent.get(name, "?"))
        if ours.split(".")[:parts] != theirs.split(".")[:parts]:
            wrong.append(f"{name} {theirs} where the controller runs {ours}")
    if not wrong:
        return None
    pins = " ".join(f"{n}=={controller[n]}" for n in ("nipype", "nibabel")
                    if n in controller and controller[n] != "missing")
    return (f"{where} runs {'; '.join(wrong)}: the nodes this controller pickles would not "
            f"load or not behave the same there. Run the controller in that image (e.g. "
            f"docker run ... IMAGE python my_pipeline.py), or make the two agree: pin "
            f"'{pins}' in the image (and a Python of the same minor version), or run the "
            f"controller with the image's versions.")
