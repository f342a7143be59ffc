"""The digest cache: a digest is reused only for the very bytes it was computed from."""

import os
import threading

import pytest

from nipype_s3.s3 import digests
from nipype_s3.s3.hashing import etag_matches, file_md5, multipart_etag


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "digests.sqlite"
    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(path))
    return path


def _counting(fn):
    calls = []

    def wrapped(path):
        calls.append(path)
        return fn(path)
    return wrapped, calls


def test_second_look_at_an_unchanged_file_reads_nothing(cache, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(os.urandom(3000))
    md5, calls = _counting(file_md5)
    assert digests.cached_digest(f, "md5", md5) == file_md5(f)
    assert digests.cached_digest(f, "md5", md5) == file_md5(f)
    assert len(calls) == 1
    assert cache.exists()


def test_same_size_same_mtime_new_bytes_is_recomputed(cache, tmp_path):
    """Setting the modification time back by hand does not fool it (change time moves)."""
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    st = os.stat(f)
    md5, calls = _counting(file_md5)
    first = digests.cached_digest(f, "md5", md5)
    f.write_bytes(b"y" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_mtime_ns == st.st_mtime_ns and os.stat(f).st_size == st.st_size
    second = digests.cached_digest(f, "md5", md5)
    assert second == file_md5(f) != first
    assert len(calls) == 2


def test_kinds_are_kept_apart(cache, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    etag = multipart_etag(f, 1024 * 1024)
    assert etag_matches(f, etag, part_size=1024 * 1024)
    assert etag_matches(f, etag, part_size=1024 * 1024)  # from the cache this time
    assert etag_matches(f, file_md5(f), part_size=1024 * 1024)
    assert not etag_matches(f, multipart_etag(f, 2 * 1024 * 1024).replace("-3", "-6"),
                            part_size=1024 * 1024)


def test_a_file_changing_while_read_is_not_cached(cache, tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")

    def md5_then_change(path):
        digest = file_md5(path)
        with open(path, "ab") as fobj:
            fobj.write(b"more")
        return digest

    digests.cached_digest(f, "md5", md5_then_change)
    md5, calls = _counting(file_md5)
    assert digests.cached_digest(f, "md5", md5) == file_md5(f)
    assert len(calls) == 1


def test_off_and_unusable_caches_just_compute(tmp_path, monkeypatch):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    md5, calls = _counting(file_md5)
    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", "off")
    assert digests.cache_path() is None
    digests.cached_digest(f, "md5", md5)
    digests.cached_digest(f, "md5", md5)
    assert len(calls) == 2
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(blocker / "digests.sqlite"))
    assert digests.cached_digest(f, "md5", md5) == file_md5(f)
    assert digests.cached_digest(f, "md5", md5) == file_md5(f)
    assert len(calls) == 4


def test_threads_share_it(cache, tmp_path):
    files = []
    for i in range(40):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(os.urandom(100 + i))
        files.append(f)
    errors = []

    def work():
        try:
            for f in files:
                assert digests.cached_digest(f, "md5", file_md5) == file_md5(f)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_the_cache_is_private_to_its_owner(tmp_path, monkeypatch):
    """It lists what was hashed: only its owner may read it (0600, in a 0700 folder),
    SQLite's companion files too, and a file made readable by others is closed again."""
    import stat

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("NIPYPE_S3_DIGEST_CACHE")
    old = os.umask(0o022)  # a usual umask: files would be made readable by all
    try:
        f = tmp_path / "sub-01_T1w.nii.gz"
        f.write_bytes(b"image")
        digests.cached_digest(f, "md5", file_md5)
        folder = tmp_path / "xdg" / "nipype_s3"
        assert digests.cache_path() == str(folder / "digests.sqlite")
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        names = sorted(p.name for p in folder.iterdir())
        assert "digests.sqlite" in names
        assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()} == \
            {name: "0o600" for name in names}

        # one made readable by others (an earlier version's file, say) is closed again
        os.chmod(folder, 0o755)
        os.chmod(folder / "digests.sqlite", 0o644)
        monkeypatch.setitem(digests._state, "pid", None)  # as a new process
        digests.cached_digest(f, "md5", file_md5)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "digests.sqlite").stat().st_mode) == 0o600

        # a file named by NIPYPE_S3_DIGEST_CACHE: its new folder 0700, the file 0600
        monkeypatch.setenv("NIPYPE_S3_DIGEST_CACHE", str(tmp_path / "mine" / "d.sqlite"))
        digests.cached_digest(f, "md5", file_md5)
        assert stat.S_IMODE((tmp_path / "mine").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "mine" / "d.sqlite").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_the_cache_names_no_path_and_forgets_the_old_rows_that_did(cache, tmp_path):
    """Rows are keyed by (device, inode, size, mtime, ctime): nothing in the file says
    which subject was hashed; an earlier version's table of paths is dropped."""
    import sqlite3

    cache.parent.mkdir(parents=True)
    with sqlite3.connect(cache) as old:
        old.execute("CREATE TABLE digests (ident TEXT PRIMARY KEY, digest TEXT NOT NULL, "
                    "used REAL NOT NULL)")
        old.execute("INSERT INTO digests VALUES (?, ?, 0)",
                    ("/data/sub-0042/anat/sub-0042_T1w.nii.gz\x00md5", "0" * 32))
    old.close()
    f = tmp_path / "sub-0099_T1w.nii.gz"
    f.write_bytes(b"image")
    digests.cached_digest(f, "md5", file_md5)
    digests._state["conn"].close()  # everything written out
    digests._state["pid"] = None
    raw = b"".join(p.read_bytes() for p in cache.parent.iterdir())
    assert b"sub-0099" not in raw and b"sub-0042" not in raw
    assert str(tmp_path).encode() not in raw
    st = os.stat(f)
    assert digests.file_identity(st) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                         st.st_ctime_ns)
    md5, calls = _counting(file_md5)
    assert digests.cached_digest(f, "md5", md5) == file_md5(f) and calls == []
