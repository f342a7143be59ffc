"""Grabber templates matched against S3 keys (pure: no boto3, no network).

Two modes:

``glob`` (the default, as nipype's local ``DataGrabber``)
    ``*`` and ``?`` match within one path component (never across ``/``), ``[...]`` is a
    character set, a component that is just ``**`` matches any number of folder levels
    (none too: ``sub-01/**`` is every key below ``sub-01/``, ``sub-01/**/*.nii.gz``
    every NIfTI at any depth), and a name starting with ``.`` is matched only by a
    pattern that starts with ``.`` too — the rules of :func:`glob.glob` with
    ``recursive=True``. The whole key below ``bucket_path`` must match: ``T1w.nii.gz``
    does not match ``T1w.nii.gz.bak``.

``regex`` (nipype's old ``S3DataGrabber``, for migrating users)
    A Python regular expression that must match the whole key below ``bucket_path``.

In both, ``%s``/``%d`` fields are filled from ``template_args``; string arguments are
escaped first, so a subject id such as ``sub-01[a]`` matches itself literally.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import re
from collections.abc import Callable, Iterable

__all__ = ["fill_template", "literal_prefix", "compile_template", "covering_prefixes"]

_GLOB_META = "*?["
_ANY_DEPTH = object()  # a ``**`` component: any number of folder levels
_REGEX_META = set(".^$*+?{}[]|()")
_REGEX_QUANT = set("*?{")


def _check_mode(mode: str) -> None:
    if mode not in ("glob", "regex"):
        raise ValueError(f"template_type must be 'glob' or 'regex', not {mode!r}")


def fill_template(template: str, args: Iterable, mode: str = "glob") -> str:
    """``template % args`` with string arguments escaped for ``mode``.

    Raises
    ------
    TypeError
        The arguments do not fit the template's ``%`` fields; the message names both.
    """
    _check_mode(mode)
    args = tuple(args)
    if not args:
        return template
    escape = _glob.escape if mode == "glob" else re.escape
    safe = tuple(escape(a) if isinstance(a, str) else a for a in args)
    try:
        return template % safe
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{exc}: template {template!r} failed to convert with args "
                        f"{args!r}") from None


def literal_prefix(pattern: str, mode: str = "glob") -> str:
    """The longest plain-text start of ``pattern`` (what every match begins with)."""
    _check_mode(mode)
    out = []
    i = 0
    if mode == "glob":
        while i < len(pattern):
            char = pattern[i]
            if char == "[" and pattern[i:i + 3] in ("[*]", "[?]", "[[]"):
                out.append(pattern[i + 1])  # glob.escape's way of writing a literal
                i += 3
                continue
            if char in _GLOB_META:
                break
            out.append(char)
            i += 1
        return "".join(out)
    if pattern.startswith("^"):
        i = 1
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 < len(pattern) and not pattern[i + 1].isalnum():
                literal, width = pattern[i + 1], 2
            else:
                break  # \d, \w, \b ...: not plain text
        elif char in _REGEX_META:
            break
        else:
            literal, width = char, 1
        nxt = pattern[i + width] if i + width < len(pattern) else ""
        if nxt in _REGEX_QUANT:
            break  # this character may repeat or vanish
        out.append(literal)
        i += width
    return "".join(out)


def compile_template(pattern: str, mode: str = "glob") -> Callable[[str], bool]:
    """A predicate telling whether a key (relative to ``bucket_path``) matches."""
    _check_mode(mode)
    if mode == "regex":
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"template {pattern!r} is not a valid regular expression: "
                             f"{exc}") from None
        return lambda key: regex.fullmatch(key) is not None
    parts = pattern.split("/")
    matchers = []
    for part in parts:
        if part == "**":
            matchers.append(_ANY_DEPTH)
        elif any(c in part for c in _GLOB_META):
            regex = re.compile(fnmatch.translate(part))
            hidden_ok = part.startswith(".")
            matchers.append(lambda name, r=regex, h=hidden_ok:
                            (h or not name.startswith(".")) and r.match(name) is not None)
        else:
            matchers.append(lambda name, p=part: name == p)

    if _ANY_DEPTH not in matchers:
        def matches(key: str) -> bool:
            names = key.split("/")
            return len(names) == len(matchers) and all(
                m(n) for m, n in zip(matchers, names, strict=True))

        return matches

    end = len(matchers)

    def reach(states: set[int]) -> set[int]:
        """``states`` and the positions after any ``**`` there (it may match no level)."""
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < end and matchers[i] is _ANY_DEPTH and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return states

    def matches_any_depth(key: str) -> bool:
        states = reach({0})  # positions in the pattern the key's names so far can reach
        for name in key.split("/"):
            states = reach({i if matchers[i] is _ANY_DEPTH else i + 1 for i in states
                            if i < end and (not name.startswith(".") if matchers[i]
                                            is _ANY_DEPTH else matchers[i](name))})
            if not states:
                return False
        return end in states

    return matches_any_depth



def covering_prefixes(prefixes: Iterable[str]) -> list[str]:
    """The fewest prefixes whose listings cover all of ``prefixes`` (sorted)."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes)):
        if not any(prefix.startswith(k) for k in kept):
            kept.append(prefix)
    return kept
