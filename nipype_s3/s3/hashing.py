"""Local checksums that S3 ETags and checksums can be compared with, streamed (no whole
file in memory).

A single-part object's ETag is the MD5 of its bytes. A multipart object's ETag is
``md5(md5(part1) + md5(part2) + ...)-N``: it depends on the part size, so it is
computed here with the part size the object was most likely uploaded with. A multipart
object's SHA-256 checksum is made the same way (``base64(sha256(sha256(part1) + ...))-N``,
S3's "composite" checksum). Digests are kept in :mod:`.digests`, so an unchanged file
is read once, not on every re-run.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os

from ..config import MiB
from .digests import cached_digest, remember

__all__ = ["file_md5", "multipart_etag", "etag_matches", "candidate_part_sizes",
           "composite_sha256", "b64_sha256", "remember_etag"]

_READ = 1 * MiB


def file_md5(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fobj:
        for block in iter(lambda: fobj.read(_READ), b""):
            digest.update(block)
    return digest.hexdigest()


def _part_digests(path, part_size: int, new) -> list[bytes]:
    """The raw digests (``new()`` hash objects) of ``path``'s parts of ``part_size``."""
    part_digests = []
    with open(path, "rb") as fobj:
        while True:
            part = new()
            left = part_size
            while left:
                block = fobj.read(min(_READ, left))
                if not block:
                    break
                part.update(block)
                left -= len(block)
            if left == part_size:  # nothing read: end of file
                break
            part_digests.append(part.digest())
            if left:
                break
    return part_digests


def multipart_etag(path: str | os.PathLike, part_size: int) -> str:
    """The ETag S3 gives ``path`` uploaded in parts of ``part_size`` bytes."""
    part_digests = _part_digests(path, part_size,
                                 lambda: hashlib.md5(usedforsecurity=False))
    combined = hashlib.md5(b"".join(part_digests), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(part_digests)}"


def b64_sha256(hex_digest: str) -> str:
    """A hex SHA-256 as S3 writes checksums: the base64 of the raw 32 bytes."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def composite_sha256(path: str | os.PathLike, part_size: int) -> str:
    """The SHA-256 checksum S3 gives ``path`` uploaded in parts of ``part_size`` bytes
    with ``ChecksumAlgorithm='SHA256'``: ``base64(sha256(sha256(part1) + ...))-N``."""
    part_digests = _part_digests(path, part_size, hashlib.sha256)
    combined = base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode()
    return f"{combined}-{len(part_digests)}"


def candidate_part_sizes(size: int, parts: int, preferred: int) -> list[int]:
    """Part sizes that give ``parts`` parts for ``size`` bytes, most likely first.

    ``preferred`` (ours) comes first when it fits; then whole MiB sizes in the range
    that fits (tools use whole MiB: 5, 8, 16, 64 ...), powers of two first. At most 4.
    """
    if parts < 1 or size < 1:
        return []
    fits = [preferred] if math.ceil(size / preferred) == parts else []
    low = math.ceil(size / parts)  # smallest part size that needs no more parts
    high = size // (parts - 1) if parts > 1 else size  # beyond it, fewer parts
    if parts > 1 and size % (parts - 1) == 0:
        high -= 1
    mib_lo, mib_hi = math.ceil(low / MiB), high // MiB
    whole = [m * MiB for m in range(mib_lo, mib_hi + 1)] if mib_hi - mib_lo < 4096 else []
    whole.sort(key=lambda s: (s & (s - 1) != 0, s))
    for candidate in whole:
        if candidate not in fits:
            fits.append(candidate)
    return fits[:4]


def remember_etag(path: str | os.PathLike, etag: str, version: os.stat_result, *,
                  part_size: int) -> bool:
    """Keep an object's ETag as the digest :func:`etag_matches` would compute for the file
    it was uploaded from, while the file is still that ``version``: the next unchanged
    run then reads none of it (a multipart ETag costs a read of the whole file)."""
    etag = etag.strip('"')
    if "-" not in etag:
        return len(etag) == 32 and remember(path, "md5", etag, version)
    try:
        parts = int(etag.rpartition("-")[2])
    except ValueError:
        return False
    sizes = candidate_part_sizes(version.st_size, parts, part_size)
    return bool(sizes) and remember(path, f"etag:{sizes[0]}", etag, version)


def etag_matches(path: str | os.PathLike, etag: str, *, part_size: int) -> bool:
    """Whether the local file has the content an S3 object with ``etag`` has.

    ``etag`` is the object's ETag without quotes. A plain ETag is compared with the
    file's MD5; a multipart ETag with the multipart ETag computed for the likely
    part sizes. Returns False (not sure) when no part size reproduces it.
    """
    etag = etag.strip('"')
    if "-" not in etag:
        return len(etag) == 32 and cached_digest(path, "md5", file_md5) == etag
    _, _, count = etag.rpartition("-")
    try:
        parts = int(count)
    except ValueError:
        return False
    size = os.path.getsize(path)
    return any(cached_digest(path, f"etag:{ps}", lambda p, ps=ps: multipart_etag(p, ps)) == etag
               for ps in candidate_part_sizes(size, parts, part_size))
