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
import os
import threading
import time

from ...config import env_endpoint_url
from ...ec2.instances import default_ami
from ...ec2.jobs import (
    RunLayout,
    job_key_parameter,
    new_job_key,
    new_run_id,
    parse_s3_prefix,
)
from ...ec2.pricing import estimate_cost, smallest_fitting
from ...exceptions import ConfigurationError
from ...remote.placement import check_node_args
from ...remote.plugin import RemotePlugin
from ...s3.cas import ContentStore
from ...s3.credentials import resolve_session
from ...s3.errors import s3_errors
from ...s3.session import bucket_region, make_s3_client
from ...secrets import withheld_names, withheld_paths
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
        self._reset()
        bucket, prefix = parse_s3_prefix(s.s3_prefix)
        self.run_id = new_run_id()
        self.layout = RunLayout(bucket, prefix, self.run_id)
        self.started = time.time()
        session = resolve_session(creds_path=s.creds_path, profile=s.profile)
        endpoint = s.endpoint_url or env_endpoint_url()
        region = s.region or session.region_name
        if not region:
            region = bucket_region(bucket, session, endpoint_url=endpoint)
        self.region = region
        self.endpoint_url = endpoint
        kwargs = {"region_name": region}
        ec2_endpoint = os.environ.get("AWS_ENDPOINT_URL_EC2") or endpoint
        self.s3 = make_s3_client(session, bucket=bucket, endpoint_url=endpoint, region=region)
        self.sqs = session.client("sqs", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_SQS")
                                  or endpoint, **kwargs)
        self.ssm = session.client("ssm", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_SSM")
                                  or endpoint, **kwargs)
        self.ec2 = session.client("ec2", endpoint_url=ec2_endpoint, **kwargs)
        self.store = ContentStore(self.s3, bucket, prefix)
        # an input folder that holds them (a home directory, say) is staged without them
        self.store.withhold(*withheld_paths())
        self.store.withhold_names(*withheld_names())
        self.store.on_withheld = lambda paths: logger.warning(
            "EC2Plugin: %d file(s) of credentials in a folder given to a node are not "
            "staged, so they do not leave this machine: %s%s (see 'Security' in "
            "docs/ec2plugin.rst)", len(paths), ", ".join(paths[:5]),
            " ..." if len(paths) > 5 else "")
        self._shapes = {}
        self._leased = False
        self._shape(s.instance_type)  # a type that does not exist: said before anything is made
        logger.info("EC2Plugin: run %s, files in s3://%s/%s, up to %d x %s in %s",
                    self.run_id, bucket, self.layout.run_prefix, s.max_instances,
                    s.instance_type, region)
        self._job_key = new_job_key()  # signs the lease too
        with s3_errors(bucket=bucket, key=self.layout.lease_key, action="write the lease to",
                       endpoint=endpoint):
            self._write_lease()
        self._leased = True
        self.events_queue = self.sqs.create_queue(
            QueueName=self.layout.queue_name("events"))["QueueUrl"]
        self.ssm.put_parameter(Name=job_key_parameter(self.run_id), Type="SecureString",
                               Value=self._job_key.hex(), Overwrite=True,
                               Description=f"nipype-s3 job-signing key of run {self.run_id}")
        self._ami = s.ami or default_ami(self.ssm)
        self._package_uri, self._package_sha256 = (
            self._ship_package() if s.ship_package else (None, None))
        self._fleets: dict[str, _Fleet] = {}
        self._fleet(s.instance_type, s.image).pool.check_image()
        self._lease_stop.clear()
        self._lease_thread = threading.Thread(target=self._lease_loop, daemon=True,
                                              name="nipype-s3-lease")
        self._lease_thread.start()
