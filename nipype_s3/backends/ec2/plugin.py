"""EC2Plugin: run a Nipype workflow's nodes on EC2 instances, with no shared file system.

::

    wf.run(plugin=EC2Plugin(plugin_args={"s3_prefix": "s3://my-bucket/nipype-runs",
                                         "instance_type": "c6i.2xlarge",
                                         "max_instances": 8}))

How a node travels:

1. The controller (this plugin) resolves the node's inputs, hashes them as nipype would,
   stores its input files in S3 by content (``cas/sha256/<digest>``, skipping what is
   already there), and writes the pickled node and a signed job spec below
   ``runs/<run>/jobs/<job>/``; an SQS message announces the job.
2. An agent on an instance fetches the files under its own root, runs the node as
   nipype's batch plugins do, stores the node directory's files by content and writes
   ``runs/<run>/done/<job>.json`` (once: the first finished attempt wins).
3. The controller reads the run's events queue (one request per poll, whatever the
   number of pending jobs), downloads the node directory into the node's own output
   directory — data first, pickles last, with the agent's paths moved back — so nipype's
   cache, crash files and downstream nodes work as on a shared file system.

Cheap nodes (IdentityInterface, Merge, Select, MapNode collation, ``run_without_submitting``,
or ``node.plugin_args = {"local": True}``) run on the controller, as do sinks writing its
folders, nodes naming its credentials (which never leave it), EC2ContainerRun, and
grabbers and sinks re-run with nothing they read changed (a re-run launches nothing).
Instances are tagged with the run id, counted from EC2, capped by ``max_instances``, and
all terminated when the run ends — whether it succeeded, a node crashed, or the
controller was interrupted.
"""

from __future__ import annotations

import logging

from ...ec2.instances import default_ami
from ...ec2.pricing import estimate_cost, smallest_fitting
from ...exceptions import ConfigurationError
from ...remote.placement import check_node_args
from ...remote.plugin import RemotePlugin
from .fleet import FleetMixin, _Fleet
from .settings import EC2Settings

logger = logging.getLogger("nipype.workflow")


#: what a node's own plugin_args may say under EC2Plugin, and of what kind
_NODE_ARGS = {"local": bool, "instance_type": str, "image": str}


class EC2Plugin(FleetMixin, RemotePlugin):
    """Execute a workflow's nodes on EC2 instances (see the module docstring)."""

    settings_class = EC2Settings

    def _prerun_check(self, graph) -> None:
        """Nodes asking for more CPUs or memory than their instance type has: an error
        naming them and a type that fits, before any instance is paid for.

        nipype's MultiProc refuses such a workflow in the same way. Here the agent would
        run the job alone on the instance regardless, and a job that needs 100 GB on a
        4 GiB instance is killed for memory, retried, and killed again.
        """
        s = self.settings
        for node in graph.nodes():
            check_node_args(node, _NODE_ARGS)
        if s.max_cost_usd is not None:
            types = {s.instance_type} | {
                (getattr(n, "plugin_args", None) or {}).get("instance_type") or s.instance_type
                for n in graph.nodes() if isinstance(getattr(n, "plugin_args", None), dict)}
            unpriced = sorted(t for t in types if estimate_cost(t, 60.0) is None)
            if unpriced:
                raise ConfigurationError(
                    f"max_cost_usd needs the price of every instance type the run may "
                    f"launch, and {unpriced[0]!r} is not in nipype_s3's price table. Use "
                    "a type it knows, or leave max_cost_usd unset.")
        too_big = []
        for node in graph.nodes():
            args = getattr(node, "plugin_args", None) or {}
            args = args if isinstance(args, dict) else {}
            if args["local"] if "local" in args else self._kind_runs_here(node):
                continue  # runs on the controller
            n_procs = max(1, int(getattr(node, "n_procs", 1) or 1))
            mem_gb = float(getattr(node, "mem_gb", 0) or 0)
            itype = args.get("instance_type") or s.instance_type
            try:
                vcpus, mem = self._shape(itype)
            except ConfigurationError as exc:  # a type that does not exist: said now
                raise ConfigurationError(f"Node {node.fullname}: {exc}") from exc
            vcpus, mem = int(s.agent_vcpus or vcpus), float(s.agent_mem_gb or mem)
            if n_procs > vcpus or mem_gb > mem:
                too_big.append((node.fullname, n_procs, mem_gb, itype, vcpus, mem))
        if too_big:
            name, n_procs, mem_gb, itype, vcpus, mem = too_big[0]
            fits = smallest_fitting(n_procs, mem_gb, itype)
            hint = (f"node.plugin_args = {{'instance_type': '{fits}'}}" if fits else
                    "node.plugin_args = {'instance_type': ...} with a larger type")
            others = f" (and {len(too_big) - 1} more)" if len(too_big) > 1 else ""
            raise ConfigurationError(
                f"Node {name}{others} asks for {n_procs} CPUs and {mem_gb:g} GB of memory "
                f"(n_procs, mem_gb), but {itype} has {vcpus} vCPUs and {mem:g} GiB. Give it "
                f"a type that fits ({hint}), or lower n_procs/mem_gb. Nothing was launched.")

    def _start_run(self) -> None:
        s = self.settings
        session = self._open_run()
        self.ec2 = self._client(session, "ec2")
        self._shapes = {}
        self._shape(s.instance_type)  # a type that does not exist: said before anything is made
        logger.info("EC2Plugin: run %s, files in s3://%s/%s, up to %d x %s in %s",
                    self.run_id, self.layout.bucket, self.layout.run_prefix, s.max_instances,
                    s.instance_type, self.region)
        self._open_queues()
        self._ami = s.ami or default_ami(self.ssm)
        self._fleets: dict[str, _Fleet] = {}
        self._fleet(s.instance_type, s.image).pool.check_image()
        self._start_lease()
