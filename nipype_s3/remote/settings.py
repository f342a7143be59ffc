"""Checking ``plugin_args`` values: each argument taken as the kind its settings field
declares (``"4"`` becomes 4), or a :class:`ConfigurationError` naming the argument, the
value and what it takes."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..agent.config import DEFAULT_WORKER_ROOT
from ..ec2.jobs import parse_s3_prefix
from ..exceptions import ConfigurationError

__all__ = ["_checked_arg", "checked_image", "RemoteSettings", "AT_LEAST"]

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


def _checked_arg(name: str, value, annotation: str, plugin: str = "EC2Plugin"):
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
        f"{plugin} plugin_args[{name!r}] must be {wanted}"
        f"{' (or None)' if 'None' in kinds else ''}, not {value!r}.")


#: the least value each numeric plugin argument of every backend may take
AT_LEAST = {"idle_timeout": 0.001, "max_lifetime": 1, "lease_timeout": 1,
            "visibility_timeout": 1, "heartbeat": 0.1, "max_attempts": 1, "poll_wait": 0,
            "done_scan_interval": 0.1, "scale_interval": 0.1, "agent_vcpus": 1,
            "agent_mem_gb": 0.1, "stall_timeout": 1, "max_cost_usd": 0.0}

#: folders the agent's work folder may not be (it is emptied, mounted and handed over)
_SYSTEM_DIRS = {"", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/opt",
                "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr",
                "/usr/bin", "/usr/lib", "/usr/local", "/var", "/var/lib", "/var/log",
                "/var/run", "/var/tmp", "/mnt"}


@dataclass
class RemoteSettings:
    """What every backend's ``plugin_args`` share (each backend's settings class
    documents them, with its own)."""

    s3_prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    creds_path: str | None = None
    idle_timeout: float = 180.0
    max_lifetime: float = 6 * 3600.0
    lease_timeout: float = 120.0
    visibility_timeout: int = 120
    heartbeat: float = 30.0
    max_attempts: int = 3
    poll_wait: int = 20
    worker_root: str = DEFAULT_WORKER_ROOT
    requirements: list = field(default_factory=list)
    ship_package: bool = True
    local_nodes: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    done_scan_interval: float = 30.0
    scale_interval: float = 2.0
    agent_vcpus: int | None = None
    agent_mem_gb: float | None = None
    stall_timeout: float = 900.0
    max_cost_usd: float | None = None
    image: str | None = None

    _NIPYPE_KEYS = {"max_jobs", "status_callback", "template", "qsub_args"}
    #: the plugin's name in messages, and what it sizes instead of MultiProc's n_procs
    _PLUGIN = "RemotePlugin"
    _SIZING_HINT = ""
    _AT_LEAST = AT_LEAST
    #: the other backend's plugin_args, with where their job is done here
    _ELSEWHERE = {}

    @classmethod
    def from_plugin_args(cls, args: dict | None):
        args = dict(args or {})
        name = cls._PLUGIN
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(args) - known - cls._NIPYPE_KEYS
        multiproc = sorted(unknown & {"n_procs", "memory_gb", "raise_insufficient",
                                      "scheduler", "maxtasksperchild"})
        if multiproc:
            raise ConfigurationError(
                f"{name} plugin_args {multiproc[0]!r} is MultiProc's (what one machine "
                f"may use). {cls._SIZING_HINT}; a node's own n_procs/mem_gb still pack "
                f"jobs on each. Remove {multiproc[0]!r}.")
        elsewhere = [arg for arg in sorted(unknown) if arg in cls._ELSEWHERE]
        if elsewhere:
            raise ConfigurationError(
                f"{name} does not take plugin_args {elsewhere[0]!r}: "
                f"{cls._ELSEWHERE[elsewhere[0]]}. Remove {elsewhere[0]!r}.")
        if unknown:
            import difflib

            hints = [f"{arg!r} (did you mean {close[0]!r}?)" if close else repr(arg)
                     for arg in sorted(unknown)
                     for close in [difflib.get_close_matches(arg, known, n=1)]]
            raise ConfigurationError(
                f"{name} does not know plugin_args {', '.join(hints)}; the known ones are "
                f"{sorted(known)}.")
        settings = cls(**{k: _checked_arg(k, v, cls.__dataclass_fields__[k].type, name)
                          for k, v in args.items() if k in known})
        parse_s3_prefix(settings.s3_prefix, settings._PLUGIN)
        for arg, low in cls._AT_LEAST.items():
            value = getattr(settings, arg)
            if value is not None and value < low:
                raise ConfigurationError(
                    f"{name} plugin_args[{arg!r}] must be at least {low}, not {value!r}.")
        if settings.heartbeat >= settings.visibility_timeout:
            raise ConfigurationError(
                f"heartbeat ({settings.heartbeat}) must be shorter than visibility_timeout "
                f"({settings.visibility_timeout}), or running jobs would be handed out twice.")
        checked_image(settings.image, f"{name} plugin_args['image']")
        root = settings.worker_root
        if not (isinstance(root, str) and root.startswith("/") and
                os.path.normpath(root) == root and root.rstrip("/") not in _SYSTEM_DIRS):
            raise ConfigurationError(
                f"{name} plugin_args['worker_root'] must be an absolute, normalised path "
                f"of a folder of the agent's own (default {DEFAULT_WORKER_ROOT!r}), not a "
                f"system folder: {root!r}. With 'image' it is mounted into the container "
                "and given to the image's user.")
        settings._check()
        return settings

    def _check(self) -> None:
        """The backend's own checks of its settings."""
