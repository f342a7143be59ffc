"""Keep credentials out of what a run leaves behind (pure: no boto3, no network).

nipype records the whole process environment in every node's result and report. On a
machine whose environment holds keys (a laptop with ``AWS_SECRET_ACCESS_KEY`` exported,
LocalCloud's stand-in agents), those values would travel with the node directory. The
agent scrubs a node's directory before storing it, and the controller scrubs the nodes
it runs itself: every occurrence of a secret value, in pickles and in text files, becomes
``<redacted by nipype_s3>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from .config import SECRET_ENV_VARS
from .pickles import rewrite_pickle_file, rewrite_text_file

__all__ = ["REDACTED", "secret_values", "redact", "scrub_tree", "SECRET_PATHS",
           "withheld_paths", "withheld_names"]

#: Well-known files and folders of credentials below a home folder: never staged, even
#: inside a folder given to a node (a home directory, say). Documented in
#: docs/ec2plugin.rst ("Threat model"); each has a test.
SECRET_PATHS = (
    "~/.aws",                    # AWS keys and profiles
    "~/.ssh",                    # SSH keys, known hosts
    "~/.gnupg",                  # GPG keys
    "~/.netrc",                  # passwords for FTP/HTTP hosts (curl, pip, git)
    "~/.git-credentials",        # git's stored passwords and tokens
    "~/.docker/config.json",     # registry logins
    "~/.kube/config",            # Kubernetes clusters
    "~/.config/gcloud",          # Google Cloud
    "~/.azure",                  # Azure
    "~/.boto",                   # boto 2 / gsutil keys
    "~/.s3cfg",                  # s3cmd keys
    "~/.pgpass",                 # PostgreSQL passwords
    "~/.my.cnf",                 # MySQL passwords
    "~/.pypirc",                 # PyPI upload tokens
    "~/.npmrc",                  # npm tokens
    "~/.config/gh",              # GitHub CLI token
    "~/.terraform.d/credentials.tfrc.json",
    "~/.vault-token",            # HashiCorp Vault
    "~/.password-store",         # pass
    "~/.local/share/keyrings",   # desktop keyrings
)


def withheld_names() -> list[str]:
    """:data:`SECRET_PATHS` relative to a home folder (``.ssh``, ``.netrc``): withheld
    wherever they lie in a folder that is staged, whoever's home it is."""
    return [p[2:] for p in SECRET_PATHS]


def withheld_paths(environ: Mapping[str, str] | None = None) -> list[str]:
    """:data:`SECRET_PATHS` and the AWS files the environment names, for
    :meth:`~nipype_s3.s3.cas.ContentStore.withhold`."""
    environ = os.environ if environ is None else environ
    named = [environ.get(k, "") for k in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                                          "NETRC", "DOCKER_CONFIG", "KUBECONFIG",
                                          "GOOGLE_APPLICATION_CREDENTIALS")]
    return list(SECRET_PATHS) + [p for v in named for p in v.split(os.pathsep) if p]

REDACTED = "<redacted by nipype_s3>"
_TEXT_SUFFIXES = (".rst", ".json", ".txt", ".log", ".html")


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The non-trivial values of the credential variables in ``environ``."""
    environ = os.environ if environ is None else environ
    return sorted({v for k in SECRET_ENV_VARS if len(v := environ.get(k, "")) >= 8},
                  key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_tree(root: str, secrets: Iterable[str]) -> int:
    """Redact ``secrets`` in every pickle and text file below ``root``; return files seen."""
    secrets = [s for s in secrets if s]
    if not secrets or not os.path.isdir(root):
        return 0
    seen = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue  # a link's target is scrubbed where it lies; a pipe holds nothing
            if name.endswith((".pklz", ".pkl")):
                rewrite_pickle_file(path, lambda s: redact(s, secrets))
            elif name.endswith(_TEXT_SUFFIXES):
                rewrite_text_file(path, lambda s: redact(s, secrets))
            else:
                continue
            seen += 1
    return seen
