"""Grabber templates: glob like DataGrabber, regex like nipype's old S3DataGrabber."""

import glob
import os

import pytest

from nipype_s3.templates import compile_template, covering_prefixes, fill_template, literal_prefix

KEYS = [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-01/anat/sub-01_T1w.nii.gz.bak",
    "sub-01/anat/.hidden.nii.gz",
    "sub-01/func/sub-01_task-rest_run-1_bold.nii.gz",
    "sub-01/func/sub-01_task-rest_run-2_bold.nii.gz",
    "sub-01[a]/anat/sub-01[a]_T1w.nii.gz",
    "sub-02/anat/sub-02_T1w.nii.gz",
]


@pytest.mark.parametrize("pattern", [
    "sub-01/anat/sub-01_T1w.nii.gz",
    "sub-01/anat/*",
    "sub-0?/anat/*_T1w.nii.gz",
    "*/func/*_run-[12]_bold.nii.gz",
    "sub-01/*/*",
    "*",
    "*/*/*.bak",
    "sub-01/anat/.*",
    # ``**``: any number of folder levels, none included (glob's recursive=True)
    "sub-01/**",
    "**",
    "**/*_T1w.nii.gz",
    "sub-01/**/*.nii.gz",
    "**/anat/**",
    "**/**/*.bak",
    "sub-01/**/.*",
    "sub-0**/anat/*",  # not a component of its own: like one *
])
def test_glob_mode_equals_glob_glob_on_a_real_tree(tmp_path, pattern):
    for key in KEYS + ["sub-01/func/deep/er/sub-01_physio.nii.gz", "sub-01/.git/config",
                       "top.nii.gz"]:
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    expected = sorted({os.path.relpath(p, tmp_path).replace(os.sep, "/")
                       for p in glob.glob(str(tmp_path / pattern), recursive=True)
                       if os.path.isfile(p)})  # glob lists a file twice for **/**
    assert expected  # each pattern matches something
    match = compile_template(pattern, "glob")
    keys = KEYS + ["sub-01/func/deep/er/sub-01_physio.nii.gz", "sub-01/.git/config",
                   "top.nii.gz"]
    assert sorted(k for k in keys if match(k)) == expected


def test_near_miss_is_not_matched():
    assert [k for k in KEYS if compile_template("sub-01/anat/sub-01_T1w.nii.gz")(k)] == [
        "sub-01/anat/sub-01_T1w.nii.gz"]
    regex = compile_template(r"sub-01/anat/sub-01_T1w\.nii\.gz", "regex")
    assert [k for k in KEYS if regex(k)] == ["sub-01/anat/sub-01_T1w.nii.gz"]


def test_arguments_are_escaped():
    pattern = fill_template("%s/anat/%s_T1w.nii.gz", ["sub-01[a]", "sub-01[a]"])
    assert [k for k in KEYS if compile_template(pattern)(k)] == [
        "sub-01[a]/anat/sub-01[a]_T1w.nii.gz"]
    rx = fill_template(r"%s/anat/.*", ["sub-01[a]"], "regex")
    assert [k for k in KEYS if compile_template(rx, "regex")(k)] == [
        "sub-01[a]/anat/sub-01[a]_T1w.nii.gz"]
    assert fill_template("sub%03d", [7]) == "sub007"


def test_fill_errors_name_template_and_args():
    with pytest.raises(TypeError, match=r"template '%s/%s' failed to convert with args \('a',\)"):
        fill_template("%s/%s", ["a"])


def test_regex_mode_spans_folders():
    match = compile_template(r"sub-0\d/.*_T1w\.nii\.gz", "regex")
    assert [k for k in KEYS if match(k)] == ["sub-01/anat/sub-01_T1w.nii.gz",
                                            "sub-02/anat/sub-02_T1w.nii.gz"]


def test_bad_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="is not a valid regular expression"):
        compile_template("sub-(01", "regex")


@pytest.mark.parametrize("pattern, mode, prefix", [
    ("sub-01/anat/*_T1w.nii.gz", "glob", "sub-01/anat/"),
    ("sub-0?/anat", "glob", "sub-0"),
    ("sub-01[[]a]/x*", "glob", "sub-01[a]/x"),
    ("*", "glob", ""),
    (r"sub-01/anat/sub-01_T1w\.nii", "regex", "sub-01/anat/sub-01_T1w.nii"),
    (r"sub\-01/func/.*", "regex", "sub-01/func/"),
    (r"sub-0\d/x", "regex", "sub-0"),
    ("sub-01s?/x", "regex", "sub-01"),
    ("^abc(d|e)", "regex", "abc"),
])
def test_literal_prefix(pattern, mode, prefix):
    assert literal_prefix(pattern, mode) == prefix


def test_covering_prefixes():
    assert covering_prefixes(["ds/sub-01/", "ds/sub-01/anat/", "ds/sub-02/", "ds/sub-02/"]) == [
        "ds/sub-01/", "ds/sub-02/"]
    assert covering_prefixes(["a/", ""]) == [""]
