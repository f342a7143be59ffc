"""Local folders and copies made safely: clear errors, no partial file at a destination."""

from __future__ import annotations

import os
import shutil
import threading

from .exceptions import ConfigurationError, UnsafePath

__all__ = ["make_folder", "copy_file", "copy_tree", "walk_files", "make_link", "is_within",
           "confine", "confine_absolute", "check_key_segments"]


def make_folder(folder: str, *, purpose: str, instead: str) -> None:
    """Create ``folder`` and its parents, or raise a ``ConfigurationError`` saying why not.

    ``purpose`` ends "Cannot {purpose} {folder!r}" (e.g. ``"download into"``); ``instead``
    names the input to change (e.g. ``"download somewhere else (local_directory)"``).
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        blocker = folder
        while blocker and not os.path.lexists(blocker):
            parent = os.path.dirname(blocker)
            blocker = parent if parent != blocker else ""
        if blocker and not os.path.isdir(blocker):
            raise ConfigurationError(
                f"Cannot {purpose} {folder!r}: {blocker!r} is a file, not a folder. Move "
                f"that file, or {instead}.") from exc
        raise ConfigurationError(
            f"Cannot {purpose} {folder!r}: {exc.strerror or exc}. Check that path and its "
            f"permissions, or {instead}.") from exc


def copy_file(source: str, dest: str) -> str:
    """Copy ``source`` to ``dest`` (data, mode and times) through a temporary name.

    ``dest`` is replaced only once the copy is whole: a copy that fails (a full disk, an
    interrupt) leaves the old ``dest``, or nothing, never a partial file.
    """
    tmp = f"{dest}.nipype-s3-{os.getpid()}.part"
    try:
        shutil.copy2(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return dest


def copy_tree(source: str, dest: str) -> str:
    """Copy the folder ``source`` below ``dest`` (merged), each file as :func:`copy_file`.

    Symbolic links are followed, as :func:`walk_files` does (a link back to a folder it
    is in is not); broken ones are skipped.
    """
    def loops(folder, names):
        here = os.path.realpath(folder)
        return [n for n in names if os.path.islink(os.path.join(folder, n)) and is_within(
            os.path.realpath(os.path.join(folder, n)), here)]

    shutil.copytree(source, dest, copy_function=copy_file, dirs_exist_ok=True,
                    ignore=loops, ignore_dangling_symlinks=True)
    return dest


def is_within(folder: str, path: str) -> bool:
    """Whether ``path`` is ``folder`` or lies below it, both made absolute and normalised
    (``..`` segments taken out; symbolic links are not resolved: see :func:`confine`)."""
    folder = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.abspath(path))
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_key_segments(key: str, *, what: str = "S3 key") -> str:
    """``key`` itself when each of its ``/``-separated segments can be a file name here;
    else :class:`~nipype_s3.exceptions.UnsafePath` naming it.

    S3 (and moto) store keys such as ``a/../../x`` or ``a//b``; turned into a path they
    would climb out of the folder they are written to, or collapse two keys into one.
    A trailing ``/`` (a folder marker) is allowed; NUL never is.
    """
    text = str(key)
    body = text[:-1] if text.endswith("/") else text
    bad = [seg for seg in body.split("/") if seg in ("", ".", "..")]
    if not body or bad or "\0" in text:
        why = f"a segment {bad[0]!r}" if bad else ("a NUL byte" if "\0" in text else
                                                    "no name")
        raise UnsafePath(
            f"Refusing the {what} {text!r}: it has {why}, so as a local path it would not "
            "stay in its folder. Rename the object (keys made of plain names separated by "
            "single '/'), or leave it out of what is fetched.")
    return text


def confine(root: str, relpath: str, *, what: str = "path", link: bool = False) -> str:
    """The local path of ``relpath`` below ``root``, proven to stay there.

    The one rule for every key or remote report entry that becomes a local path: the
    relative path may hold no ``.``/``..``/empty segment and may not be absolute, and the
    result, with every symbolic link resolved (a link an earlier entry of the same
    report made included), must lie below ``root``'s real path. Anything else is an
    :class:`~nipype_s3.exceptions.UnsafePath` naming the entry. Call it right before
    writing: a link made after the check is not seen.
    """
    text = str(relpath)
    if not text or os.path.isabs(text) or text.startswith(("/", "\\")):
        raise UnsafePath(f"Refusing the {what} {text!r}: it is absolute or empty; only a "
                         f"path relative to {root!r} is accepted.")
    check_key_segments(text.replace(os.sep, "/"), what=what)
    top = os.path.realpath(root)
    path = os.path.join(top, text)
    # a symbolic link about to be made there replaces what is at its own name: only its
    # folder must stay below root (the link may point anywhere: nothing is written
    # through it here, and a later entry written through it is checked then)
    checked = os.path.dirname(path.rstrip(os.sep)) if link else path
    if not _real_within(top, checked):
        raise UnsafePath(
            f"Refusing the {what} {text!r}: through a symbolic link it leads to "
            f"{os.path.realpath(checked)!r}, outside {root!r}.")
    return path


def _real_within(top: str, path: str) -> bool:
    """Whether ``path``, its links resolved (the last one too: a file written at a link
    is written to its target), lies below the real folder ``top``."""
    real = os.path.realpath(path)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def confine_absolute(allowed: list[str] | tuple[str, ...], path: str, *,
                     what: str = "path", link: bool = False) -> str:
    """``path`` (absolute) when it lies, links resolved, below one of ``allowed``;
    else :class:`~nipype_s3.exceptions.UnsafePath`. For reports naming absolute paths
    on this machine (what a node wrote into a folder it was given)."""
    text = str(path)
    if not os.path.isabs(text) or "\0" in text or any(
            seg in (".", "..") for seg in text.split(os.sep)):
        raise UnsafePath(f"Refusing the {what} {text!r}: not a plain absolute path.")
    # a link about to be made replaces what is at its name: only its folder must stay
    checked = os.path.dirname(text) if link else text
    for folder in allowed:
        top = os.path.realpath(folder)
        if os.path.normpath(folder) == os.path.normpath(text):
            if os.path.isdir(folder) and not os.path.islink(folder):
                continue  # a folder given is written into, not replaced by a file
            # a path it was told to write, itself: its folder must be the one it was
            parent = os.path.realpath(os.path.dirname(text))
            if parent == os.path.realpath(os.path.dirname(folder)) and (
                    link or _real_within(parent, text)):
                return text
        elif is_within(folder, text) and (_real_within(top, checked) or
                                          (link and os.path.normpath(folder) == checked)):
            return text
    raise UnsafePath(f"Refusing the {what} {text!r}: it is not within what may be written "
                     f"({', '.join(map(repr, allowed[:3]))}{' ...' if len(allowed) > 3 else ''}).")


def walk_files(folder: str, *, keep_inner_links: bool = False
               ) -> tuple[list[str], list[str]]:
    """The files below ``folder`` (sorted, a folder's own before its subfolders'), and
    apart from them the symbolic links not followed.

    Symbolic links are followed: a linked file is listed under the link's path, and a
    linked folder's files under the link's, as ``cp -rL`` or nipype's ``DataSink`` copy
    them (``os.walk`` leaves linked folders out). A link back to a folder it is in is
    not followed, so a loop ends. Broken links, which hold no data, are returned apart;
    so are, with ``keep_inner_links``, links to anything inside ``folder`` (whose
    content is listed where it lies), for a caller that makes the links again.
    """
    files: list[str] = []
    links: list[str] = []
    top = os.path.realpath(folder)
    stack = [(folder, (top,))]
    while stack:
        path, ancestors = stack.pop()
        subfolders = []
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    if not os.path.exists(entry.path) or keep_inner_links and \
                            is_within(top, real):
                        links.append(entry.path)
                        continue
                if entry.is_dir():  # a link to a folder too
                    real = os.path.realpath(entry.path)
                    if real not in ancestors and not (
                            entry.is_symlink() and is_within(real, ancestors[-1])):
                        subfolders.append((entry.path, ancestors + (real,)))
                elif entry.is_file():
                    files.append(entry.path)
        stack.extend(reversed(subfolders))
    return files, links


def make_link(path: str, target: str) -> None:
    """A symbolic link at ``path`` to ``target`` (folders made as needed), replacing a
    file or link there."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.islink(path) and os.readlink(path) == target:
        return
    tmp = f"{path}.nipype-s3-{os.getpid()}-{threading.get_ident()}.link"
    try:
        os.symlink(target, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
