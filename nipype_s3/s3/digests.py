"""A cache of local files' digests, so an unchanged re-run does not read them again.

Skip-unchanged compares a file with an object's ETag, which means hashing the file: for
a few large files that is most of a re-run's time (800 MB read to send nothing). The
digest is kept here under the file's identity: path, device, inode, size, and the
modification *and* change times in nanoseconds. Rewriting the file changes them, and
so does setting its modification time back by hand (that updates the change time), so a
cached digest is only ever used for the very bytes it was computed from.

One SQLite file per user (``$XDG_CACHE_HOME/nipype_s3/digests.sqlite``), shared by
processes and threads; ``NIPYPE_S3_DIGEST_CACHE`` names another file, or ``off``. It is
only a cache: if it cannot be opened or written, digests are computed as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

__all__ = ["cached_digest", "cache_path"]

logger = logging.getLogger(__name__)

_MAX_ROWS = 200_000  # ~30 MB; the least recently used half goes when it is reached

_lock = threading.Lock()
_state: dict = {"pid": None, "conn": None, "path": None}


def cache_path() -> str | None:
    """The cache file in use, or ``None`` when switched off."""
    value = os.environ.get("NIPYPE_S3_DIGEST_CACHE", "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nipype_s3", "digests.sqlite")


def _connection():
    """This process's connection (reopened after a fork or a change of path)."""
    path = cache_path()
    if path is None:
        return None
    if _state["pid"] == os.getpid() and _state["path"] == path:
        return _state["conn"]
    _state.update(pid=os.getpid(), path=path, conn=None)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        conn = sqlite3.connect(path, timeout=5, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")  # a cache: a lost write costs one re-hash
        conn.execute("CREATE TABLE IF NOT EXISTS digests (ident TEXT PRIMARY KEY, "
                     "digest TEXT NOT NULL, used REAL NOT NULL)")
        _state["conn"] = conn
    except (sqlite3.Error, OSError) as exc:
        logger.debug("digest cache %s unavailable (%s): digests are computed each time",
                     path, exc)
    return _state["conn"]


def _ident(path: str, st: os.stat_result, kind: str) -> str:
    return (f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0"
            f"{st.st_mtime_ns}\0{st.st_ctime_ns}\0{kind}")


def cached_digest(path, kind: str, compute) -> str:
    """``compute(path)``, or the digest of ``kind`` kept for these exact bytes."""
    path = os.fspath(path)
    try:
        before = os.stat(path)
    except OSError:
        return compute(path)
    ident = _ident(path, before, kind)
    with _lock:
        conn = _connection()
        if conn is not None:
            try:
                row = conn.execute("SELECT digest FROM digests WHERE ident = ?",
                                   (ident,)).fetchone()
                if row is not None:
                    conn.execute("UPDATE digests SET used = ? WHERE ident = ?",
                                 (time.time(), ident))
                    return row[0]
            except sqlite3.Error as exc:
                logger.debug("digest cache read failed: %s", exc)
    digest = compute(path)
    try:
        after = os.stat(path)
    except OSError:
        return digest
    if _ident(path, after, kind) != ident:
        return digest  # the file changed while it was read: do not keep this one
    with _lock:
        conn = _connection()
        if conn is not None:
            try:
                conn.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?)",
                             (ident, digest, time.time()))
                _prune(conn)
            except sqlite3.Error as exc:
                logger.debug("digest cache write failed: %s", exc)
    return digest


_inserts = [0]


def _prune(conn) -> None:
    _inserts[0] += 1
    if _inserts[0] % 1000:
        return
    (count,) = conn.execute("SELECT COUNT(*) FROM digests").fetchone()
    if count > _MAX_ROWS:
        conn.execute("DELETE FROM digests WHERE ident IN (SELECT ident FROM digests "
                     "ORDER BY used LIMIT ?)", (count - _MAX_ROWS // 2,))
