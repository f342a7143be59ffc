"""What BatchPlugin checks before anything is submitted: every node's own plugin_args
and size against the agents, the job queue's compute environments (vCPUs, GPUs) and a
job definition the user named. A bad value makes nothing."""

from __future__ import annotations

import re

from ...exceptions import ConfigurationError
from ...remote.placement import check_node_args

__all__ = ["ChecksMixin"]

#: what a node's own plugin_args may say under BatchPlugin
_NODE_ARGS = {"local": bool, "image": str, "batch": str, "gpus": int}
#: instance types (or families) with GPUs: P and G (a compute environment without any
#: runs no GPU job; 'optimal' has none)
_GPU_FAMILY = re.compile(r"(p|g|gr)\d")


class ChecksMixin:
    """BatchPlugin's checks (its settings, ``batch`` client and ``_call``)."""

    def _prerun_check(self, graph) -> None:
        s = self.settings
        too_big = []
        self._own_jobs: list[tuple[str, int, int]] = []  # (name, n_procs, gpus): own jobs
        for node in graph.nodes():
            check_node_args(node, _NODE_ARGS)
            args = getattr(node, "plugin_args", None) or {}
            args = args if isinstance(args, dict) else {}
            if args.get("batch", "job") != "job":
                raise ConfigurationError(
                    f"Node {node.fullname}: plugin_args['batch'] can only be 'job' (the "
                    f"node runs as a Batch job of its own), not {args['batch']!r}.")
            if "gpus" in args and (args.get("batch") != "job" or args["gpus"] < 1):
                raise ConfigurationError(
                    f"Node {node.fullname}: plugin_args['gpus'] ({args['gpus']!r}) is for a "
                    "node with a Batch job of its own: give {'batch': 'job', 'gpus': N} "
                    "with N >= 1 (the agents have no GPUs).")
            if args["local"] if "local" in args else self._kind_runs_here(node):
                continue
            n_procs = max(1, int(getattr(node, "n_procs", 1) or 1))
            mem_gb = float(getattr(node, "mem_gb", 0) or 0)
            if args.get("batch") == "job":  # its own job, sized for it
                self._own_jobs.append((node.fullname, n_procs, int(args.get("gpus", 0))))
                continue
            if n_procs > s.vcpus or mem_gb > s.mem_gb:
                too_big.append((node.fullname, n_procs, mem_gb))
        if too_big:
            name, n_procs, mem_gb = too_big[0]
            others = f" (and {len(too_big) - 1} more)" if len(too_big) > 1 else ""
            raise ConfigurationError(
                f"Node {name}{others} asks for {n_procs} CPUs and {mem_gb:g} GB of memory "
                f"(n_procs, mem_gb), but BatchPlugin's agents have {s.vcpus} vCPUs and "
                f"{s.mem_gb:g} GiB (agent_vcpus, agent_mem_gb). Raise those (within what "
                f"the job queue's compute environments give), or lower n_procs/mem_gb. "
                "Nothing was submitted.")

    def _check_job_definition(self, name: str) -> None:
        """The job definition the user named exists and is active (name, name:revision
        or ARN), before anything is submitted."""
        if name.startswith("arn:"):
            found = self._call(self.batch.describe_job_definitions, jobDefinitions=[name])
        else:
            base, _, revision = name.partition(":")
            found = self._call(self.batch.describe_job_definitions, jobDefinitionName=base,
                               status="ACTIVE")
            found = {"jobDefinitions": [d for d in found.get("jobDefinitions", [])
                                        if not revision or str(d.get("revision")) == revision]}
        if not [d for d in found.get("jobDefinitions", []) if d.get("status") == "ACTIVE"]:
            raise ConfigurationError(
                f"There is no active Batch job definition {name!r} in {self.region} "
                "(plugin_args['job_definition']): register it, or give 'image' instead to "
                "let BatchPlugin register one. Nothing was submitted.")

    def _check_capacity(self, queue: dict) -> None:
        """Refuse, before anything is submitted, an agent or a node of its own larger
        than every managed compute environment of the queue may ever run (Batch would
        leave it RUNNABLE for ever)."""
        names = [o["computeEnvironment"] for o in queue.get("computeEnvironmentOrder", [])]
        if not names:
            return
        found = self._call(self.batch.describe_compute_environments,
                           computeEnvironments=names).get("computeEnvironments", [])
        caps = [int((c.get("computeResources") or {}).get("maxvCpus") or 0) for c in found
                if c.get("type") == "MANAGED"]
        if not caps or len(caps) < len(found):
            return  # an unmanaged environment: its size is not Batch's to say
        cap, s = max(caps), self.settings
        where = (f"job queue {s.job_queue}'s compute environments run at most {cap} vCPUs "
                 "(maxvCpus; nipype-s3 batch setup --max-vcpus)")
        if s.vcpus > cap:
            raise ConfigurationError(f"BatchPlugin's agents have {s.vcpus} vCPUs "
                                     f"(agent_vcpus), but {where}. Lower agent_vcpus or "
                                     "raise maxvCpus. Nothing was submitted.")
        types = sorted({t for c in found
                        for t in (c.get("computeResources") or {}).get("instanceTypes", [])})
        gpus = any(_GPU_FAMILY.match(t) for t in types)
        for name, n_procs, want_gpus in getattr(self, "_own_jobs", []):
            if n_procs > cap:
                raise ConfigurationError(
                    f"Node {name} asks for {n_procs} CPUs (n_procs) for its own Batch job, "
                    f"but {where}. Lower its n_procs or raise maxvCpus. Nothing was "
                    "submitted.")
            if want_gpus and not gpus:
                raise ConfigurationError(
                    f"Node {name} asks for {want_gpus} GPU(s), but job queue "
                    f"{s.job_queue}'s compute environments have no GPU instances "
                    f"(instance types: {', '.join(types) or 'none'}; 'optimal' has none): "
                    "Batch would hold its job for ever. Give the queue GPU instance types "
                    "(nipype-s3 batch setup --instance-types optimal g5), or name another "
                    "job_queue. Nothing was submitted.")
