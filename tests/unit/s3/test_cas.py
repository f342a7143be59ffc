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


def test_jobs_sent_at_once_sharing_a_folder_send_each_file_once(counted_client, tmp_path):
    """Three subjects' jobs, sent by three threads at once, name the same folder: its
    files go up once, the other jobs wait for them instead of sending them again."""
    from concurrent.futures import ThreadPoolExecutor

    client, calls = counted_client
    shared = tmp_path / "templates"
    shared.mkdir()
    for i in range(6):
        (shared / f"t{i}.nii").write_bytes(os.urandom(BLIND_PUT_BELOW // 2 + i))
    store = ContentStore(client, "cas-bucket", "p")
    with ThreadPoolExecutor(max_workers=3) as pool:
        manifests = list(pool.map(lambda _: store.put([str(shared)]), range(3)))
    assert all(sorted(e.sha256 for e in m) == sorted(e.sha256 for e in manifests[0])
               for m in manifests)
    assert calls.count("PUT") == 6


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


# -- the key is a promise about the bytes ------------------------------------------------

def _b64(data: bytes) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _corrupt_objects(client, bucket="cas-bucket"):
    """The keys of the store whose bytes do not hash to their name."""
    import hashlib

    bad = []
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        if hashlib.sha256(body).hexdigest() != obj["Key"].rsplit("/", 1)[1]:
            bad.append(obj["Key"])
    return bad


def _on(client, operation, action):
    """Run ``action()`` when ``operation`` is about to be sent (as if meanwhile)."""
    client.meta.events.register(f"before-send.s3.{operation}", lambda **kw: action())


def test_objects_go_up_with_their_sha256_as_checksum(counted_client, tmp_path):
    """A single PUT carries the whole file's SHA-256 (S3 refuses other bytes); a
    multipart upload a SHA-256 per part, and S3 keeps the checksum of those."""
    import base64
    import hashlib

    from nipype_s3.s3.transfer import TransferSettings

    client, _calls = counted_client
    sent = []
    client.meta.events.register("before-send.s3", lambda request, **kw: sent.append(
        (request.method, request.headers.get("x-amz-checksum-sha256"))))
    small, large = tmp_path / "small.txt", tmp_path / "large.bin"
    small.write_bytes(b"a report")
    large.write_bytes(os.urandom(11 * 1024 * 1024))
    settings = TransferSettings(multipart_threshold=5 * 1024 * 1024,
                                multipart_chunksize=5 * 1024 * 1024)
    store = ContentStore(client, "cas-bucket", "p", settings=settings)
    store.put([str(small), str(large)])
    assert ("PUT", _b64(small.read_bytes()).encode()) in sent
    head = client.head_object(Bucket="cas-bucket", Key=store.key(sha256_file(small)),
                              ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == _b64(small.read_bytes())
    head = client.head_object(Bucket="cas-bucket", Key=store.key(sha256_file(large)),
                              ChecksumMode="ENABLED")
    data = large.read_bytes()
    parts = [hashlib.sha256(data[i:i + 5 * 1024 * 1024]).digest()
             for i in range(0, len(data), 5 * 1024 * 1024)]
    of_parts = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    assert head["ChecksumSHA256"] in (of_parts, f"{of_parts}-3")  # moto: without "-3"
    assert _corrupt_objects(client) == []


def test_a_file_changed_between_hashing_and_upload_is_hashed_and_sent_again(
        counted_client, tmp_path):
    """A log still being written: what went up under the old digest is deleted, and the
    entry and the object are the file as it was sent."""
    client, _calls = counted_client
    log = tmp_path / "work" / "node.log"
    log.parent.mkdir()
    log.write_bytes(os.urandom(BLIND_PUT_BELOW))  # large enough to be asked about first
    appended = []

    def append_once():
        if not appended:
            appended.append(True)
            with open(log, "ab") as fobj:
                fobj.write(b"one more line\n")

    _on(client, "HeadObject", append_once)
    store = ContentStore(client, "cas-bucket", "p")
    [entry] = store.put([str(log.parent)])
    assert appended
    assert entry.sha256 == sha256_file(log) and entry.size == log.stat().st_size
    assert _corrupt_objects(client) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="cas-bucket")["Contents"]]
    assert keys == [store.key(sha256_file(log))]


def test_a_file_that_keeps_changing_is_an_error_naming_it(counted_client, tmp_path):
    from nipype_s3.exceptions import TransferFailed

    client, _calls = counted_client
    log = tmp_path / "growing.log"
    log.write_bytes(os.urandom(BLIND_PUT_BELOW))

    def append():
        with open(log, "ab") as fobj:
            fobj.write(b"still running\n")

    _on(client, "HeadObject", append)
    with pytest.raises(TransferFailed, match="changed while it was being stored") as info:
        ContentStore(client, "cas-bucket", "p").put([str(log)])
    assert repr(str(log)) in str(info.value) and "still being written" in str(info.value)
    assert _corrupt_objects(client) == []


def test_a_file_rewritten_with_the_same_size_and_time_is_hashed_again(counted_client,
                                                                      tmp_path):
    """The store's own memory of digests knows a file by inode and change time too."""
    client, _calls = counted_client
    f = tmp_path / "t1.nii"
    f.write_bytes(b"x" * 1000)
    store = ContentStore(client, "cas-bucket", "p")
    [first] = store.put([str(f)])
    st = f.stat()
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    [second] = store.put([str(f)])
    assert second.sha256 == sha256_file(f) != first.sha256
    assert store.digest(str(f)) == sha256_file(f)
    assert _corrupt_objects(client) == []


@pytest.mark.parametrize("planted", ["no checksum", "its own checksum"])
def test_an_object_already_there_counts_only_when_its_checksum_is_the_key(
        counted_client, tmp_path, planted):
    """A large file is asked about before it is sent; a corrupt object found there
    (planted, or left by an older version) is replaced, not trusted for ever."""
    client, calls = counted_client
    f = tmp_path / "large.bin"
    f.write_bytes(os.urandom(BLIND_PUT_BELOW + 10))
    store = ContentStore(client, "cas-bucket", "p")
    key = store.key(sha256_file(f))
    evil = b"not the file"
    extra = {} if planted == "no checksum" else {"ChecksumAlgorithm": "SHA256",
                                                 "ChecksumSHA256": _b64(evil)}
    client.put_object(Bucket="cas-bucket", Key=key, Body=evil, **extra)
    calls.clear()
    store.put([str(f)])
    assert calls == ["HEAD", "PUT"]
    assert client.get_object(Bucket="cas-bucket", Key=key)["Body"].read() == f.read_bytes()
    client.put_object(Bucket="cas-bucket", Key=key, Body=evil, **extra)
    fresh = ContentStore(client, "cas-bucket", "p")
    assert not fresh.verify_object(sha256_file(f)) and not fresh.exists(sha256_file(f))

    fresh.put([str(f)])
    calls.clear()
    ContentStore(client, "cas-bucket", "p").put([str(f)])  # S3 now vouches for it
    assert calls == ["HEAD"]


def test_a_multipart_object_is_checked_by_its_checksum_of_parts(counted_client, tmp_path):
    from nipype_s3.s3.transfer import TransferSettings

    client, calls = counted_client
    settings = TransferSettings(multipart_threshold=5 * 1024 * 1024,
                                multipart_chunksize=5 * 1024 * 1024)
    f = tmp_path / "bold.nii"
    f.write_bytes(os.urandom(11 * 1024 * 1024))
    ContentStore(client, "cas-bucket", "p", settings=settings).put([str(f)])
    calls.clear()
    ContentStore(client, "cas-bucket", "p", settings=settings).put([str(f)])
    assert calls == ["HEAD"]  # found whole, by its parts' checksums

    # other bytes of the same size, sent in parts under the file's key: replaced
    other = tmp_path / "other.nii"
    other.write_bytes(os.urandom(11 * 1024 * 1024))
    store = ContentStore(client, "cas-bucket", "p", settings=settings)
    client.upload_file(str(other), "cas-bucket", store.key(sha256_file(f)),
                       ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                       Config=__import__("boto3").s3.transfer.TransferConfig(
                           multipart_threshold=5 * 1024 * 1024,
                           multipart_chunksize=5 * 1024 * 1024))
    assert _corrupt_objects(client)
    calls.clear()
    store.put([str(f)])
    assert "PUT" in calls and _corrupt_objects(client) == []


def test_fetched_bytes_that_are_not_their_key_s_remove_the_object_and_the_next_put_heals(
        counted_client, tmp_path):
    """The failure names the file and says what happened; the object is gone, so the
    next run stores the real file again instead of failing for ever."""
    from nipype_s3.exceptions import TransferFailed

    client, _calls = counted_client
    f = tmp_path / "src" / "T1w.nii.gz"
    f.parent.mkdir()
    f.write_bytes(os.urandom(BLIND_PUT_BELOW + 10))
    store = ContentStore(client, "cas-bucket", "p")
    entries = store.put([str(f)])
    key = store.key(entries[0].sha256)
    client.put_object(Bucket="cas-bucket", Key=key, Body=b"x" * (BLIND_PUT_BELOW + 10))
    dest = tmp_path / "worker" / "T1w.nii.gz"
    with pytest.raises(TransferFailed, match="do not match their SHA-256") as info:
        ContentStore(client, "cas-bucket", "p").get(entries, lambda path: str(dest))
    assert repr(str(f)) in str(info.value) and "deleted from the store" in str(info.value)
    assert not dest.exists()
    assert client.list_objects_v2(Bucket="cas-bucket").get("KeyCount") == 0

    ContentStore(client, "cas-bucket", "p").put([str(f)])  # the next run
    ContentStore(client, "cas-bucket", "p").get(entries, lambda path: str(dest))
    assert dest.read_bytes() == f.read_bytes()


def test_put_bytes_replaces_what_it_cannot_verify_and_sends_nothing_it_can(counted_client):
    """What the plugin ships its own package with: a zip planted at its key is not
    what the agents get."""
    import hashlib

    client, calls = counted_client
    data = b"PK\x03\x04 the package"
    store = ContentStore(client, "cas-bucket", "p")
    key = store.key(hashlib.sha256(data).hexdigest())
    client.put_object(Bucket="cas-bucket", Key=key, Body=b"PK\x03\x04 something else")
    calls.clear()
    assert store.put_bytes(data) == key
    assert calls == ["HEAD", "PUT"]
    assert client.get_object(Bucket="cas-bucket", Key=key)["Body"].read() == data
    calls.clear()
    other = ContentStore(client, "cas-bucket", "p")
    assert other.put_bytes(data) == key and other.exists(hashlib.sha256(data).hexdigest())
    assert calls == ["HEAD"]


def test_when_the_object_cannot_be_deleted_the_next_put_still_replaces_it(counted_client,
                                                                          tmp_path):
    """An agent's role may not delete from the store: the error says so and names the
    object, and the controller's next put does not trust it (no checksum of its key)."""
    import botocore.exceptions

    from nipype_s3.exceptions import TransferFailed

    client, calls = counted_client
    f = tmp_path / "bold.nii"
    f.write_bytes(os.urandom(BLIND_PUT_BELOW + 10))
    entries = ContentStore(client, "cas-bucket", "p").put([str(f)])
    key = ContentStore(client, "cas-bucket", "p").key(entries[0].sha256)
    client.put_object(Bucket="cas-bucket", Key=key, Body=b"z" * (BLIND_PUT_BELOW + 10))

    def denied(**kwargs):
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": "AccessDenied", "Message": "denied"},
             "ResponseMetadata": {"HTTPStatusCode": 403}}, "DeleteObject")

    agent = ContentStore(client, "cas-bucket", "p")
    agent.client = type("AgentClient", (), {"__getattr__": lambda self, name: getattr(
        client, name), "delete_object": staticmethod(denied)})()
    with pytest.raises(TransferFailed, match="could not be deleted") as info:
        agent.get(entries, lambda path: str(tmp_path / "worker.nii"))
    assert f"s3://cas-bucket/{key} by hand" in str(info.value)

    calls.clear()
    ContentStore(client, "cas-bucket", "p").put([str(f)])  # the controller's next run
    assert calls == ["HEAD", "PUT"]
    assert client.get_object(Bucket="cas-bucket", Key=key)["Body"].read() == f.read_bytes()
