"""Rewrite path strings inside pickles and text files while they are read (pure).

An agent runs a node under another root than the controller's
(``NIPYPE_S3_WORKER_ROOT``). The node's pickle names the controller's paths; the agent
reads it through :func:`rewrite_pickle` with a map that moves those paths below its own
root, and the controller reads the agent's result pickles back through the inverse map.
Nothing is rewritten when a pickle is written.

The rewrite walks the pickle's opcodes and re-emits every text string that the map
changes; everything else is copied byte for byte (``FRAME`` opcodes, an optional
optimisation, are dropped because frame lengths change). No object is built, so no
code in the pickle runs while it is rewritten.
"""

from __future__ import annotations

import gzip
import io
import os
import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PathMap", "rewrite_pickle", "rewrite_pickle_file", "rewrite_text_file",
           "FAST_GZIP_LEVEL"]

_TEXT_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}

#: gzip level of the pickles written here (rewritten results, node pickles)
FAST_GZIP_LEVEL = 1


@dataclass(frozen=True)
class PathMap:
    """Moves absolute paths between a controller and a worker root.

    ``to_worker`` maps ``/data/x.nii`` to ``<root>/data/x.nii`` when the path is one of
    ``prefixes`` or lies below one; ``to_controller`` strips ``<root>`` again.
    """

    root: str
    prefixes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "root", self.root.rstrip("/"))
        object.__setattr__(self, "prefixes", tuple(sorted(
            {p.rstrip("/") or "/" for p in self.prefixes}, key=len, reverse=True)))

    def to_worker(self, value: str) -> str:
        if not value.startswith("/") or not self.root:
            return value
        if value == self.root or value.startswith(self.root + "/"):
            return value  # already below the worker root
        for prefix in self.prefixes:
            if value == prefix or value.startswith(prefix + "/") or prefix == "/":
                return self.root + value
        return value

    def to_controller(self, value: str) -> str:
        if self.root and (value == self.root or value.startswith(self.root + "/")):
            return value[len(self.root):] or "/"
        return value

    def text_to_controller(self, text: str) -> str:
        return text.replace(self.root + "/", "/") if self.root else text


def _emit_text(out: io.BytesIO, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) < 256:
        out.write(b"\x8c" + bytes([len(data)]) + data)  # SHORT_BINUNICODE
    elif len(data) < 2 ** 32:
        out.write(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE
    else:  # pragma: no cover - 4 GiB strings
        out.write(b"\x8d" + struct.pack("<Q", len(data)) + data)  # BINUNICODE8


def rewrite_pickle(data: bytes, mapping: Callable[[str], str]) -> bytes:
    """Return ``data`` with every text string ``s`` replaced by ``mapping(s)``; ``data``
    itself (the same object) when no string changes."""
    ops = list(pickletools.genops(data))
    out = io.BytesIO()
    changed = False
    for index, (opcode, arg, pos) in enumerate(ops):
        end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
        if opcode.name == "FRAME":
            continue  # frame lengths would be wrong once a string changes
        if opcode.name in _TEXT_OPCODES and isinstance(arg, str):
            new = mapping(arg)
            if new != arg:
                _emit_text(out, new)
                changed = True
                continue
        out.write(data[pos:end])
    return out.getvalue() if changed else data


def _is_gzip(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b"


def rewrite_pickle_file(path: str, mapping: Callable[[str], str]) -> None:
    """Rewrite a (possibly gzipped, as nipype's ``.pklz``) pickle file in place, atomically."""
    with open(path, "rb") as fobj:
        raw = fobj.read()
    zipped = _is_gzip(raw)
    data = gzip.decompress(raw) if zipped else raw
    new = rewrite_pickle(data, mapping)
    if new is data:
        return
    tmp = f"{path}.rewrite-{os.getpid()}"
    with open(tmp, "wb") as fobj:
        # level 1: nipype writes .pklz at level 9, which on a large array of numbers
        # takes ~20 s where level 1 takes 0.1 s for a file of about the same size
        fobj.write(gzip.compress(new, compresslevel=FAST_GZIP_LEVEL, mtime=0)
                   if zipped else new)
    st = os.stat(path)
    os.replace(tmp, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def rewrite_text_file(path: str, mapping: Callable[[str], str]) -> None:
    """Apply ``mapping`` to the whole text of a file in place (reports, hash files)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as fobj:
        text = fobj.read()
    new = mapping(text)
    if new != text:
        st = os.stat(path)
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as fobj:
            fobj.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
