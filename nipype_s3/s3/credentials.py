"""One credentials resolver, used by every part of nipype_s3.

Order: an explicit boto3 session → ``creds_path`` → ``profile`` → boto3's default chain
(environment variables including ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, the shared
config and credentials files, SSO, the instance role). Anonymous access is a client
setting (:func:`nipype_s3.s3.session.make_s3_client` with ``anon=True``), used only
when asked for.

``creds_path`` accepts four formats:

1. the root-account key file::

       AWSAccessKeyId=AKIA...
       AWSSecretKey=...

2. the IAM-user CSV: ``User Name,Access Key Id,Secret Access Key`` then a row;
3. today's console CSV: ``Access key ID,Secret access key`` then a row;
4. an INI credentials file (``[default]`` with ``aws_access_key_id``,
   ``aws_secret_access_key`` and optionally ``aws_session_token``); the section is
   ``profile`` when given, else ``default``, else the only one.
"""

from __future__ import annotations

import configparser
import csv
import io
import os
from dataclasses import dataclass, field

import boto3
import botocore.exceptions

from ..exceptions import CredentialsError

__all__ = ["StaticCredentials", "read_creds_file", "resolve_session", "CREDS_FORMATS"]

CREDS_FORMATS = (
    "the root-account key file (lines 'AWSAccessKeyId=...' and 'AWSSecretKey=...'), "
    "the IAM-user CSV (header 'User Name,Access Key Id,Secret Access Key'), "
    "the console CSV (header 'Access key ID,Secret access key'), "
    "or an INI credentials file ([default] with aws_access_key_id and aws_secret_access_key)"
)


@dataclass(frozen=True)
class StaticCredentials:
    """Keys read from a file. The repr never shows them."""

    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = ""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return f"StaticCredentials(source={self.source!r})"


def _fail(path: str, why: str) -> CredentialsError:
    return CredentialsError(
        f"Cannot use creds_path {path!r}: {why}. It must be {CREDS_FORMATS}.")


def read_creds_file(path: str | os.PathLike, profile: str | None = None) -> StaticCredentials:
    """Read AWS keys from ``path`` in any of the accepted formats.

    Raises
    ------
    CredentialsError
        The file does not exist, cannot be read, or holds no keys in a known format.
        The message names the file and the formats; it never contains a key.
    """
    path = os.fspath(path)
    shown = path
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise _fail(shown, "the file does not exist")
    if os.path.isdir(path):
        raise _fail(shown, "it is a directory, not a file")
    try:
        with open(path, encoding="utf-8-sig") as fobj:
            text = fobj.read()
    except PermissionError as exc:
        raise _fail(shown, "the file is not readable by this user (check its permissions)") \
            from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(shown, f"the file could not be read as text ({type(exc).__name__})") \
            from exc
    if not text.strip():
        raise _fail(shown, "the file is empty")

    for parser in (_parse_root_keys, _parse_csv, _parse_ini):
        found = parser(text, profile)
        if found is not None:
            access, secret, token = found
            if not access or not secret:
                raise _fail(shown, "it names an access key id or a secret key that is empty")
            return StaticCredentials(access.strip(), secret.strip(),
                                     token.strip() if token else None, source=shown)
    if profile and "[" in text:
        raise _fail(shown, f"it has no section [{profile}] with keys (the profile asked for)")
    raise _fail(shown, "no access key id and secret key were found in it")


def _parse_root_keys(text: str, profile):
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip().lower()] = value.strip()
    if "awsaccesskeyid" in values or "awssecretkey" in values:
        return values.get("awsaccesskeyid", ""), values.get("awssecretkey", ""), None
    return None


_CSV_ACCESS = ("access key id",)
_CSV_SECRET = ("secret access key",)


def _parse_csv(text: str, profile):
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(c.strip() for c in row)]
    except csv.Error:
        return None
    if len(rows) < 2:
        return None
    header = [c.strip().lower() for c in rows[0]]
    try:
        ia = next(i for i, c in enumerate(header) if c in _CSV_ACCESS)
        isec = next(i for i, c in enumerate(header) if c in _CSV_SECRET)
    except StopIteration:
        return None
    row = rows[1]
    if profile and "user name" in header:
        iu = header.index("user name")
        row = next((r for r in rows[1:] if len(r) > iu and r[iu].strip() == profile), row)
    if len(row) <= max(ia, isec):
        return "", "", None
    return row[ia], row[isec], None


def _parse_ini(text: str, profile):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    sections = parser.sections()
    if not sections:
        return None
    if profile:
        name = profile if profile in sections else f"profile {profile}"
    elif "default" in sections:
        name = "default"
    elif len(sections) == 1:
        name = sections[0]
    else:
        return None
    if not parser.has_section(name):
        return None
    sec = parser[name]
    if "aws_access_key_id" not in sec and "aws_secret_access_key" not in sec:
        return None
    return (sec.get("aws_access_key_id", ""), sec.get("aws_secret_access_key", ""),
            sec.get("aws_session_token"))


def resolve_session(*, session: boto3.Session | None = None, creds_path: str | None = None,
                    profile: str | None = None, region: str | None = None) -> boto3.Session:
    """Return the boto3 session to use, in the documented order.

    Parameters
    ----------
    session : boto3.Session, optional
        Used as it is when given.
    creds_path : str, optional
        A key file in one of the accepted formats (see the module docstring). When a
        ``profile`` is also given, it selects the INI section or the CSV user.
    profile : str, optional
        A named profile from the shared AWS config/credentials files.
    region : str, optional
        Region for clients made from the session.

    Raises
    ------
    CredentialsError
        ``creds_path`` is unusable, or ``profile`` is not configured.
    """
    if session is not None:
        return session
    if creds_path:
        creds = read_creds_file(creds_path, profile=profile)
        return boto3.Session(aws_access_key_id=creds.access_key,
                             aws_secret_access_key=creds.secret_key,
                             aws_session_token=creds.token, region_name=region)
    if profile:
        try:
            return boto3.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise CredentialsError(
                f"AWS profile {profile!r} is not configured. Add it to ~/.aws/credentials "
                "or ~/.aws/config (see 'aws configure --profile NAME'), or use creds_path."
            ) from exc
    try:
        return boto3.Session(region_name=region)
    except botocore.exceptions.ProfileNotFound as exc:
        name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
        raise CredentialsError(
            f"AWS_PROFILE={name!r} names a profile that is not configured. Unset it, or "
            "add the profile to ~/.aws/credentials or ~/.aws/config.") from exc
