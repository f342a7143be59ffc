"""Symbolic links in folders a user hands over: followed where the data must travel,
kept as links where they can be made again, and never a reason to lose or stop."""

import os

from nipype_s3.agent.worker import node_dir_contents
from nipype_s3.localfs import copy_tree, make_link, walk_files
from nipype_s3.s3.cas import ManifestEntry


def _tree(root):
    """root/top.txt, root/a/b/f.txt; a/b/loop -> a (a loop), linkb -> a/b (a folder),
    a/toplink -> top.txt (a file), broken -> nothing."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("f")
    (root / "top.txt").write_text("t")
    os.symlink(root / "a", root / "a" / "b" / "loop")
    os.symlink(root / "a" / "b", root / "linkb")
    os.symlink(root / "top.txt", root / "a" / "toplink")
    os.symlink(root / "nothing", root / "broken")
    return root


def _rel(root, paths):
    return [os.path.relpath(p, root) for p in paths]


def test_walk_follows_linked_files_and_folders_ends_loops_and_sets_broken_links_apart(
        tmp_path):
    root = _tree(tmp_path / "t")
    files, links = walk_files(str(root))
    assert _rel(root, files) == ["top.txt", "a/toplink", "a/b/f.txt", "linkb/f.txt"]
    assert _rel(root, links) == ["broken"]


def test_walk_can_keep_links_to_inside_the_folder_as_links(tmp_path):
    root = _tree(tmp_path / "t")
    outside = tmp_path / "outside.txt"
    outside.write_text("o")
    os.symlink(outside, root / "out_link")
    files, links = walk_files(str(root), keep_inner_links=True)
    assert _rel(root, files) == ["out_link", "top.txt", "a/b/f.txt"]  # outside: followed
    assert _rel(root, links) == ["broken", "linkb", "a/toplink", "a/b/loop"]


def test_local_copies_follow_links_and_skip_broken_ones(tmp_path):
    root = _tree(tmp_path / "t")
    dest = tmp_path / "copy"
    copy_tree(str(root), str(dest))
    assert (dest / "linkb" / "f.txt").read_text() == "f"
    assert sorted(os.listdir(dest / "linkb")) == ["f.txt"]  # not the loop back to a/
    assert not os.path.islink(dest / "linkb") and not os.path.lexists(dest / "broken")


def test_link_entries_round_trip_and_plain_entries_keep_their_json(tmp_path):
    os.symlink("../elsewhere", tmp_path / "l")
    entry = ManifestEntry.for_link(str(tmp_path / "l"))
    assert entry.link == "../elsewhere" and entry.sha256 == "" and entry.size == 0
    assert ManifestEntry.from_json(entry.to_json()) == entry
    plain = ManifestEntry("p", "ab" * 32, 3, 1.0)
    assert "link" not in plain.to_json() and ManifestEntry.from_json(plain.to_json()) == plain


def test_make_link_replaces_a_file_or_link_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "x"
    make_link(str(path), "target-one")
    make_link(str(path), "target-one")  # already so
    assert os.readlink(path) == "target-one"
    os.remove(path)
    path.write_text("a file")
    make_link(str(path), "/abs/target-two")
    assert os.readlink(path) == "/abs/target-two"
    assert sorted(os.listdir(path.parent)) == ["x"]


def test_a_node_directory_keeps_links_the_controller_can_make_again(tmp_path):
    """Below the worker root (the node's folder, inputs, other nodes' outputs), into
    folders, or broken: links. A file elsewhere on the instance: its content. A pipe:
    nothing."""
    root = tmp_path / "root"
    node = root / "work" / "wf" / "node"
    (node / "sub").mkdir(parents=True)
    (node / "sub" / "f.txt").write_text("f")
    (root / "in.nii").write_text("input")
    system = tmp_path / "opt" / "atlas.nii"
    system.parent.mkdir()
    system.write_text("atlas")
    os.symlink(node / "sub" / "f.txt", node / "inner")
    os.symlink(root / "in.nii", node / "input_link")
    os.symlink(node / "sub", node / "dir_link")
    os.symlink(tmp_path / "opt", node / "outside_dir_link")
    os.symlink(node / "missing", node / "broken")
    os.symlink(system, node / "atlas_link")
    os.mkfifo(node / "pipe")  # opening it to store it would wait forever
    files, links = node_dir_contents(str(node), str(root))
    assert _rel(node, files) == ["atlas_link", "sub/f.txt"]
    assert _rel(node, links) == ["broken", "inner", "input_link", "dir_link",
                                 "outside_dir_link"]


def test_a_job_given_a_folder_works_in_a_view_of_its_own(tmp_path):
    """Jobs packed on one agent share its root. A job given a folder (a subjects_dir)
    gets folders of its own with hard links to the files (no copy), links into the root
    moved into them and a neighbour's download under way left out; what it then creates
    or changes there is reported, and what it creates is in its view alone."""
    from nipype_s3.agent.worker import private_view, written_elsewhere
    from nipype_s3.pickles import PathMap
    from nipype_s3.s3.cas import ManifestEntry

    shared_root = tmp_path / "agent"
    subjects = "/data/subjects"
    t1 = "/data/t1.nii"
    shared = PathMap(str(shared_root), (subjects, t1, "/work"))
    folder = shared_root / "data" / "subjects"
    (folder / "sub-01").mkdir(parents=True)
    (folder / "sub-01" / "notes.txt").write_text("start\n")
    (folder / "sub-01" / "old.txt").write_text("kept as it was")
    os.symlink(folder / "sub-01", folder / "latest")  # absolute, into the shared root
    (folder / "sub-02.nipype-s3-99-n.part").write_text("")  # a neighbour's download
    (shared_root / "data" / "t1.nii").write_text("image")
    manifest = []
    for path in ("/data/subjects/sub-01/notes.txt", "/data/subjects/sub-01/old.txt",
                 "/data/t1.nii"):
        st = os.stat(shared.to_worker(path))
        manifest.append(ManifestEntry(path, "x", st.st_size, st.st_mtime))
    manifest.append(ManifestEntry("/data/subjects/latest", "", 0, 0.0,
                                  "/data/subjects/sub-01"))

    view_root = shared_root / ".views" / "job-1"
    view = private_view(shared, str(view_root), manifest, [subjects])
    mine = view_root / "data" / "subjects"
    assert view.root == str(view_root)
    assert os.readlink(mine / "latest") == str(mine / "sub-01")
    assert not os.path.lexists(mine / "sub-02.nipype-s3-99-n.part")
    for rel in ("t1.nii", "subjects/sub-01/old.txt"):  # hard links: nothing copied
        assert os.stat(view_root / "data" / rel).st_ino == \
            os.stat(shared_root / "data" / rel).st_ino
    with open(mine / "sub-01" / "notes.txt", "a") as fobj:  # the node at work
        fobj.write("done\n")
    (mine / "sub-01" / "mri").mkdir()
    (mine / "sub-01" / "mri" / "T1.mgz").write_text("T1")
    os.symlink("mri/T1.mgz", mine / "sub-01" / "T1_link.mgz")
    assert not (folder / "sub-01" / "mri").exists()  # what it makes is its own

    staged = {view.to_worker(e.path): e if e.link is None else ManifestEntry(
        e.path, e.sha256, e.size, e.mtime, view.to_worker(e.link)) for e in manifest}
    outdir = str(view_root / "work" / "wf" / "node")
    files, links = written_elsewhere(outdir, str(view_root), [str(mine)], staged)
    assert _rel(mine, files) == ["sub-01/notes.txt", "sub-01/mri/T1.mgz"]
    assert _rel(mine, links) == ["sub-01/T1_link.mgz"]
