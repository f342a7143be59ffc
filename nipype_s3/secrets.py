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

__all__ = ["REDACTED", "secret_values", "redact", "scrub_tree"]

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
