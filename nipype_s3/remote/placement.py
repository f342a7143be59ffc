"""What runs on the controller and what runs remote, by a node's kind and inputs.

Cheap nodes (IdentityInterface, Merge, Select, MapNode collation), nodes naming the
controller's credentials, sinks and grabbers writing its folders, nodes that launch
instances themselves, nodes defined in the user's script, and grabbers and sinks re-run
with nothing changed run on the controller; every other node is sent. Also the paths
among a node's inputs: what is staged, and what it is told to write.
"""

from __future__ import annotations

import logging
import os

from nipype.pipeline.engine import MapNode

from ..exceptions import ConfigurationError
from ..localfs import walk_files

logger = logging.getLogger("nipype.workflow")


_LOCAL_INTERFACES = {"IdentityInterface", "Merge", "Select", "Split", "Rename",
                     "AssertEqual"}


def _writes_local_files(interface) -> bool:
    """A sink or grabber whose destination is a folder of the controller's: it must run
    there.

    nipype's DataSink with a local ``base_directory``, S3DataSink with a ``local_copy``
    and a grabber (ours or nipype's S3DataGrabber) with a ``local_directory`` would
    otherwise write their files on an instance, where no one sees them and they vanish
    with it; the grabber's folder, an existing input path, would also be staged whole
    (a download cache: everything in it) to get there.
    """
    from nipype.interfaces.base import isdefined
    from nipype.interfaces.io import DataSink
    from nipype.interfaces.io import S3DataGrabber as NipypeS3DataGrabber

    own = getattr(interface, "_nipype_s3_writes_local_files", None)
    if callable(own):  # ours say so themselves (no import of the interfaces here)
        return bool(own())
    if isinstance(interface, NipypeS3DataGrabber):
        return isdefined(interface.inputs.local_directory)
    if isinstance(interface, DataSink):
        base = interface.inputs.base_directory
        return not (isdefined(base) and str(base).lower().startswith("s3://"))
    return False


#: inputs naming credentials of the controller: a key file (ours, and nipype's
#: DataSink's), or a profile of its shared AWS files
_CREDENTIAL_INPUTS = ("creds_path", "data_creds_path", "profile", "data_profile")


def _credential_inputs(interface) -> list[str]:
    """The inputs of ``interface`` naming the controller's own credentials, when set.

    Such a node runs on the controller: elsewhere, its key file would have to be staged
    like any input file, into the run's S3 prefix and onto an instance (and a profile
    of this machine's ``~/.aws`` is not there at all).
    """
    from nipype.interfaces.base import isdefined

    values = {name: getattr(interface.inputs, name, None) for name in _CREDENTIAL_INPUTS}
    return [name for name, value in values.items() if isdefined(value) and value]


def _cached_always_run(node) -> bool:
    """An always-run node (a grabber or sink: DataSink, S3DataGrabber, SelectFiles...)
    that already ran with these inputs, none of whose files changed since.

    nipype runs such nodes again on every run, because what they read or write lies
    outside the workflow. Re-run with nothing changed, their work is a LIST and a
    comparison that transfers nothing, on files the controller already has: sent to an
    instance, it would boot one (and bill at least a minute) to find that out, so a
    re-run of the usual grab -> process -> sink workflow was never free.

    A sink's hash covers its input *paths* only (its inputs are ``Any`` traits), so an
    input file newer than the node's last result means new data to send: that node
    stays on an instance, which takes the file from the content store rather than from
    this machine's uplink. A node forced with ``overwrite=True`` stays there too.
    """
    if node.overwrite is not None or not node.interface.always_run:
        return False
    try:
        cached, _ = node.is_cached()
    except Exception:  # noqa: BLE001 - nipype's own check warns and runs the node
        return False
    if not cached:
        return False
    try:
        last = os.stat(os.path.join(node.output_dir(), f"result_{node.name}.pklz")).st_mtime
        for path in _input_paths(node):
            files = walk_files(path)[0] if os.path.isdir(path) else [path]
            if any(os.stat(f).st_mtime > last for f in files):
                return False
    except OSError:
        return False
    return True


def _orchestrates_instances(interface) -> bool:
    """EC2ContainerRun launches and waits for an instance of its own: run on an
    instance, it would bill two instances for one container's work."""
    return bool(getattr(interface, "_nipype_s3_launches_instances", False))


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return keep[-80:]


def _absolute_strings(node) -> list[str]:
    """The absolute paths (strings starting with ``/``) among a node's input values, in
    order, each once; not those in a command's ``environ``: paths there, ``FSLDIR``
    say, are the instance's own."""
    found: dict[str, None] = {}

    def walk(value):
        if isinstance(value, str):
            if value.startswith("/"):
                found.setdefault(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)

    inputs = node.inputs.get_traitsfree()
    inputs.pop("environ", None)
    walk(inputs)
    return list(found)


