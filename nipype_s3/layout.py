"""Where DataSink puts things: the key-layout rules (pure: no boto3, no network).

These are the rules of ``nipype.interfaces.io.DataSink``, written once so that the
S3 keys :class:`~nipype_s3.S3DataSink` writes below ``s3://bucket/prefix`` are exactly
the relative paths DataSink writes below a local ``base_directory``:

* the destination is ``root[/container]/<input name parts>/<dst>``; an input named
  ``a.b.@c`` adds the folders ``a/b`` (parts starting with ``@`` add none);
* a list of lists is flattened one level;
* ``dst`` is the file (or folder) name; with ``parameterization`` (default on) it is
  preceded by every folder of the source path that starts with ``_`` (iterables such
  as ``_subject_id_sub001``), after ``strip_dir`` is removed from the source folder;
* ``substitutions`` (plain ``str.replace``) and then ``regexp_substitutions``
  (``re.subn``) are applied to the joined destination, in order;
* a folder is copied whole below its destination; its contents keep their relative
  paths (substitutions are not applied to them);
* as on a file system, a key has no empty folder names: a substitution that leaves
  ``a//b`` or a leading ``/`` gives ``a/b`` (nipype's own S3 upload kept the ``//``).

For S3 the joined destination is the key (``prefix/container/...``): substitutions
are applied to the key, never to the bucket name.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .localfs import walk_files

__all__ = ["SinkEntry", "plan_sink", "destination_name", "substitute", "expand_entry",
           "as_key"]


@dataclass(frozen=True)
class SinkEntry:
    """One source (file or folder) and its destination (a key, or a local path)."""

    source: str
    dest: str
    is_dir: bool
    input_name: str


def _as_list(value) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def destination_name(src: str, *, parameterization: bool = True,
                     strip_dir: str | None = None) -> str:
    """The relative destination of one absolute source path (DataSink's ``_get_dst``)."""
    sep = os.sep
    path, fname = os.path.split(src.rstrip(sep))
    if parameterization:
        folder = path.replace(strip_dir, "") if strip_dir else path
        dst = sep.join(part for part in folder.split(sep) if part.startswith("_"))
        if fname:
            dst = os.path.join(dst, fname)
    else:
        dst = fname if fname else path.split(sep)[-1]
    return dst[1:] if dst.startswith(sep) else dst


def substitute(path: str, substitutions: Iterable = (),
               regexp_substitutions: Iterable = ()) -> str:
    """Apply plain then regular-expression substitutions, in order."""
    for old, new in substitutions or ():
        path = path.replace(old, new)
    for pattern, repl in regexp_substitutions or ():
        path, _ = re.subn(pattern, repl, path)
    return path


def as_key(path: str) -> str:
    """``path`` as the key a file system would make of it: without the empty folder
    names (``a//b``, a leading ``/``) or ``.`` a substitution can leave.

    Written locally, ``reoriented/sub-01//mean.nii`` is ``reoriented/sub-01/mean.nii``;
    as a key, the ``//`` would be a folder with no name, which S3 browsers, ``aws s3
    sync`` and glob templates (``sub-01/*.nii``) do not see where the local file is.
    """
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def plan_sink(outputs: Mapping[str, object], *, root: str = "", container: str | None = None,
              parameterization: bool = True, strip_dir: str | None = None,
              substitutions: Iterable = (), regexp_substitutions: Iterable = (),
              join: Callable[..., str] = posixpath.join) -> list[SinkEntry]:
    """Destinations for DataSink-style ``outputs`` (``{input name: path or paths}``).

    Parameters
    ----------
    outputs : mapping
        Input names (``"motion"``, ``"a.b.@c"``) to a path, a list, or a list of lists.
        Leave out undefined inputs.
    root : str
        The key prefix (with ``posixpath.join``) or the absolute local folder (with
        ``os.path.join``) the destinations start with.
    container, parameterization, strip_dir, substitutions, regexp_substitutions
        As the DataSink inputs of the same names.
    join : callable
        ``posixpath.join`` for keys, ``os.path.join`` for local paths.

    Returns
    -------
    list of SinkEntry
        In input order. Sources are absolute; ``is_dir`` says whether a source is an
        existing folder. A missing source is returned as a file (the caller reports it).
    """
    base = join(root, container) if container else root
    subs = list(substitutions or ())
    rsubs = list(regexp_substitutions or ())
    entries = []
    for name, files in outputs.items():
        files = _as_list(files)
        if not files:
            continue
        folder = base
        for part in name.split("."):
            if part and not part.startswith("@"):
                folder = join(folder, part) if folder else part
        if isinstance(files[0], list):
            files = [item for sub in files for item in sub]
        for src in files:
            src = os.path.abspath(os.fspath(src))
            is_dir = os.path.isdir(src)
            marked = src if os.path.isfile(src) else os.path.join(src, "")
            dst = destination_name(marked, parameterization=parameterization,
                                   strip_dir=strip_dir)
            if join is posixpath.join and os.sep != "/":
                dst = dst.replace(os.sep, "/")
            dest = substitute(join(folder, dst) if folder else dst, subs, rsubs)
            entries.append(SinkEntry(src.rstrip(os.sep) or src, dest, is_dir, name))
    return entries


def expand_entry(entry: SinkEntry, join: Callable[..., str] = posixpath.join):
    """``(source file, destination)`` pairs for an entry; a folder gives all its files."""
    if not entry.is_dir:
        return [(entry.source, entry.dest)]
    pairs = []
    files, broken = walk_files(entry.source)  # linked files and folders followed
    for full in files:
        rel = os.path.relpath(full, entry.source)
        if join is posixpath.join:
            rel = rel.replace(os.sep, "/")
        pairs.append((full, join(entry.dest, rel)))
    if broken:
        logging.getLogger("nipype_s3.sink").warning(
            "%d broken symbolic link(s) in %s hold no data and were not stored: %s",
            len(broken), entry.source, ", ".join(broken[:5]) + (" ..." if len(broken) > 5
                                                                 else ""))
    return pairs
