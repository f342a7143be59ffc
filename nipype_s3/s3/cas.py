"""A content-addressed store in S3: files kept once per SHA-256, under ``cas/sha256/``.

The controller stages a node's input files here (a file already there — from an
earlier node, run or agent — is not sent again; below 256 KiB it is simply put, which
costs what asking would); agents fetch them to their own root
and store a node's outputs the same way. A manifest entry says where a file belongs,
its digest, size and modification time, so the fetched copy is the same file to
nipype (its default hash is size and mtime).

A key is a promise about the bytes under it, and every run relies on it, so the store
never takes one on trust:

* an object goes up with its SHA-256 as its checksum (:func:`.upload.checksum_args`):
  S3 refuses a single PUT of other bytes. A file that changed between its hashing and
  the end of its upload (its size, times or inode differ: a log still being written)
  is hashed and sent again, and what went up under the old key is deleted; one that
  keeps changing is an error that names it;
* an object already there counts only once S3 vouches for it: the SHA-256 checksum S3
  keeps with it (asked with the HEAD that is made anyway) must be the key's (for a
  multipart object, the checksum of its parts' checksums, computed here from the local
  file). One with no checksum, or another one, is stored again;
* fetched bytes whose SHA-256 is not their key's are removed, and so is the object, so
  that the next :meth:`ContentStore.put` of the real file stores it again.

Digests are remembered per version of a file (:func:`.digests.file_identity`: device,
inode, size, modification and change times), in memory and in the digest cache.
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
from .digests import digest_of, file_identity
from .download import DownloadItem, download_files
from .errors import error_code, translate
from .hashing import b64_sha256, candidate_part_sizes, composite_sha256
from .session import endpoint_of
from .transfer import TransferSettings, TransferSummary
from .upload import UploadItem, checksum_args, upload_files
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

#: Rounds of hashing and sending a file that changes meanwhile gets before it is an error.
TRIES = 3

#: Error codes of a body S3 refused because it did not match its checksum (or the
#: digest signed with it): the file changed after it was hashed.
_MISMATCH = {"BadDigest", "XAmzContentSHA256Mismatch"}


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


def _stored_sha256(head: dict) -> tuple[str, int] | None:
    """The SHA-256 checksum S3 keeps with an object (``HeadObject`` with checksums
    asked for): ``(base64, 0)`` for the whole object's, ``(base64, parts)`` for a
    multipart object's checksum of its parts' checksums; ``None`` when it has none."""
    value = head.get("ChecksumSHA256")
    if not value:
        return None
    value, _, count = value.partition("-")
    if not count and head.get("ChecksumType") != "FULL_OBJECT":
        # AWS writes the part count after the checksum; moto leaves it out, and the
        # ETag of a multipart object ends in it too
        etag = str(head.get("ETag", "")).strip('"')
        count = etag.rpartition("-")[2] if "-" in etag else ""
    if not count:
        return value, 0
    return (value, int(count)) if count.isdigit() and int(count) > 0 else None


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
        #: digests whose object this store sent, or found to hold their bytes
        self._verified: set[str] = set()
        #: digests being sent by one caller now (jobs sent at once share files): the
        #: others wait for it instead of sending the same bytes again
        self._sending: dict[str, threading.Event] = {}
        #: SHA-256 of local files by version (:func:`.digests.file_identity`)
        self._digests: dict[tuple, str] = {}
        #: folders and files never stored, whatever asks (real paths): see ``withhold``
        self._withheld: tuple[str, ...] = ()
        self._withheld_names: tuple[str, ...] = ()
        #: called with the paths a put left out (the plugin says so where users look)
        self.on_withheld = None
        self._lock = threading.Lock()
        self.bytes_up = 0
        self.bytes_down = 0

    def key(self, digest: str) -> str:
        return join_key(self.prefix, "cas", "sha256", digest)

    def withhold_names(self, *relative: str) -> None:
        """Never store, inside a folder that is stored, what lies at one of these paths
        relative to any folder in it (``.ssh``, ``.docker/config.json``): a home folder
        that is not this machine's, or a copy of one inside a dataset, keeps its secrets
        too. Folders and files, as :meth:`withhold`."""
        self._withheld_names += tuple(r.strip("/") for r in relative if r.strip("/"))

    def withhold(self, *paths: str) -> None:
        """Never store ``paths`` (files, or folders and all below them), even inside a
        folder that is stored: :meth:`put` leaves them out with a warning."""
        self._withheld += tuple(os.path.realpath(os.path.expanduser(p)) for p in paths if p)

    def _withheld_name(self, folder: str, path: str) -> bool:
        """Whether ``path``, found in the stored ``folder``, is at a withheld name."""
        if not self._withheld_names:
            return False
        rel = "/" + os.path.relpath(path, folder).replace(os.sep, "/")
        return any(rel.endswith("/" + name) or f"/{name}/" in rel
                   for name in self._withheld_names)

    def _withheld_path(self, path: str) -> bool:
        if not self._withheld:
            return False
        real = os.path.realpath(path)
        return any(is_within(w, real) for w in self._withheld)

    # -- hashing, remembered per version of a file -------------------------------------
    def digest(self, path: str) -> str:
        """The SHA-256 (hex) of the file at ``path`` as it is now."""
        return self._hash(path)[0]

    def _hash(self, path: str) -> tuple[str, os.stat_result]:
        """``(sha256, status)``: the digest and the version of the file it is of."""
        for _ in range(TRIES):
            st = os.stat(path)
            with self._lock:
                found = self._digests.get(file_identity(st))
            if found is not None:
                return found, st
            found, read = digest_of(path, "sha256", sha256_file)
            if read is not None:  # None: it changed while it was read
                with self._lock:
                    self._digests[file_identity(read)] = found
                return found, read
        raise self._kept_changing(path)

    def _kept_changing(self, path: str) -> TransferFailed:
        return TransferFailed(
            f"{path!r} changed while it was being stored, {TRIES} times (its size, times "
            "or inode differ between hashing it and sending it), so it cannot be stored "
            "under its SHA-256. It is probably still being written (a log file?): let "
            "whatever writes it finish, or leave it out of what the node is given.",
            failures=[(path, ValueError("changed while it was being stored"))],
            bucket=self.bucket)

    # -- what the store holds -----------------------------------------------------------
    def _head(self, digest: str) -> dict | None:
        """``HeadObject`` of ``digest``'s key with its checksum; ``None`` if absent."""
        key = self.key(digest)
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key,
                                           ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise translate(exc, bucket=self.bucket, key=key, action="check",
                            endpoint=endpoint_of(self.client)) from exc

    def verify_object(self, digest: str) -> bool:
        """Whether the object at ``digest``'s key is known to hold those very bytes.

        True when this store sent it or checked it before, or when S3 keeps the whole
        object's SHA-256 checksum with it and that is ``digest`` (one ``HeadObject``).
        False when there is no object, or one with no checksum, another checksum, or a
        multipart one (whose checksum of parts' checksums cannot be compared without
        the bytes): store the bytes again then (:meth:`put_bytes`, :meth:`put`).
        """
        return self._holds(digest)

    def exists(self, digest: str) -> bool:
        """The same as :meth:`verify_object`: an object that is there but cannot be
        shown to hold ``digest``'s bytes counts as absent, so that it is stored again."""
        return self._holds(digest)

    def _holds(self, digest: str, path: str | None = None,
               st: os.stat_result | None = None) -> bool:
        """:meth:`verify_object`; given the local file ``path`` at version ``st`` (which
        hashes to ``digest``), a multipart object's checksum is compared with the one
        computed from that file."""
        with self._lock:
            if digest in self._verified:
                return True
        head = self._head(digest)
        stored = None if head is None else _stored_sha256(head)
        if stored is None:
            return False
        value, parts = stored
        if parts == 0:
            found = value == b64_sha256(digest)
        elif path is None or st is None or head.get("ContentLength") != st.st_size:
            found = False
        else:
            found = self._same_parts(path, st, f"{value}-{parts}", parts)
        if found:
            with self._lock:
                self._verified.add(digest)
        return found

    def _same_parts(self, path: str, st: os.stat_result, checksum: str, parts: int) -> bool:
        """Whether ``path`` (at version ``st``) has the multipart ``checksum``, for the
        part sizes it was likely sent in (remembered in the digest cache)."""
        for size in candidate_part_sizes(st.st_size, parts, self.settings.multipart_chunksize):
            local, read = digest_of(path, f"sha256-parts:{size}",
                                    lambda p, size=size: composite_sha256(p, size))
            if read is None or file_identity(read) != file_identity(st):
                return False  # not the version hashed: sent again, and checked then
            if local == checksum:
                return True
        return False

    def _discard(self, digest: str) -> bool:
        """Delete the object at ``digest``'s key (its bytes are not, or may not be, the
        key's); True once it is gone."""
        with self._lock:
            self._verified.discard(digest)
        key = self.key(digest)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            logger.warning("could not delete s3://%s/%s, which does not, or may not, hold "
                           "the bytes of its SHA-256: %s", self.bucket, key,
                           translate(exc, bucket=self.bucket, key=key, action="delete",
                                     endpoint=endpoint_of(self.client)))
            return False
        logger.warning("deleted s3://%s/%s: it did not, or may not, hold the bytes of its "
                       "SHA-256", self.bucket, key)
        return True

    # -- putting files in ---------------------------------------------------------------
    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (up to 5 GB, in one request); return its key.

        Not sent again when :meth:`verify_object` vouches for the object already there;
        sent with its SHA-256 checksum otherwise (a planted object, or one stored
        without a checksum, is replaced).
        """
        digest = hashlib.sha256(data).hexdigest()
        key = self.key(digest)
        if not self.verify_object(digest):
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                       **checksum_args(digest, multipart=False))
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise translate(exc, bucket=self.bucket, key=key, action="upload",
                                endpoint=endpoint_of(self.client)) from exc
            with self._lock:
                self.bytes_up += len(data)
                self._verified.add(digest)
        return key

    def put(self, paths: Iterable[str], *, expand_dirs: bool = True) -> list[ManifestEntry]:
        """Store files (folders: every file below them); return their manifest entries.

        In a folder, symbolic links to something inside it, and broken ones, become link
        entries (made again by whoever fetches them); other links are followed. A file
        that keeps changing while it is stored raises
        :class:`~nipype_s3.exceptions.TransferFailed` naming it.
        """
        files = []
        links = []
        withheld = []
        for path in paths:
            if expand_dirs and os.path.isdir(path):
                # links within the folder (or broken) are kept as links; others followed
                found, kept = walk_files(path, keep_inner_links=True)
                withheld += [p for p in found + kept if self._withheld_name(path, p)]
                files.extend(found)
                links.extend(kept)
            else:
                files.append(path)
        files = list(dict.fromkeys(files))
        withheld = list(dict.fromkeys(withheld + [p for p in files + links
                                                  if self._withheld_path(p)]))
        if withheld and self.on_withheld is not None:
            self.on_withheld(withheld)
        if withheld:
            logger.warning("not stored, so they do not leave this machine: %d file(s) of "
                           "credentials (SSH, cloud, registry, password files), e.g. %s; "
                           "see 'Security' in docs/ec2plugin.rst", len(withheld),
                           ", ".join(withheld[:3]))
            files = [p for p in files if p not in withheld]
            links = [p for p in links if p not in withheld]
        workers = min(8, max(1, self.settings.max_concurrency))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            hashed = dict(zip(files, pool.map(self._hash, files), strict=True))
            for round_ in range(TRIES):
                changed = self._send(hashed, pool)
                if not changed:
                    break
                if round_ == TRIES - 1:
                    raise self._kept_changing(changed[0])
                logger.debug("changed while being stored, hashed and sent again: %s",
                             changed)
                hashed.update(zip(changed, pool.map(self._hash, changed), strict=True))
        entries = [ManifestEntry.for_link(path) for path in dict.fromkeys(links)]
        entries += [ManifestEntry(path, digest, st.st_size, st.st_mtime)
                    for path, (digest, st) in hashed.items()]
        return entries

    def _send(self, hashed: dict[str, tuple[str, os.stat_result]], pool) -> list[str]:
        """Send what the store does not hold of ``hashed``; return the files that
        changed meanwhile (what went up for them is deleted)."""
        first: dict[str, tuple[str, os.stat_result]] = {}
        for path, (digest, st) in hashed.items():
            first.setdefault(digest, (path, st))
        todo, others = [], []
        with self._lock:
            for digest, (path, st) in first.items():
                if digest in self._verified:
                    continue
                if digest in self._sending:
                    others.append((digest, path, self._sending[digest]))
                else:
                    self._sending[digest] = threading.Event()
                    todo.append((digest, path, st))
        try:
            changed = self._send_mine(todo, pool)
        finally:
            with self._lock:
                for digest, _, _ in todo:
                    self._sending.pop(digest).set()
        for digest, path, sent in others:  # sent by another caller meanwhile
            sent.wait()
            with self._lock:
                if digest not in self._verified:
                    changed.append(path)  # it did not get there: hashed and sent again
        return changed

    def _send_mine(self, todo: list, pool) -> list[str]:
        def stored(item) -> bool:
            digest, path, st = item
            if st.st_size < BLIND_PUT_BELOW:
                return False  # one PUT costs what the HEAD to avoid it would
            return self._holds(digest, path, st)

        todo = [item for item, there in zip(todo, pool.map(stored, todo), strict=True)
                if not there]
        if not todo:
            return []
        refused: dict[str, BaseException] = {}
        try:
            upload_files(self.client, self.bucket,
                         [UploadItem(path, self.key(digest), digest)
                          for digest, path, _ in todo],
                         settings=self.settings, skip_unchanged=False,
                         target=f"to s3://{self.bucket}/{self.key('')}")
        except TransferFailed as exc:
            refused = dict(exc.failures)
            if any(_code(err) not in _MISMATCH for err in refused.values()):
                raise
        changed = []
        for digest, path, st in todo:
            if path in refused:  # S3 refused bytes that were not the digest's
                changed.append(path)
                continue
            try:
                now = file_identity(os.stat(path))
            except OSError:
                now = None
            if now != file_identity(st):
                changed.append(path)
                self._discard(digest)  # may hold other bytes (multipart; moto)
                continue
            with self._lock:
                self.bytes_up += st.st_size
                self._verified.add(digest)
        return changed

    # -- getting files out --------------------------------------------------------------
    def get(self, entries: Iterable[ManifestEntry], dest_of: Callable[[str], str], *,
            verify: bool = True,
            move_link: Callable[[str], str] | None = None) -> TransferSummary:
        """Fetch entries to ``dest_of(entry.path)``, restoring their modification times.

        With ``verify``, each fetched file's SHA-256 must equal its entry's, else
        :class:`~nipype_s3.exceptions.TransferFailed`; the file is removed, and so is the
        object (it does not hold its key's bytes: the next :meth:`put` of the real file
        stores it again). Link entries become symbolic links at
        ``dest_of(entry.path)``, an absolute target moved by ``move_link`` (from the
        machine that stored it to this one's paths).
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
            os.utime(item.dest, (entry.mtime, entry.mtime))
            if not verify or item.dest not in summary.done:
                continue
            digest, read = digest_of(item.dest, "sha256", sha256_file)
            if digest != entry.sha256:
                os.remove(item.dest)
                bad.append((entry, ValueError("content does not match its SHA-256")))
                continue
            with self._lock:
                if read is not None:
                    self._digests[file_identity(read)] = digest
                self._verified.add(digest)
        if bad:
            kept = [e for e in {e.sha256: e for e, _ in bad}.values()
                    if not self._discard(e.sha256)]
            first = bad[0][0]
            then = (f"{len(kept)} of those objects could not be deleted (see the warning "
                    "logged): the next run stores the files again unless S3 vouches for "
                    "what is there (its SHA-256 checksum is the key); if this error comes "
                    f"back, delete s3://{self.bucket}/{self.key(kept[0].sha256)} by hand."
                    if kept else "Those objects were deleted from the store: run again, "
                    "and the files are stored anew.")
            raise TransferFailed(
                f"{len(bad)} fetched files do not match their SHA-256 (first: "
                f"{first.path!r}, s3://{self.bucket}/{self.key(first.sha256)}); the store "
                f"or the transfer is corrupt. {then}",
                failures=[(e.path, err) for e, err in bad], bucket=self.bucket)
        return summary


def _code(exc: BaseException) -> str:
    """The AWS error code of a failure an upload reported (translated or not)."""
    return getattr(exc, "code", None) or error_code(exc.__cause__ or exc)
