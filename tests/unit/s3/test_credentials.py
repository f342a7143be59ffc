"""creds_path formats, the resolver's order, and the errors a user can cause."""

import builtins

import pytest

from nipype_s3.exceptions import ConfigurationError, CredentialsError
from nipype_s3.s3.credentials import read_creds_file, resolve_session

# Obviously fake values, shaped like nothing real.
KEY_ID = "FAKEKEYID0000EXAMPLE"
SECRET = "fake/secret/key/for/tests/only/0000000000"
TOKEN = "fake-session-token-for-tests"

FORMATS = {
    "root": f"AWSAccessKeyId={KEY_ID}\nAWSSecretKey={SECRET}\n",
    "root_ID_spelling": f"AWSAccessKeyID={KEY_ID}\r\nAWSSecretKey={SECRET}\r\n",
    "iam_csv": f"User Name,Access Key Id,Secret Access Key\n\"someone\",{KEY_ID},{SECRET}\n",
    "console_csv": f"\ufeffAccess key ID,Secret access key\n{KEY_ID},{SECRET}\n",
    "ini": f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n",
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_is_read(tmp_path, fmt):
    path = tmp_path / f"creds-{fmt}"
    path.write_text(FORMATS[fmt], encoding="utf-8")
    creds = read_creds_file(str(path))
    assert (creds.access_key, creds.secret_key, creds.token) == (KEY_ID, SECRET, None)
    assert SECRET not in repr(creds) and KEY_ID not in repr(creds)


def test_ini_session_token_and_profile_section(tmp_path):
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naws_access_key_id = other\naws_secret_access_key = other\n"
                    f"[lab]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
                    f"aws_session_token = {TOKEN}\n")
    creds = read_creds_file(path, profile="lab")
    assert (creds.access_key, creds.secret_key, creds.token) == (KEY_ID, SECRET, TOKEN)


def test_iam_csv_picks_the_user_named_by_profile(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("User Name,Access Key Id,Secret Access Key\n"
                    "alice,AKEYFORALICE,alicesecret\nbob,AKEYFORBOB,bobsecret\n")
    assert read_creds_file(path, profile="bob").access_key == "AKEYFORBOB"
    assert read_creds_file(path).access_key == "AKEYFORALICE"


FORMATS_TEXT = ("It must be the root-account key file (lines 'AWSAccessKeyId=...' and "
                "'AWSSecretKey=...'), the IAM-user CSV (header 'User Name,Access Key Id,Secret "
                "Access Key'), the console CSV (header 'Access key ID,Secret access key'), or an "
                "INI credentials file ([default] with aws_access_key_id and "
                "aws_secret_access_key)")


@pytest.mark.parametrize("content, why", [
    (None, "the file does not exist"),
    ("", "the file is empty"),
    ("just some words\nnothing here\n", "no access key id and secret key were found in it"),
    ("AWSAccessKeyId=\nAWSSecretKey=abc\n", "it names an access key id or a secret key that "
     "is empty"),
    ("User Name,Access Key Id,Secret Access Key\n", "no access key id and secret key were "
     "found in it"),
    ("[default]\nregion = us-east-1\n", "no access key id and secret key were found in it"),
    (b"\xff\xfe\x00garbled\x81", "the file could not be read as text (UnicodeDecodeError)"),
])
def test_bad_files_name_the_path_and_formats(tmp_path, content, why):
    path = tmp_path / "creds.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError) as err:
        read_creds_file(str(path))
    assert str(err.value) == f"Cannot use creds_path {str(path)!r}: {why}. {FORMATS_TEXT}."
    assert isinstance(err.value, ConfigurationError) and isinstance(err.value, ValueError)


def test_directory_is_refused(tmp_path):
    with pytest.raises(CredentialsError, match="it is a directory, not a file"):
        read_creds_file(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.csv"
    path.write_text(FORMATS["console_csv"])
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(CredentialsError, match="the file is not readable by this user"):
        read_creds_file(path)


def test_missing_profile_section(tmp_path):
    path = tmp_path / "credentials"
    path.write_text(FORMATS["ini"])
    with pytest.raises(CredentialsError, match=r"it has no section \[nope\] with keys"):
        read_creds_file(path, profile="nope")


# -- resolver order ---------------------------------------------------------------------
def _keys(session):
    creds = session.get_credentials().get_frozen_credentials()
    return creds.access_key, creds.secret_key, creds.token


def test_explicit_session_wins(tmp_path):
    import boto3

    mine = boto3.Session(aws_access_key_id="x1", aws_secret_access_key="y1")
    assert resolve_session(session=mine, creds_path=str(tmp_path / "nothing")) is mine


def test_creds_path_beats_environment(tmp_path):
    path = tmp_path / "root.txt"
    path.write_text(FORMATS["root"])
    assert _keys(resolve_session(creds_path=str(path))) == (KEY_ID, SECRET, None)


def test_default_chain_uses_env_with_session_token(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    key_id, _, token = _keys(resolve_session())
    assert key_id == "testing-access-key" and token == TOKEN


def test_profile_from_shared_credentials_file(tmp_path, monkeypatch):
    shared = tmp_path / "shared-credentials"
    shared.write_text(f"[lab]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    assert _keys(resolve_session(profile="lab"))[:2] == (KEY_ID, SECRET)


def test_aws_profile_env_is_honoured(tmp_path, monkeypatch):
    shared = tmp_path / "shared-credentials"
    shared.write_text(f"[lab]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert _keys(resolve_session())[:2] == (KEY_ID, SECRET)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(CredentialsError) as err:
        resolve_session(profile="no-such-profile")
    assert str(err.value) == (
        "AWS profile 'no-such-profile' is not configured. Add it to ~/.aws/credentials or "
        "~/.aws/config (see 'aws configure --profile NAME'), or use creds_path.")


def test_unknown_aws_profile_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "ghost")
    with pytest.raises(CredentialsError, match="AWS_PROFILE='ghost' names a profile"):
        resolve_session()


def test_missing_creds_path_is_never_a_silent_fallback(tmp_path):
    with pytest.raises(CredentialsError, match="the file does not exist"):
        resolve_session(creds_path=str(tmp_path / "missing.csv"))