def _input_paths(node) -> list[str]:
    """Existing files and folders among a node's input values: what is staged."""
    return [p for p in _absolute_strings(node) if p != "/" and os.path.exists(p)]


def _output_targets(node) -> list[str]:
    """Absolute paths among a node's input values that do not exist yet but whose
    folder does: where it is told to write (``out_file="/data/derivs/brain.nii.gz"``).

    On an instance the node writes them below the worker root, and they come back to
    these paths, as ``Linear`` leaves them.
    """
    return [p for p in _absolute_strings(node) if not os.path.lexists(p)
            and os.path.dirname(p) != "/" and os.path.isdir(os.path.dirname(p))]


#: what nipype's own batch plugins read from a node's plugin_args: left alone here, so
#: a workflow written for SGE or SLURM runs unchanged
_OTHER_PLUGINS_ARGS = {"qsub_args", "sbatch_args", "bsub_args", "oarsub_args",
                       "overwrite", "template", "max_jobs"}


def check_node_args(node, known: dict) -> None:
    """A node's own ``plugin_args`` as a remote plugin reads them: a dict whose keys it
    knows (or nipype's batch plugins do), each of its kind; else a
    :class:`ConfigurationError` naming the node, the key and what it takes, before
    anything runs (a typo would otherwise be ignored: the node run elsewhere)."""
    args = getattr(node, "plugin_args", None)
    if args is None or args == {}:
        return
    if not isinstance(args, dict):
        example = ", ".join(f"{k!r}" for k in sorted(known))
        raise ConfigurationError(
            f"Node {node.fullname}: plugin_args must be a dict (e.g. {{'local': True}}; "
            f"this plugin reads {example}), not {args!r}.")
    for key, value in args.items():
        if key in _OTHER_PLUGINS_ARGS:
            continue
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"Node {node.fullname}: plugin_args key {key!r}{hint} is not one this "
                f"plugin reads; it reads {sorted(known)}.")
        kind = known[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigurationError(
                f"Node {node.fullname}: plugin_args[{key!r}] must be "
                f"{'True or False' if kind is bool else 'text'}, not {value!r}.")
        if key == "image":
            from .settings import checked_image

            checked_image(value, f"Node {node.fullname}: plugin_args['image']")


class PlacementMixin:
    """Where each node runs (for the remote plugin: ``self.settings.local_nodes``)."""

    # -- submission ---------------------------------------------------------------------
    def _kind_runs_here(self, node) -> str | None:
        """Why ``node`` runs on the controller whatever its inputs hold (``None``: it
        does not): a node of the same kind always does. Both the placement of each node
        and the check of the whole graph before the run go by these rules."""
        interface = node.interface
        if _credential_inputs(interface):
            return "credentials"
        if type(interface).__module__ == "__main__":
            return "__main__"
        if node.name in self.settings.local_nodes or \
                node.fullname in self.settings.local_nodes or \
                _writes_local_files(interface) or _orchestrates_instances(interface) or \
                type(interface).__name__ in _LOCAL_INTERFACES:
            return "kind"
        return None

    def _runs_locally(self, node) -> bool:
        args = getattr(node, "plugin_args", None) or {}
        keys = _credential_inputs(node.interface)
        if isinstance(args, dict) and "local" in args:
            if keys and not args["local"]:
                raise ConfigurationError(
                    f"Node {node.fullname}: {keys[0]} names credentials of this machine, "
                    f"and {type(self).__name__} does not send credentials to its agents. "
                    "Remove plugin_args {'local': False} (the node then runs here), or "
                    f"leave {keys[0]} unset so that the agents' role is used.")
            return bool(args["local"])
        why = self._kind_runs_here(node)
        if why == "credentials":
            self._log.info("%s runs on the controller: its credentials (%s) do not "
                        "leave this machine", node.fullname, keys[0])
            return True
        if isinstance(node, MapNode):
            return True
        if why == "__main__":
            self._log.warning(
                "%s runs on the controller: its interface %s is defined in the "
                "script that runs the workflow (__main__), which an instance cannot import. "
                "Move it into a module of its own (and install that on the instances with "
                "plugin_args 'requirements' or 'setup_commands') to run it there.",
                node.fullname, type(node.interface).__name__)
            return True
        if _cached_always_run(node):
            self._log.info("%s runs on the controller: its result for these inputs "
                        "is here, and it runs again only to check its source or "
                        "destination", node.fullname)
            return True
        return why is not None
