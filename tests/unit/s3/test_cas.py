"""The content store: what it asks S3 before storing, and what it stores."""

import os

import boto3
import pytest
from moto import mock_aws

from nipype_s3.s3.cas import BLIND_PUT_BELOW, ContentStore, sha256_file


@pytest.fixture
def counted_client():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="cas-bucket")
        calls = []
        client.meta.events.register(
            "before-send.s3", lambda request, **kw: calls.append(request.method))
        yield client, calls


def test_small_files_are_put_without_asking_large_ones_are_asked_first(counted_client,
                                                                       tmp_path):
    client, calls = counted_client
    small = tmp_path / "small.txt"
    small.write_bytes(b"result pickle, report, hash json...")
    large = tmp_path / "large.bin"
    large.write_bytes(os.urandom(BLIND_PUT_BELOW + 10))

    first = ContentStore(client, "cas-bucket", "p")
    entries = first.put([str(small), str(large)])
    assert [e.sha256 for e in entries] == [sha256_file(small), sha256_file(large)]
    assert sorted(calls) == ["HEAD", "PUT", "PUT"]  # one HEAD: for the large file only

    calls.clear()
    first.put([str(small), str(large)])
    assert calls == []  # this store knows both now

    calls.clear()
    other = ContentStore(client, "cas-bucket", "p")  # another process, say
    other.put([str(small), str(large)])
    assert sorted(calls) == ["HEAD", "PUT"]  # the small one again, blind; the large one found
    body = client.get_object(Bucket="cas-bucket", Key=other.key(sha256_file(small)))["Body"]
    assert body.read() == small.read_bytes()


def test_withheld_files_are_not_stored_even_inside_a_stored_folder(counted_client, tmp_path,
                                                                   caplog):
    """A home folder handed over as an input must not take ~/.aws with it."""
    import logging

    client, _calls = counted_client
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = fake\n")
    (home / "data.txt").write_text("data")
    os.symlink(home / ".aws" / "credentials", home / "creds-link")  # nor through a link
    store = ContentStore(client, "cas-bucket", "p")
    store.withhold(str(home / ".aws"), "")
    with caplog.at_level(logging.WARNING, logger="nipype_s3"):
        entries = store.put([str(home)])
    assert [os.path.relpath(e.path, home) for e in entries] == ["data.txt"]
    assert "not stored" in caplog.text and ".aws" in caplog.text
    keys = client.list_objects_v2(Bucket="cas-bucket").get("Contents", [])
    assert [client.get_object(Bucket="cas-bucket", Key=k["Key"])["Body"].read()
            for k in keys] == [b"data"]


def test_link_entries_are_made_again_with_absolute_targets_moved(counted_client, tmp_path):
    from nipype_s3.s3.cas import ManifestEntry

    client, _calls = counted_client
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("f")
    os.symlink(src / "sub", src / "abs_link")
    os.symlink("sub/f.txt", src / "rel_link")
    store = ContentStore(client, "cas-bucket", "p")
    entries = [ManifestEntry.from_json(e.to_json()) for e in store.put([str(src)])]
    dest = tmp_path / "dest"
    moved = lambda p: p.replace(str(src), str(dest))  # noqa: E731
    ContentStore(client, "cas-bucket", "p").get(entries, moved, move_link=moved)
    assert os.readlink(dest / "abs_link") == str(dest / "sub")
    assert os.readlink(dest / "rel_link") == "sub/f.txt"  # relative: as it was
    assert (dest / "abs_link" / "f.txt").read_text() == "f"


def test_a_file_already_in_place_is_not_fetched_again_and_a_link_there_is_replaced(
        counted_client, tmp_path):
    """An agent's root keeps the inputs of its earlier jobs: a file with the entry's size
    and time is not fetched again (each job fetched every input anew). A symbolic link
    where an entry is a file gives way to the file, not to a download into its target."""
    client, calls = counted_client
    src = tmp_path / "src" / "t1.nii"
    src.parent.mkdir()
    src.write_bytes(b"image bytes")
    store = ContentStore(client, "cas-bucket", "p")
    entries = store.put([str(src)])
    dest = tmp_path / "worker" / "t1.nii"
    where = lambda path: str(dest)  # noqa: E731

    store.get(entries, where)
    assert dest.read_bytes() == b"image bytes"
    assert calls.count("GET") == 1
    calls.clear()
    ContentStore(client, "cas-bucket", "p").get(entries, where)  # the next job's store
    assert calls.count("GET") == 0

    other = tmp_path / "other.nii"
    other.write_bytes(b"image bytes")
    os.utime(other, (entries[0].mtime, entries[0].mtime))
    dest.unlink()
    dest.symlink_to(other)
    store.get(entries, where)
    assert not dest.is_symlink() and dest.read_bytes() == b"image bytes"
    assert other.read_bytes() == b"image bytes"
