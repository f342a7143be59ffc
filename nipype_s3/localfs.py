"""Local folders and copies made safely: clear errors, no partial file at a destination."""

from __future__ import annotations

import os
import shutil
import threading

from .exceptions import ConfigurationError

__all__ = ["make_folder", "copy_file", "copy_tree", "walk_files", "make_link", "is_within"]


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
    """Whether ``path`` is ``folder`` or lies below it (both as given: no resolving)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
