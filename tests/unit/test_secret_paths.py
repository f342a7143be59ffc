"""A home folder given to a node is staged without the well-known secret files in it
(the deny-list :data:`nipype_s3.secrets.SECRET_PATHS`), each with a warning."""

import logging
import os

import pytest

from nipype_s3.s3.cas import ContentStore
from nipype_s3.secrets import SECRET_PATHS, withheld_paths


@pytest.mark.parametrize("entry", SECRET_PATHS)
def test_each_secret_path_in_a_home_folder_is_withheld(s3_inprocess, tmp_path, monkeypatch,
                                                      caplog, entry):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    secret = home / entry[2:]
    if "." in os.path.basename(entry) and not entry.endswith(("/.ssh", "/.gnupg")) and \
            os.path.basename(entry) not in (".aws", ".azure", ".password-store"):
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("token = not-for-instances")  # a file
    else:
        secret.mkdir(parents=True)  # a folder: everything in it
        (secret / "inside").write_text("token = not-for-instances")
    (home / "analysis.txt").write_text("data")
    os.symlink(secret, home / "shortcut")  # nor through a link
    s3_inprocess.create_bucket(Bucket="cas-bucket")
    store = ContentStore(s3_inprocess, "cas-bucket", "p")
    store.withhold(*withheld_paths({}))
    with caplog.at_level(logging.WARNING, logger="nipype_s3"):
        entries = store.put([str(home)])
    assert [os.path.relpath(e.path, home) for e in entries] == ["analysis.txt"]
    assert "not stored" in caplog.text
    bodies = [s3_inprocess.get_object(Bucket="cas-bucket", Key=o["Key"])["Body"].read()
              for o in s3_inprocess.list_objects_v2(Bucket="cas-bucket").get("Contents", [])]
    assert bodies == [b"data"]


def test_files_the_environment_names_are_withheld_too(tmp_path):
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "creds"),
           "KUBECONFIG": f"{tmp_path / 'k1'}{os.pathsep}{tmp_path / 'k2'}",
           "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "sa.json")}
    paths = withheld_paths(env)
    for value in (str(tmp_path / "creds"), str(tmp_path / "k1"), str(tmp_path / "k2"),
                  str(tmp_path / "sa.json")):
        assert value in paths


def test_the_deny_list_is_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs",
                            "ec2plugin.rst")).read()
    missing = [p for p in SECRET_PATHS if f"``{p}``" not in doc]
    assert missing == []


def test_secrets_in_someone_elses_home_or_a_dataset_are_withheld_too(s3_inprocess, tmp_path):
    """Not only below this machine's $HOME: a folder given to a node that holds another
    home (or a copy of one inside a dataset) keeps its .ssh, .netrc ... too, and the
    store says which it left out."""
    from nipype_s3.secrets import withheld_names

    other = tmp_path / "dataset" / "sub-01" / "home-copy"
    (other / ".ssh").mkdir(parents=True)
    (other / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (other / ".netrc").write_text("machine x password y")
    (other / ".docker").mkdir()
    (other / ".docker" / "config.json").write_text('{"auths": {}}')
    (other / "notes.ssh.txt").write_text("not a secret")  # only the names themselves
    (tmp_path / "dataset" / "sub-01" / "anat.nii").write_text("image")
    s3_inprocess.create_bucket(Bucket="cas-bucket")
    store = ContentStore(s3_inprocess, "cas-bucket", "p")
    store.withhold_names(*withheld_names())
    told = []
    store.on_withheld = told.extend
    entries = store.put([str(tmp_path / "dataset")])
    assert sorted(os.path.relpath(e.path, tmp_path / "dataset") for e in entries) == [
        "sub-01/anat.nii", "sub-01/home-copy/notes.ssh.txt"]
    assert sorted(os.path.relpath(p, other) for p in told) == [
        ".docker/config.json", ".netrc", ".ssh/id_rsa"]
