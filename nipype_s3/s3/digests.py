"""A cache of local files' digests, so an unchanged re-run does not read them again.

Skip-unchanged compares a file with an object's ETag, and the content store names a
file by its SHA-256: both mean hashing the file, and for a few large files that is most
of a re-run's time (800 MB read to send nothing). A digest is kept here under the
identity of the version of the file it was computed from (:func:`file_identity`):
device, inode, size, and the modification *and* change times in nanoseconds. Rewriting
the file changes them, and so does setting its modification time back by hand (that
updates the change time), so a cached digest is only ever used for the very bytes it
was computed from. A digest whose file changed while it was read is not kept.

The identity names no path: the cache tells nothing of which files (subjects,
sessions) were hashed. It is one SQLite file per user
(``$XDG_CACHE_HOME/nipype_s3/digests.sqlite``, mode 0600 in a 0700 folder), shared by
processes and threads; ``NIPYPE_S3_DIGEST_CACHE`` names another file, or ``off``. A
file another user owns is not used. It is only a cache: if it cannot be opened or
written, digests are computed as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

__all__ = ["cached_digest", "digest_of", "file_identity", "cache_path", "remember"]

logger = logging.getLogger(__name__)

_MAX_ROWS = 200_000  # ~20 MB; the least recently used half goes when it is reached

#: earlier versions kept rows named by path in this table: it is dropped when found
_OLD_TABLE = "digests"
_TABLE = "file_digests"

_lock = threading.Lock()
_state: dict = {"pid": None, "conn": None, "path": None}


def file_identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What tells one version of a file from any other: ``(device, inode, size,
    mtime_ns, ctime_ns)``. Equal identities, the same bytes (short of a write that
    changes neither time, which no normal writer makes)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _default_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nipype_s3")


def cache_path() -> str | None:
    """The cache file in use, or ``None`` when switched off."""
    value = os.environ.get("NIPYPE_S3_DIGEST_CACHE", "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    return os.path.join(_default_folder(), "digests.sqlite")


def _make_private(path: str) -> None:
    """The cache file (and SQLite's ``-wal``/``-shm`` beside it) readable by its owner
    only, in a folder only the owner may enter: made so, or set so when they exist.

    A folder named by ``NIPYPE_S3_DIGEST_CACHE`` that already exists is left as it is
    (it may be anyone's); nipype_s3's own folder, and any folder made here, is 0700.
    """
    folder = os.path.dirname(path)
    made = not os.path.isdir(folder)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if made or folder == _default_folder():
        os.chmod(folder, 0o700)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        try:
            st = os.stat(name)
        except FileNotFoundError:
            continue
        if st.st_uid != os.getuid():
            raise PermissionError(f"{name} belongs to another user")
        if st.st_mode & 0o077:
            os.chmod(name, 0o600)


def _connection():
    """This process's connection (reopened after a fork or a change of path)."""
    path = cache_path()
    if path is None:
        return None
    if _state["pid"] == os.getpid() and _state["path"] == path and (
            _state["conn"] is not None or time.monotonic() < _state.get("retry_at", 0.0)):
        return _state["conn"]
    _state.update(pid=os.getpid(), path=path, conn=None)
    try:
        _make_private(path)
        conn = sqlite3.connect(path, timeout=5, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # a cache: a lost write costs one re-hash
        old = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (_OLD_TABLE,)).fetchone()
        if old:  # rows that name paths: gone, and the pages that held them too
            conn.execute("PRAGMA secure_delete=ON")  # freed pages are overwritten
            conn.execute(f"DROP TABLE IF EXISTS {_OLD_TABLE}")
            try:
                conn.execute("VACUUM")
            except sqlite3.Error:  # another process is using it: the pages are zeroed
                pass
        conn.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE} (ident TEXT PRIMARY KEY, "
                     "digest TEXT NOT NULL, used REAL NOT NULL)")
        _make_private(path)  # the -wal and -shm files SQLite has made by now
        _state["conn"] = conn
    except (sqlite3.Error, OSError) as exc:
        # tried again a little later (a file locked for a moment is no reason to hash
        # everything again for the rest of the process)
        _state["retry_at"] = time.monotonic() + 5.0
        logger.debug("digest cache %s unavailable (%s): digests are computed meanwhile",
                     path, exc)
    return _state["conn"]


def _ident(st: os.stat_result, kind: str) -> str:
    return ":".join(map(str, file_identity(st))) + ":" + kind


def _lookup(ident: str) -> str | None:
    with _lock:
        conn = _connection()
        if conn is None:
            return None
        try:
            row = conn.execute(f"SELECT digest FROM {_TABLE} WHERE ident = ?",
                               (ident,)).fetchone()
            if row is not None:
                conn.execute(f"UPDATE {_TABLE} SET used = ? WHERE ident = ?",
                             (time.time(), ident))
                return row[0]
        except sqlite3.Error as exc:
            logger.debug("digest cache read failed: %s", exc)
    return None


def _store(ident: str, digest: str) -> None:
    with _lock:
        conn = _connection()
        if conn is None:
            return
        try:
            conn.execute(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?, ?, ?)",
                         (ident, digest, time.time()))
            _prune(conn)
        except sqlite3.Error as exc:
            logger.debug("digest cache write failed: %s", exc)


def digest_of(path, kind: str, compute) -> tuple[str, os.stat_result | None]:
    """``compute(path)`` (or the digest of ``kind`` kept for these exact bytes), with the
    status of the version of the file it belongs to.

    The status is ``None`` when the file changed while it was read: the digest then
    belongs to no one version of it (and is not kept).
    """
    path = os.fspath(path)
    try:
        before = os.stat(path)
    except OSError:
        return compute(path), None
    ident = _ident(before, kind)
    found = _lookup(ident)
    if found is not None:
        return found, before
    digest = compute(path)
    try:
        after = os.stat(path)
    except OSError:
        return digest, None
    if _ident(after, kind) != ident:
        return digest, None  # the file changed while it was read: do not keep this one
    _store(ident, digest)
    return digest, before


def remember(path, kind: str, digest: str, version: os.stat_result) -> bool:
    """Keep ``digest`` (of ``kind``) for the file at ``path`` if it is still the
    ``version`` it was (an upload's ETag, known from S3, for the bytes that were sent);
    ``False`` when the file has changed since, and nothing is kept."""
    try:
        now = os.stat(os.fspath(path))
    except OSError:
        return False
    if file_identity(now) != file_identity(version):
        return False
    _store(_ident(now, kind), digest)
    return True


def cached_digest(path, kind: str, compute) -> str:
    """``compute(path)``, or the digest of ``kind`` kept for these exact bytes."""
    return digest_of(path, kind, compute)[0]


_inserts = [0]


def _prune(conn) -> None:
    _inserts[0] += 1
    if _inserts[0] % 1000:
        return
    (count,) = conn.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()
    if count > _MAX_ROWS:
        conn.execute(f"DELETE FROM {_TABLE} WHERE ident IN (SELECT ident FROM {_TABLE} "
                     "ORDER BY used LIMIT ?)", (count - _MAX_ROWS // 2,))
