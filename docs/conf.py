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
