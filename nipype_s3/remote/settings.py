"""Checking ``plugin_args`` values: each argument taken as the kind its settings field
declares (``"4"`` becomes 4), or a :class:`ConfigurationError` naming the argument, the
value and what it takes."""

from __future__ import annotations

import re

from ..exceptions import ConfigurationError

__all__ = ["_checked_arg", "checked_image"]

#: a container image reference: [registry[:port]/]name[:tag][@digest]
_IMAGE_REF = re.compile(r"[a-z0-9][a-z0-9._-]*(:[0-9]+)?(/[a-z0-9][a-z0-9._-]*)*"
                        r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[0-9a-f]{64})?")


def checked_image(value, where: str):
    """``value`` when it is a container image reference, else a
    :class:`ConfigurationError` naming ``where`` it was given and the value."""
    if value is None or (isinstance(value, str) and _IMAGE_REF.fullmatch(value)):
        return value
    raise ConfigurationError(
        f"{where} must be a container image reference such as 'nipype/nipype:py311' or "
        f"'123456789012.dkr.ecr.us-east-1.amazonaws.com/fsl:6.0.7' (lower-case name, "
        f"optional :tag and @sha256:digest), not {value!r}.")

_KINDS = {"int": (int, "a whole number, e.g. 4"), "float": (float, "a number, e.g. 30"),
          "bool": (bool, "True or False"), "str": (str, "text"),
          "list": (list, "a list, e.g. ['a', 'b']"), "dict": (dict, "a dict")}


def _checked_arg(name: str, value, annotation: str):
    """``value`` as the kind ``plugin_args[name]`` takes (``"4"`` → 4), or a
    :class:`ConfigurationError` naming the argument, the value and what it takes."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if value is None and "None" in kinds:
        return None
    kind = next(k for k in kinds if k != "None")
    pytype, wanted = _KINDS[kind]
    ok = isinstance(value, pytype) and not (pytype in (int, float) and
                                            isinstance(value, bool))
    if ok:
        return value
    try:
        if pytype is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if pytype is int and not isinstance(value, bool) and (
                isinstance(value, str) or float(value).is_integer()):
            return int(value)
        if pytype is list and isinstance(value, tuple):
            return list(value)
    except (TypeError, ValueError):
        pass
    raise ConfigurationError(
        f"EC2Plugin plugin_args[{name!r}] must be {wanted}"
        f"{' (or None)' if 'None' in kinds else ''}, not {value!r}.")
