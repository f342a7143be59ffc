"""``s3://bucket/key`` URIs: parsing, validation and key joins (pure, no network)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..exceptions import ConfigurationError

__all__ = ["S3URI", "parse_s3_uri", "is_s3_uri", "validate_bucket_name", "join_key"]

_SCHEME = "s3://"
_BUCKET_CHARS = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class S3URI:
    """A parsed ``s3://`` location: a bucket and a key (``""`` for the bucket root)."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"{_SCHEME}{self.bucket}/{self.key}" if self.key else f"{_SCHEME}{self.bucket}"

    def join(self, *parts: str) -> S3URI:
        """The URI of ``parts`` below this one (posix joins, on every OS)."""
        return S3URI(self.bucket, join_key(self.key, *parts))

    @property
    def prefix(self) -> str:
        """The key as a folder prefix: ``""`` or ending in exactly one ``/``."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def is_s3_uri(value: object) -> bool:
    """True when ``value`` is a string that starts with ``s3://`` (any case)."""
    return isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME


def validate_bucket_name(name: str) -> str:
    """Return ``name`` if it is a valid S3 bucket name, else raise ``ConfigurationError``.

    The rules are AWS's general-purpose bucket rules: 3 to 63 characters; lower-case
    letters, digits, dots and hyphens; starting and ending with a letter or digit; no
    two adjacent dots; not shaped like an IP address; no reserved prefix or suffix.
    """
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty"
    elif not 3 <= len(name) <= 63:
        problem = f"it has {len(name)} characters (3 to 63 are allowed)"
    elif name != name.lower():
        problem = "it has upper-case letters (bucket names are lower case)"
    elif not _BUCKET_CHARS.match(name):
        problem = ("it may contain only lower-case letters, digits, '.' and '-', "
                   "and must start and end with a letter or digit")
    elif ".." in name or ".-" in name or "-." in name:
        problem = "it has '..', '.-' or '-.'"
    elif name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        problem = "it uses a prefix or suffix that AWS reserves"
    else:
        try:
            ipaddress.IPv4Address(name)
            problem = "it is shaped like an IP address"
        except ValueError:
            pass
    if problem:
        raise ConfigurationError(
            f"Invalid S3 bucket name {name!r}: {problem}. "
            "Check the bucket part of the s3:// URI (s3://BUCKET/key/prefix).")
    return name


def parse_s3_uri(uri: str, *, require_key: bool = False) -> S3URI:
    """Parse ``s3://bucket[/key]`` (the scheme in any case) into an :class:`S3URI`.

    Parameters
    ----------
    uri : str
        The location, e.g. ``s3://mybucket/path/to/output/dir``.
    require_key : bool
        Raise if the URI names only a bucket (for a location that must be an object).

    Raises
    ------
    ConfigurationError
        The string is not an ``s3://`` URI, the bucket name is invalid, or the key is
        missing (with ``require_key``) or longer than S3 allows.
    """
    if not isinstance(uri, str):
        raise ConfigurationError(f"Expected an s3:// URI string, got {uri!r}.")
    if not is_s3_uri(uri):
        hint = ""
        low = uri.lower()
        if low.startswith(("s3:/", "s3:")):
            hint = " (it needs two slashes after 's3:')"
        elif low.startswith(("s3a://", "s3n://")):
            hint = " (use the plain 's3://' scheme)"
        elif low.startswith(("http://", "https://")):
            hint = (" (for an S3-compatible server, give the server as endpoint_url and "
                    "the location as s3://bucket/key)")
        raise ConfigurationError(
            f"Not an S3 URI: {uri!r}{hint}. Expected the form s3://bucket/key/prefix.")
    rest = uri[len(_SCHEME):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigurationError(
            f"S3 URI {uri!r} names no bucket. Expected the form s3://bucket/key/prefix.")
    validate_bucket_name(bucket)
    if require_key and not key.strip("/"):
        raise ConfigurationError(
            f"S3 URI {uri!r} names a bucket but no object key. "
            "Expected the form s3://bucket/path/to/object.")
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ConfigurationError(
            f"S3 key in {uri[:80]!r}... is {len(key.encode('utf-8'))} bytes long; "
            f"S3 allows at most {_MAX_KEY_BYTES}.")
    return S3URI(bucket, key)


def join_key(*parts: str) -> str:
    """Join key parts with ``/`` (never the OS separator), skipping empty parts.

    Separators at the joins are not doubled; a trailing ``/`` on the last part is kept,
    so that ``join_key("a/", "b/")`` is ``"a/b/"``.
    """
    pieces = [p.replace("\\", "/") if _looks_windows(p) else p for p in parts if p]
    if not pieces:
        return ""
    out = pieces[0]
    for piece in pieces[1:]:
        out = out.rstrip("/") + "/" + piece.lstrip("/") if out else piece.lstrip("/")
    return out


def _looks_windows(part: str) -> bool:
    import os

    return os.sep == "\\" and "\\" in part
