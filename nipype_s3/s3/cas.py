"""A content-addressed store in S3: files kept once per SHA-256, under ``cas/sha256/``.

The controller stages a node's input files here (a file already there — from an
earlier node, run or agent — is not sent again; below 256 KiB it is simply put, which
costs what asking would); agents fetch them to their own root
and store a node's outputs the same way. A manifest entry says where a file belongs,
its digest, size and modification time, so the fetched copy is the same file to
nipype (its default hash is size and mtime).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import botocore.exceptions

from ..exceptions import TransferFailed
from ..localfs import is_within, make_link, walk_files
from .download import DownloadItem, download_files
from .errors import translate
from .session import endpoint_of
from .transfer import TransferSettings, TransferSummary
from .upload import UploadItem, upload_files
from .uri import join_key

__all__ = ["ManifestEntry", "ContentStore", "sha256_file"]

logger = logging.getLogger(__name__)

_BLOCK = 1024 * 1024


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fobj:
        for block in iter(lambda: fobj.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


#: Files smaller than this are stored without asking first whether the store has them:
#: a PUT of a small object costs what the HEAD would, and storing the same bytes under
#: the same content key again changes nothing.
BLIND_PUT_BELOW = 256 * 1024


@dataclass(frozen=True)
class ManifestEntry:
    """One file: where it belongs, what it holds, and its modification time.

    An entry with ``link`` is a symbolic link to that target, with no content (empty
    ``sha256``): :meth:`ContentStore.get` makes the link again.
    """

    path: str
    sha256: str
    size: int
    mtime: float
    link: str | None = None

    def to_json(self) -> dict:
        data = asdict(self)
        if self.link is None:
            del data["link"]
        return data

    @classmethod
    def from_json(cls, data: dict) -> ManifestEntry:
        link = data.get("link")
        return cls(str(data["path"]), str(data["sha256"]), int(data["size"]),
                   float(data["mtime"]), None if link is None else str(link))

    @classmethod
    def for_link(cls, path: str) -> ManifestEntry:
        """The entry of the symbolic link at ``path``, as it reads (target not moved)."""
        return cls(path, "", 0, os.lstat(path).st_mtime, os.readlink(path))


class ContentStore:
    """``s3://bucket/<prefix>/cas/sha256/<digest>`` for one client.

    Parameters
    ----------
    client
        A boto3 S3 client.
    bucket, prefix : str
        Where the store lives (``prefix`` may be empty).
    settings : TransferSettings, optional
        Concurrency and part sizes.
    """

    def __init__(self, client, bucket: str, prefix: str = "",
                 settings: TransferSettings | None = None) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings or TransferSettings()
        self._known: set[str] = set()
        self._digests: dict[tuple, str] = {}
        #: folders and files never stored, whatever asks (real paths): see ``withhold``
        self._withheld: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.bytes_down = 0

    def key(self, digest: str) -> str:
        return join_key(self.prefix, "cas", "sha256", digest)

    def withhold(self, *paths: str) -> None:
        """Never store ``paths`` (files, or folders and all below them), even inside a
        folder that is stored: :meth:`put` leaves them out with a warning."""
        self._withheld += tuple(os.path.realpath(os.path.expanduser(p)) for p in paths if p)

    def _withheld_path(self, path: str) -> bool:
        if not self._withheld:
            return False
        real = os.path.realpath(path)
        return any(is_within(w, real) for w in self._withheld)

    # -- hashing, remembered per (path, size, mtime) ----------------------------------
    def digest(self, path: str) -> str:
        st = os.stat(path)
        ident = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            found = self._digests.get(ident)
        if found is None:
            found = sha256_file(path)
            with self._lock:
                self._digests[ident] = found
        return found

    def remember(self, path: str, digest: str) -> None:
        """Record that ``path`` (as it is now) holds ``digest`` and that the store has it."""
        st = os.stat(path)
        with self._lock:
            self._digests[(os.path.abspath(path), st.st_size, st.st_mtime_ns)] = digest
            self._known.add(digest)

    def exists(self, digest: str) -> bool:
        """Whether the store holds ``digest`` (remembered once seen)."""
        with self._lock:
            if digest in self._known:
                return True
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise translate(exc, bucket=self.bucket, key=self.key(digest), action="check",
                            endpoint=endpoint_of(self.client)) from exc
        with self._lock:
            self._known.add(digest)
        return True

    # -- putting files in ---------------------------------------------------------------
    def put(self, paths: Iterable[str], *, expand_dirs: bool = True) -> list[ManifestEntry]:
        """Store files (folders: every file below them); return their manifest entries.

        In a folder, symbolic links to something inside it, and broken ones, become link
        entries (made again by whoever fetches them); other links are followed.
        """
        files = []
        links = []
        for path in paths:
            if expand_dirs and os.path.isdir(path):
                # links within the folder (or broken) are kept as links; others followed
                found, kept = walk_files(path, keep_inner_links=True)
                files.extend(found)
                links.extend(kept)
            else:
                files.append(path)
        files = list(dict.fromkeys(files))
        withheld = [p for p in files + links if self._withheld_path(p)]
        if withheld:
            logger.warning("not stored, so they do not leave this machine: %d file(s) of "
                           "AWS credentials and configuration, e.g. %s", len(withheld),
                           withheld[0])
            files = [p for p in files if p not in withheld]
            links = [p for p in links if p not in withheld]
        workers = min(8, max(1, self.settings.max_concurrency))
        stats = [os.stat(path) for path in files]

        def stored(pair) -> bool:
            digest, st = pair
            with self._lock:
                if digest in self._known:
                    return True
            if st.st_size < BLIND_PUT_BELOW:
                return False  # one PUT costs what the HEAD to avoid it would
            return self.exists(digest)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(self.digest, files))
            missing = [d for d, there in zip(
                digests, pool.map(stored, zip(digests, stats, strict=True)), strict=True)
                if not there]
        entries = [ManifestEntry.for_link(path) for path in dict.fromkeys(links)]
        uploads = {}
        for path, digest, st in zip(files, digests, stats, strict=True):
            entries.append(ManifestEntry(path, digest, st.st_size, st.st_mtime))
            if digest in missing and digest not in uploads:
                uploads[digest] = UploadItem(path, self.key(digest))
        if uploads:
            summary = upload_files(self.client, self.bucket, uploads.values(),
                                   settings=self.settings, skip_unchanged=False,
                                   target=f"to s3://{self.bucket}/{self.key('')}")
            with self._lock:
                self.bytes_up += summary.bytes
                self._known.update(uploads)
        return entries

    # -- getting files out --------------------------------------------------------------
    def get(self, entries: Iterable[ManifestEntry], dest_of: Callable[[str], str], *,
            verify: bool = True,
            move_link: Callable[[str], str] | None = None) -> TransferSummary:
        """Fetch entries to ``dest_of(entry.path)``, restoring their modification times.

        With ``verify``, each fetched file's SHA-256 must equal its entry's, else
        :class:`~nipype_s3.exceptions.TransferFailed` (and the file is removed). Link
        entries become symbolic links at ``dest_of(entry.path)``, an absolute target
        moved by ``move_link`` (from the machine that stored it to this one's paths).
        """
        entries = list(entries)
        for entry in entries:
            if entry.link is not None:
                target = entry.link
                if move_link is not None and os.path.isabs(target):
                    target = move_link(target)
                make_link(dest_of(entry.path), target)
        entries = [e for e in entries if e.link is None]
        items = []
        seen = set()
        for entry in entries:
            dest = dest_of(entry.path)
            if dest in seen:
                continue
            seen.add(dest)
            if os.path.islink(dest):  # the entry is a file: the link goes, not its target
                os.remove(dest)
            # with the entry's time: a file already there with its size and time (an
            # input an earlier job on this agent fetched) is not fetched again
            items.append((entry, DownloadItem(
                self.key(entry.sha256), dest, entry.size,
                last_modified=_dt.datetime.fromtimestamp(entry.mtime, _dt.timezone.utc))))
        summary = download_files(self.client, self.bucket, [i for _, i in items],
                                 settings=self.settings, skip_unchanged=True,
                                 target=f"from s3://{self.bucket}/{self.key('')}")
        with self._lock:
            self.bytes_down += summary.bytes
        bad = []
        for entry, item in items:
            if verify and item.dest in summary.done and sha256_file(item.dest) != entry.sha256:
                os.remove(item.dest)
                bad.append((entry.path, ValueError("content does not match its SHA-256")))
                continue
            os.utime(item.dest, (entry.mtime, entry.mtime))
            self.remember(item.dest, entry.sha256)
        if bad:
            raise TransferFailed(
                f"{len(bad)} fetched files do not match their SHA-256 (first: {bad[0][0]!r}); "
                "the store or the transfer is corrupt.", failures=bad, bucket=self.bucket)
        return summary
