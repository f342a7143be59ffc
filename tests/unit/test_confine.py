"""The one confinement rule (:func:`nipype_s3.localfs.confine`), fed hostile input.

Every place that turns an S3 key or a remote report's entry into a local path uses it:
the grabber, the controller collecting a job, its write-back, EC2ContainerRun's fetch.
"""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nipype_s3.exceptions import UnsafePath
from nipype_s3.localfs import check_key_segments, confine, confine_absolute, is_within


def test_is_within_normalises_dot_dot():
    assert not is_within("/a", "/a/../../x")
    assert not is_within("/a", "/a/../ab")
    assert is_within("/a", "/a/b/../c")
    assert not is_within("/a", "/ab")


@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "", ".", "a/./b",
                                 "a//b", "a/b/..", "..", "x\0y"])
def test_climbing_absolute_and_empty_segments_are_refused(tmp_path, rel):
    with pytest.raises(UnsafePath, match="Refusing"):
        confine(str(tmp_path), rel)


def test_a_link_made_earlier_is_not_written_through(tmp_path):
    """A report first makes ``d -> /outside`` (allowed: a link can point anywhere),
    then names ``d/evil``: writing that would write outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "node"
    root.mkdir()
    link = confine(str(root), "d", link=True)
    os.symlink(str(outside), link)
    with pytest.raises(UnsafePath, match="through a symbolic link"):
        confine(str(root), "d/evil")
    with pytest.raises(UnsafePath):  # the link's own name, written as a file
        confine(str(root), "d")
    # a link inside the folder to somewhere inside is fine
    (root / "sub").mkdir()
    os.symlink(str(root / "sub"), root / "inner")
    assert confine(str(root), "inner/ok") == os.path.join(os.path.realpath(root), "inner/ok")


def test_a_link_to_a_file_outside_is_not_written_through(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    root = tmp_path / "node"
    root.mkdir()
    os.symlink(str(target), root / "f")
    with pytest.raises(UnsafePath):
        confine(str(root), "f")


@pytest.mark.parametrize("path, ok", [
    ("/data/sub/x.nii", True), ("/data/sub", False), ("/data/sub/../x", False),
    ("/data/subx/y", False), ("relative/x", False), ("/data/sub/./x", False),
    ("/data/out.nii.gz", True), ("/data/out.nii.gz.other", False)])
def test_absolute_paths_must_lie_in_what_may_be_written(tmp_path, path, ok):
    base = str(tmp_path)
    os.makedirs(base + "/data/sub")
    allowed = [base + "/data/sub/", base + "/data/out.nii.gz"]
    allowed[0] = allowed[0].rstrip("/")
    full = path if not path.startswith("/") else base + path
    if ok:
        assert confine_absolute(allowed, full) == full
    else:
        with pytest.raises(UnsafePath):
            confine_absolute(allowed, full)


def test_absolute_paths_through_a_link_are_refused(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    os.symlink("/etc", sub / "etc")
    with pytest.raises(UnsafePath):
        confine_absolute([str(sub)], str(sub / "etc" / "cron.d"))
    # the link itself may be made again (its folder is the allowed one)
    assert confine_absolute([str(sub)], str(sub / "etc"), link=True)


@pytest.mark.parametrize("key", ["a/../b", "../b", "a//b", "./a", "a/.", ""])
def test_keys_with_dot_or_empty_segments_are_named(key):
    with pytest.raises(UnsafePath, match="Refusing the S3 key"):
        check_key_segments(key)
    assert check_key_segments("a/b/") == "a/b/"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "c.nii", "\\", "~"]),
                min_size=1, max_size=8))
def test_whatever_is_accepted_lies_below_the_root(tmp_path_factory, parts):
    root = str(tmp_path_factory.mktemp("root"))
    rel = "/".join(parts)
    try:
        path = confine(root, rel)
    except UnsafePath:
        return
    real_root = os.path.realpath(root)
    assert os.path.normpath(path).startswith(real_root + os.sep)
