"""Sphinx configuration for nipype_s3."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("NIPYPE_NO_ET", "1")

import nipype_s3  # noqa: E402

project = "nipype_s3"
author = "nipype_s3 developers"
release = nipype_s3.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "numpydoc",
]
numpydoc_show_class_members = False
numpydoc_validation_checks = set()
autodoc_member_order = "bysource"
autodoc_typehints = "none"
exclude_patterns = ["_build"]
html_theme = "alabaster"
intersphinx_mapping = {}
nitpicky = False


# -- trait specs: each interface's inputs and outputs, as nipype's help() prints them ----
def _write_trait_specs():
    from nipype_s3 import EC2ContainerRun, S3DataGrabber, S3DataSink

    out = os.path.join(os.path.dirname(__file__), "_generated")
    os.makedirs(out, exist_ok=True)
    for cls in (S3DataSink, S3DataGrabber, EC2ContainerRun):
        text = cls.help(returnhelp=True)
        text = text[text.find("Inputs::"):] if "Inputs::" in text else text
        with open(os.path.join(out, f"{cls.__name__}.txt"), "w") as fobj:
            fobj.write(text.replace("Inputs::", "Inputs:").replace("Outputs::", "Outputs:"))


_write_trait_specs()
exclude_patterns.append("_generated")
