"""Local folders and copies made safely: clear errors, no partial file at a destination."""

from __future__ import annotations

import os
import shutil

from .exceptions import ConfigurationError

__all__ = ["make_folder", "copy_file", "copy_tree"]


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
    """Copy the folder ``source`` below ``dest`` (merged), each file as :func:`copy_file`."""
    shutil.copytree(source, dest, copy_function=copy_file, dirs_exist_ok=True)
    return dest
