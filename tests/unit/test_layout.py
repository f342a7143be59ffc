"""The key-layout rules against nipype's own DataSink as the oracle."""

import os
import posixpath

import pytest
from nipype.interfaces.io import DataSink

from nipype_s3.layout import as_key, destination_name, expand_entry, plan_sink, substitute


def _tree(root):
    out = set()
    for dirpath, _, files in os.walk(root):
        for name in files:
            out.add(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return out


def make_sources(tmp_path):
    src = tmp_path / "work"
    files = {
        "t1": src / "_subject_id_sub001" / "_run_1" / "t1.nii",
        "bold": src / "_subject_id_sub001" / "bold.nii.gz",
        "plain": src / "plain.txt",
        "m1": src / "mapflow" / "_realign0" / "r1.nii",
        "m2": src / "mapflow" / "_realign1" / "r2.nii",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    folder = src / "_subject_id_sub002" / "report"
    (folder / "figs").mkdir(parents=True)
    (folder / "index.html").write_text("x")
    (folder / "figs" / "a.svg").write_text("y")
    files["folder"] = folder
    return {k: str(v) for k, v in files.items()}


CASES = {
    "plain": ({"motion": ["t1", "bold"]}, {}),
    "dotted_and_at": ({"a.b": ["t1"], "a.@c": ["plain"], "@top": ["bold"]}, {}),
    "list_of_lists": ({"realigned": [["m1"], ["m2"]]}, {}),
    "folder": ({"reports": ["folder"]}, {}),
    "container": ({"anat": ["t1"]}, {"container": "sub001"}),
    "no_parameterization": ({"anat": ["t1", "bold", "folder"]}, {"parameterization": False}),
    "substitutions": ({"anat": ["t1", "bold"]}, {
        "substitutions": [("_subject_id_", "sub-"), ("t1.nii", "T1w.nii")],
        "regexp_substitutions": [(r"_run_(\d)", r"run-\1")]}),
    "strip_dir": ({"anat": ["t1"]}, {"strip_dir": "_subject_id_sub001"}),
    "single_string": ({"x": "plain"}, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keys_equal_nipype_datasink_paths(tmp_path, case):
    names, options = CASES[case]
    sources = make_sources(tmp_path)

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return sources[value]

    outputs = {name: resolve(value) for name, value in names.items()}
    if "strip_dir" in options:
        options = dict(options, strip_dir=os.path.join(str(tmp_path / "work"),
                                                       options["strip_dir"]))

    base = tmp_path / "nipype_out"
    sink = DataSink(base_directory=str(base), **options)
    for name, value in outputs.items():
        setattr(sink.inputs, name, value)
    sink.run(cwd=str(tmp_path))
    expected = _tree(base)

    entries = plan_sink(outputs, root="prefix/out", join=posixpath.join, **options)
    keys = {key for e in entries for _, key in expand_entry(e)}
    assert {k[len("prefix/out/"):] for k in keys} == expected
    assert all(k.startswith("prefix/out/") for k in keys)

    local = plan_sink(outputs, root=str(base), join=os.path.join, **options)
    assert {os.path.relpath(d, base).replace(os.sep, "/") for e in local
            for _, d in expand_entry(e, os.path.join)} == expected


def test_as_key_drops_empty_folder_names_as_a_file_system_does():
    assert as_key("out/sub-01/reoriented/sub-01//mean.nii") == \
        "out/sub-01/reoriented/sub-01/mean.nii"
    assert as_key("/out/./a//b/") == "out/a/b"
    assert as_key("out/a b/ü.nii") == "out/a b/ü.nii"


def test_destination_name():
    assert destination_name("/w/_a_1/x/_b_2/f.nii") == "_a_1/_b_2/f.nii"
    assert destination_name("/w/_a_1/f.nii", parameterization=False) == "f.nii"
    assert destination_name("/w/_a_1/dir/") == "_a_1/dir"
    assert destination_name("/w/_a_1/f.nii", strip_dir="/w/_a_1") == "f.nii"


def test_substitute_order_plain_then_regexp():
    assert substitute("a/_x_1/f.nii", [("_x_", "x-")], [(r"x-(\d)", r"X\1")]) == "a/X1/f.nii"
