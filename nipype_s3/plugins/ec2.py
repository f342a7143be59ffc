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

import gzip
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import statistics
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import botocore.exceptions
from nipype.pipeline.engine import MapNode
from nipype.pipeline.plugins.base import SGELikeBatchManagerBase
from nipype.utils.filemanip import loadpkl, savepkl

from .. import __version__
from ..agent.config import DEFAULT_WORKER_ROOT, AgentConfig
from ..agent.main import transient
from ..agent.runner import run_node, write_failure_result
from ..config import env_endpoint_url
from ..ec2.instances import InstancePool, LaunchSpec, default_ami
from ..ec2.jobs import (
    MAX_MESSAGE_BYTES,
    MAX_REPORT_BYTES,
    MessageRejected,
    RunLayout,
    job_key_parameter,
    make_message,
    new_job_key,
    new_run_id,
    parse_s3_prefix,
    read_bounded,
    seal,
    unseal,
)
from ..ec2.pricing import billed_seconds, estimate_cost, instance_shape, smallest_fitting
from ..ec2.userdata import render_user_data
from ..exceptions import ConfigurationError, EC2Error, InstanceLaunchError, UnsafePath
from ..localfs import confine, confine_absolute, walk_files
from ..pickles import FAST_GZIP_LEVEL, PathMap, rewrite_pickle_file, rewrite_text_file
from ..s3.cas import ContentStore, ManifestEntry, sha256_file
from ..s3.credentials import resolve_session
from ..s3.delete import abort_incomplete_uploads
from ..s3.errors import s3_errors, translate
from ..s3.listing import iter_objects
from ..s3.session import bucket_region, make_s3_client
from ..secrets import scrub_tree, secret_values, withheld_paths

__all__ = ["EC2Plugin", "EC2Settings"]

logger = logging.getLogger("nipype.workflow")

#: Finished jobs fetched at once (each a few small requests, mostly waiting).
_COLLECTORS = 8
#: Jobs sent at once: their inputs stored, pickle and spec written, message queued.
_SENDERS = 4
#: nipype's loop sleeps this long between rounds in graphs up to _FAST_LOOP_NODES nodes
_FAST_LOOP_SLEEP, _FAST_LOOP_NODES = 0.05, 2000
#: seconds from launch to a working agent on AWS, until this run has measured one
_TYPICAL_BOOT = 60.0
#: the events queue is read every _QUICK_POLL s while at most _FEW_JOBS jobs are out
_QUICK_POLL, _FEW_JOBS = 0.25, 10

_AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)

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

    from ..interfaces.grabber import S3DataGrabber
    from ..interfaces.sink import S3DataSink

    if isinstance(interface, (S3DataGrabber, NipypeS3DataGrabber)):
        return isdefined(interface.inputs.local_directory)
    if isinstance(interface, S3DataSink):
        return isdefined(interface.inputs.local_copy)
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
    from ..interfaces.container import EC2ContainerRun

    return isinstance(interface, EC2ContainerRun)


@dataclass
class EC2Settings:
    """``plugin_args`` of :class:`EC2Plugin`, with their defaults.

    Parameters
    ----------
    s3_prefix : str
        **Required.** ``s3://bucket/prefix`` for the run's files and the content store.
    instance_type : str
        EC2 instance type of the agents (default ``c6i.large``).
    max_instances : int
        Never more instances than this at once (default 4).
    ami : str
        AMI id; default: Amazon Linux 2023 from AWS's public SSM parameter.
    iam_instance_profile : str
        Name or ARN of the instance profile the agents run with (default
        ``nipype-s3-agent``); it gives them S3, SQS and SSM access, so no key is ever
        sent to an instance.
    region : str
        Default: the region of the ``s3_prefix`` bucket.
    spot : bool
        Ask for spot instances; after ``spot_retries`` capacity failures, on-demand.
    idle_timeout, max_lifetime, lease_timeout : float
        Seconds: an agent stops when idle this long, when older than ``max_lifetime``,
        or when the controller has not renewed its lease for ``lease_timeout``.
    visibility_timeout, heartbeat : float
        SQS visibility of a running job and how often an agent extends it; a job whose
        agent died runs again after ``visibility_timeout``.
    max_attempts : int
        Attempts of one job before it is reported as an infrastructure failure.
    max_boot_failures : int
        Instances that may end before their agent starts (a broken bootstrap) before
        the run stops with a clear error instead of launching again and again.
    boot_timeout : float
        Seconds from launch to the agent's first message. An instance still silent
        after that (a bootstrap that hangs) is terminated and counts as a boot failure.
    stall_timeout : float
        Seconds jobs may wait while agents are up, none of the run's jobs runs, and no
        job starts or ends (default 900): then no agent can take them (a role that may
        not read them, say) and the run stops with an error saying so.
    max_launches : int
        Instances one run may launch in all (default: 10 x ``max_instances``); a run
        that would need more stops with an error instead of launching forever.
    max_cost_usd : float
        A cap on the run's estimated cost (on-demand list prices, 60 s minimum per
        instance): no instance is launched that would take the estimate past it, and
        when the estimate reaches it the run stops, naming the nodes not run, with
        nothing left running. Default: no cap.
    """

    s3_prefix: str = ""
    instance_type: str = "c6i.large"
    max_instances: int = 4
    ami: str | None = None
    iam_instance_profile: str | None = "nipype-s3-agent"
    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    creds_path: str | None = None
    spot: bool = False
    spot_retries: int = 2
    idle_timeout: float = 180.0
    max_lifetime: float = 6 * 3600.0
    lease_timeout: float = 120.0
    visibility_timeout: int = 120
    heartbeat: float = 30.0
    max_attempts: int = 3
    poll_wait: int = 20
    worker_root: str = DEFAULT_WORKER_ROOT
    subnet_id: str | None = None
    security_group_ids: list = field(default_factory=list)
    key_name: str | None = None
    volume_gb: int | None = None
    requirements: list = field(default_factory=list)
    setup_commands: str = ""
    ship_package: bool = True
    local_nodes: list = field(default_factory=list)
    tags: dict = field(default_factory=dict)
    done_scan_interval: float = 30.0
    scale_interval: float = 2.0
    agent_vcpus: int | None = None
    agent_mem_gb: float | None = None
    max_boot_failures: int = 3
    boot_timeout: float = 900.0
    stall_timeout: float = 900.0
    max_launches: int | None = None
    max_cost_usd: float | None = None

    _NIPYPE_KEYS = {"max_jobs", "status_callback", "template", "qsub_args"}

    @classmethod
    def from_plugin_args(cls, args: dict | None) -> EC2Settings:
        args = dict(args or {})
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = set(args) - known - cls._NIPYPE_KEYS
        multiproc = sorted(unknown & {"n_procs", "memory_gb", "raise_insufficient",
                                      "scheduler", "maxtasksperchild"})
        if multiproc:
            raise ConfigurationError(
                f"EC2Plugin plugin_args {multiproc[0]!r} is MultiProc's (what one machine "
                "may use). EC2Plugin sizes the machines instead: 'instance_type' (e.g. "
                "'c6i.2xlarge', 8 vCPUs and 16 GiB) and 'max_instances' (how many at "
                "once); a node's own n_procs/mem_gb still pack jobs on each instance. "
                f"Remove {multiproc[0]!r}.")
        if unknown:
            import difflib

            hints = [f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
                     for name in sorted(unknown)
                     for close in [difflib.get_close_matches(name, known, n=1)]]
            raise ConfigurationError(
                f"EC2Plugin does not know plugin_args {', '.join(hints)}; the known ones are "
                f"{sorted(known)}.")
        settings = cls(**{k: _checked_arg(k, v, cls.__dataclass_fields__[k].type)
                          for k, v in args.items() if k in known})
        parse_s3_prefix(settings.s3_prefix)
        for name, low in _AT_LEAST.items():
            value = getattr(settings, name)
            if value is not None and value < low:
                raise ConfigurationError(
                    f"EC2Plugin plugin_args[{name!r}] must be at least {low}, not {value!r}.")
        if settings.heartbeat >= settings.visibility_timeout:
            raise ConfigurationError(
                f"heartbeat ({settings.heartbeat}) must be shorter than visibility_timeout "
                f"({settings.visibility_timeout}), or running jobs would be handed out twice.")
        return settings


#: the least value each numeric plugin argument may take
_AT_LEAST = {"max_instances": 1, "spot_retries": 0, "idle_timeout": 0.001,
             "max_lifetime": 1, "lease_timeout": 1, "visibility_timeout": 1,
             "heartbeat": 0.1, "max_attempts": 1, "poll_wait": 0, "volume_gb": 1,
             "done_scan_interval": 0.1, "scale_interval": 0.1, "agent_vcpus": 1,
             "agent_mem_gb": 0.1, "max_boot_failures": 1, "boot_timeout": 1,
             "stall_timeout": 1, "max_launches": 1, "max_cost_usd": 0.0}

_KINDS = {"int": (int, "a whole number, e.g. 4"), "float": (float, "a number, e.g. 30"),
          "bool": (bool, "True or False"), "str": (str, "text"),
          "list": (list, "a list, e.g. ['nitime']"), "dict": (dict, "a dict")}


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


@dataclass
class _Fleet:
    instance_type: str
    queue_url: str
    pool: InstancePool
    vcpus: int
    mem_gb: float


@dataclass
class _Job:
    taskid: int
    job_id: str
    node: object
    node_dir: str
    submitted: float
    n_procs: int
    mem_gb: float
    remote: bool = True
    done: bool = False
    report: dict | None = None
    instance_type: str = ""
    #: the upload of its inputs, pickle and spec and the queue message, while under way
    sending: object = None
    #: the folders among its inputs and the paths it is told to write: what it writes
    #: there comes back (nowhere else)
    writable: tuple = ()
    #: when an agent said it started it (a signed event)
    started: float | None = None
    #: an agent said it finished (a signed event); times it was sent again
    reported: bool = False
    resent: int = 0


class EC2Plugin(SGELikeBatchManagerBase):
    """Execute a workflow's nodes on EC2 instances (see the module docstring)."""

    def __init__(self, plugin_args=None, **kwargs):
        plugin_args = dict(plugin_args or {})
        plugin_args.update(kwargs)
        self.settings = EC2Settings.from_plugin_args(plugin_args)
        super().__init__(template="", plugin_args=plugin_args)
        self._jobs: dict[int, _Job] = {}
        self._by_job_id: dict[str, _Job] = {}
        self._write_back_lock = threading.Lock()
        self._next_taskid = 0
        self._fatal: BaseException | None = None
        self.run_id: str | None = None
        self.layout: RunLayout | None = None
        self.stats = {"submitted": 0, "local": 0, "remote_done": 0, "polls": 0}
        self._lease_stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._last_poll = 0.0
        self._last_scan = 0.0
        self._last_scale = 0.0
        self._busy_seconds = 0.0
        #: one entry per remote job collected: when it was submitted, taken by an agent,
        #: its node started and ended, the agent reported, and the controller saw it
        #: (seconds since the epoch; instance clocks are NTP-synchronised on EC2)
        self.timings: list[dict] = []
        self.cost_report: dict | None = None
        self.peak = 0
        self._fleets = {}
        self._shapes: dict[str, tuple[int, float]] = {}
        self._leased = False
        self._booted: set[str] = set()
        self._progress = 0.0
        self._senders: ThreadPoolExecutor | None = None
        self._reset()

    # -- run lifecycle ------------------------------------------------------------------
    def run(self, graph, config, updatehash=False):
        """Run the graph; whatever happens, terminate the run's instances."""
        try:
            self._start_run()
            # nipype's loop sleeps poll_sleep_duration (2 s by default) between rounds: a
            # round per level of the graph, seconds for a re-run with nothing to do. Its
            # rounds are cheap here (AWS is asked at the pace of _poll_interval), so the
            # loop turns fast while the graph is not huge.
            self._user_poll = float(config["execution"]["poll_sleep_duration"])
            if len(graph) <= _FAST_LOOP_NODES:
                config = dict(config, execution=dict(
                    config["execution"], poll_sleep_duration=min(self._user_poll,
                                                                 _FAST_LOOP_SLEEP)))
            try:
                result = super().run(graph, config, updatehash=updatehash)
            except RuntimeError as err:
                if self._fatal is not None:  # the infrastructure failed, not a node
                    raise self._fatal from err
                raise
            if self._fatal is not None:
                raise self._fatal
            return result
        finally:
            self._finish_run()

    def _prerun_check(self, graph) -> None:
        """Nodes asking for more CPUs or memory than their instance type has: an error
        naming them and a type that fits, before any instance is paid for.

        nipype's MultiProc refuses such a workflow in the same way. Here the agent would
        run the job alone on the instance regardless, and a job that needs 100 GB on a
        4 GiB instance is killed for memory, retried, and killed again.
        """
        s = self.settings
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

    def _reset(self) -> None:
        """What one run learns, forgotten before the next: one plugin object can run
        workflows one after the other, as ``Linear`` can."""
        self._jobs, self._by_job_id, self._messages = {}, {}, {}
        self._fatal = None
        self.stats = {"submitted": 0, "local": 0, "remote_done": 0, "polls": 0}
        self.timings, self.cost_report, self.peak = [], None, 0
        self._busy_seconds, self._progress = 0.0, 0.0
        self._booted = set()
        self._boot_seconds: list[float] = []
        self._last_poll = self._last_scale = 0.0
        self._last_scan = time.monotonic()  # the first LIST of done/ after one interval

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
        self._fleet(s.instance_type).pool.check_image()
        self._lease_stop.clear()
        self._lease_thread = threading.Thread(target=self._lease_loop, daemon=True,
                                              name="nipype-s3-lease")
        self._lease_thread.start()

    def _ship_package(self) -> tuple[str, str]:
        """Upload this very nipype_s3 package, so agents run the controller's code: its
        ``s3://`` URI and SHA-256, which the bootstrap checks before installing it.

        Its key is predictable (the zip is the same for the same code), so an object
        already there is not trusted: it is read back and hashed (a few hundred KB, once
        a run), and sent again when it is not these bytes. S3-compatible stores do not
        all keep checksums (nor does moto), so none is relied on.
        """
        import base64

        import nipype_s3

        pkg_dir = os.path.dirname(nipype_s3.__file__)
        buf = _zip_package(pkg_dir)
        raw = hashlib.sha256(buf).digest()
        digest, checksum = raw.hex(), base64.b64encode(raw).decode()
        key = self.store.key(digest)
        try:
            there = read_bounded(self.s3, self.layout.bucket, key, len(buf),
                                 what="shipped package")
            genuine = hashlib.sha256(there).digest() == raw
        except (botocore.exceptions.ClientError, MessageRejected):
            genuine = False
        if not genuine:
            self.s3.put_object(Bucket=self.layout.bucket, Key=key, Body=buf,
                               ChecksumSHA256=checksum)
        return f"s3://{self.layout.bucket}/{key}", digest

    def _fleet(self, instance_type: str) -> _Fleet:
        """The queue and instances for one instance type (made on first use)."""
        fleet = self._fleets.get(instance_type)
        if fleet is not None:
            return fleet
        s = self.settings
        default = instance_type == s.instance_type
        vcpus, mem_gb = self._shape(instance_type)  # a type that does not exist: nothing made
        kind = "jobs" if default else f"jobs-{_slug(instance_type).replace('.', '-')}"
        queue = self.sqs.create_queue(
            QueueName=self.layout.queue_name(kind),
            Attributes={"VisibilityTimeout": str(int(s.visibility_timeout)),
                        "MessageRetentionPeriod": "1209600"})["QueueUrl"]
        if s.agent_vcpus:
            vcpus = int(s.agent_vcpus)
        if s.agent_mem_gb:
            mem_gb = float(s.agent_mem_gb)
        agent_cfg = AgentConfig(
            bucket=self.layout.bucket, prefix=self.layout.prefix, run_id=self.run_id,
            region=self.region, jobs_queue_url=queue, events_queue_url=self.events_queue,
            job_key_parameter=job_key_parameter(self.run_id),
            endpoint_url=self.endpoint_url, idle_timeout=s.idle_timeout,
            max_lifetime=s.max_lifetime, visibility_timeout=int(s.visibility_timeout),
            heartbeat=s.heartbeat, poll_wait=int(s.poll_wait),
            lease_check=max(1.0, min(15.0, s.lease_timeout / 4)),
            max_attempts=int(s.max_attempts), worker_root=s.worker_root,
            vcpus=s.agent_vcpus, mem_gb=s.agent_mem_gb)
        user_data = render_user_data(
            run_id=self.run_id, config_json=agent_cfg.to_json(), region=self.region,
            worker_root=s.worker_root,
            requirements=_requirements(s.requirements, self._package_uri is None),
            package_s3_uri=self._package_uri, package_sha256=self._package_sha256,
            setup_commands=s.setup_commands)
        pool = InstancePool(self.ec2, self.run_id, LaunchSpec(
            ami=self._ami, instance_type=instance_type, user_data=user_data,
            iam_instance_profile=s.iam_instance_profile, subnet_id=s.subnet_id,
            security_group_ids=list(s.security_group_ids), key_name=s.key_name,
            volume_gb=s.volume_gb, extra_tags=dict(s.tags)), spot=s.spot,
            spot_retries=s.spot_retries)
        fleet = _Fleet(instance_type, queue, pool, vcpus, mem_gb)
        self._fleets[instance_type] = fleet
        return fleet

    def _shape(self, instance_type: str) -> tuple[int, float]:
        """(vCPUs, GiB) of ``instance_type``, looked up once a run."""
        if instance_type not in self._shapes:
            self._shapes[instance_type] = instance_shape(instance_type, self.ec2)
        return self._shapes[instance_type]

    @property
    def pool(self) -> InstancePool | None:
        """The default instance type's pool (for inspection)."""
        fleet = (getattr(self, "_fleets", None) or {}).get(self.settings.instance_type)
        return fleet.pool if fleet is not None else None

    def _write_lease(self) -> None:
        # signed: an unsigned lease (anyone can write the run's prefix) cannot stop the
        # agents, nor keep them alive after the controller is gone
        body = seal(self._job_key, "lease", {
            "run_id": self.run_id, "expires": time.time() + self.settings.lease_timeout,
            "renewed": time.time()})
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.lease_key, Body=body)

    def _lease_loop(self) -> None:
        interval = max(0.5, self.settings.lease_timeout / 4)
        while not self._lease_stop.wait(interval):
            try:
                self._write_lease()
            except Exception as exc:  # keep trying: agents tolerate a missed renewal
                logger.warning("EC2Plugin: could not renew the lease: %s", exc)

    def _finish_run(self) -> None:
        self._lease_stop.set()
        if self._senders is not None:  # jobs not yet sent are not sent...
            self._senders.shutdown(wait=False, cancel_futures=True)
        errors = []

        def step(fn):
            try:
                fn()
            except Exception as exc:
                errors.append(exc)
                logger.error("EC2Plugin: cleanup step %s failed: %s", fn.__name__, exc)

        # independent requests at once (a re-run's teardown was seconds of round trips);
        # the cost report and the sweep of uploads once the instances are ended
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="nipype-s3-end") as pool:
            list(pool.map(step, (self._terminate_instances, self._expire_lease,
                                 self._delete_queues, self._delete_job_key)))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="nipype-s3-end") as pool:
            list(pool.map(step, (self._write_cost_report, self._abort_uploads)))
        errors.sort(key=lambda exc: not isinstance(exc, EC2Error))
        if self._senders is not None:
            # ...and those being sent are waited for only once the instances are ended:
            # a send stuck in retries must not keep them running (and billed)
            self._senders.shutdown(wait=True)
            self._senders = None  # the next run (the same plugin object) makes its own
        if errors and isinstance(errors[0], EC2Error):
            logger.error("EC2Plugin: instances of run %s may still run: %s", self.run_id,
                         errors[0])

    def _terminate_instances(self) -> None:
        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if fleets:
            ids = fleets[0].pool.terminate_all()  # by run tag: every fleet's instances
            now = time.time()
            for fleet in fleets[1:]:
                for iid in ids:
                    if iid in fleet.pool.launched:
                        fleet.pool.launched[iid]["terminated"] = now

    def _expire_lease(self) -> None:
        if not self._leased:  # the run stopped before its lease was written: nothing to end
            return
        body = seal(self._job_key, "lease", {"run_id": self.run_id, "expires": 0,
                                             "finished": time.time()})
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.lease_key, Body=body)

    def _delete_queues(self) -> None:
        urls = [f.queue_url for f in (getattr(self, "_fleets", None) or {}).values()]
        urls.append(getattr(self, "events_queue", None))
        for url in urls:
            if url:
                self.sqs.delete_queue(QueueUrl=url)

    def _delete_job_key(self) -> None:
        if self.run_id and getattr(self, "ssm", None) is not None:
            try:
                self.ssm.delete_parameter(Name=job_key_parameter(self.run_id))
            except botocore.exceptions.ClientError:
                pass

    def _abort_uploads(self) -> None:
        """Abort the multipart uploads left below the run's prefix (an agent killed in
        the middle of storing a large file leaves its parts, billed as storage)."""
        if not self._leased:
            return
        aborted = abort_incomplete_uploads(self.s3, self.layout.bucket,
                                           self.layout.run_prefix)
        if aborted:
            logger.info("EC2Plugin: aborted %d incomplete upload(s) below s3://%s/%s",
                        len(aborted), self.layout.bucket, self.layout.run_prefix)

    def _write_cost_report(self) -> None:
        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if not fleets:
            return
        end = time.time()
        instances = []
        total_cost = 0.0
        billed = 0.0
        launched = {}
        for fleet in fleets:
            launched.update(fleet.pool.launched)
        ran = 0.0
        for iid, info in sorted(launched.items()):
            seconds = max(0.0, info.get("terminated", end) - info["launched"])
            cost = estimate_cost(info.get("type") or self.settings.instance_type, seconds,
                                 spot=info.get("spot", False))
            ran += seconds
            billed += billed_seconds(seconds)  # as AWS bills: at least 60 s an instance
            total_cost += cost or 0.0
            instances.append({"instance_id": iid, "type": info.get("type"),
                              "spot": info.get("spot", False), "seconds": round(seconds, 1),
                              "billed_seconds": round(billed_seconds(seconds), 1),
                              "usd_estimate": cost})
        report = {
            "run_id": self.run_id, "started": self.started, "finished": end,
            "wall_seconds": round(end - self.started, 1), "instances": instances,
            "instance_seconds": round(ran, 1), "billed_seconds": round(billed, 1),
            "busy_seconds": round(self._busy_seconds, 1),
            "usd_estimate": round(total_cost, 4), "peak_instances": self.peak,
            "jobs_remote": self.stats["remote_done"], "jobs_local": self.stats["local"],
            "bytes_staged": self.store.bytes_up, "bytes_fetched": self.store.bytes_down,
            "dispatch": dispatch_summary(self.timings),
            "note": "estimate from on-demand list prices (us-east-1), per-second billing "
                    "with a 60 s minimum; not a bill",
        }
        self.cost_report = report
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.cost_key,
                           Body=json.dumps(report, indent=1).encode(),
                           ContentType="application/json")
        logger.info("EC2Plugin: run %s cost: %d instances, %.0f instance-s billed (60 s minimum "
                    "each), %.0f s busy, "
                    "~$%.4f, %d B staged, %d B fetched (s3://%s/%s)", self.run_id,
                    len(instances), billed, self._busy_seconds, total_cost,
                    self.store.bytes_up, self.store.bytes_down, self.layout.bucket,
                    self.layout.cost_key)

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
                    "and EC2Plugin does not send credentials to instances. Remove "
                    "plugin_args {'local': False} (the node then runs here), or leave "
                    f"{keys[0]} unset so that the instances' role is used.")
            return bool(args["local"])
        why = self._kind_runs_here(node)
        if why == "credentials":
            logger.info("EC2Plugin: %s runs on the controller: its credentials (%s) do not "
                        "leave this machine", node.fullname, keys[0])
            return True
        if isinstance(node, MapNode):
            return True
        if why == "__main__":
            logger.warning(
                "EC2Plugin: %s runs on the controller: its interface %s is defined in the "
                "script that runs the workflow (__main__), which an instance cannot import. "
                "Move it into a module of its own (and install that on the instances with "
                "plugin_args 'requirements' or 'setup_commands') to run it there.",
                node.fullname, type(node.interface).__name__)
            return True
        if _cached_always_run(node):
            logger.info("EC2Plugin: %s runs on the controller: its result for these inputs "
                        "is here, and it runs again only to check its source or "
                        "destination", node.fullname)
            return True
        return why is not None

    def _submit_job(self, node, updatehash=False):
        taskid = self._next_taskid
        self._next_taskid += 1
        node_dir = node.output_dir()
        self._pending[taskid] = node_dir
        self.stats["submitted"] += 1
        if self._runs_locally(node):
            job = _Job(taskid, f"local-{taskid}", node, node_dir, time.time(), 1, 0.0,
                       remote=False, done=True)
            self._jobs[taskid] = job
            self.stats["local"] += 1
            logger.info("EC2Plugin: running %s on the controller", node.fullname)
            run_node(node, updatehash=updatehash)
            scrub_tree(node_dir, secret_values())
            return taskid
        if self._fatal is not None:  # no instance can run it: fail it as a node would
            job = _Job(taskid, f"unsent-{taskid}", node, node_dir, time.time(), 1, 0.0)
            self._jobs[taskid] = job
            self._fail_unrunnable(job)
            return taskid
        try:
            job = self._send(taskid, node, node_dir, updatehash)
        except botocore.exceptions.ClientError as exc:
            raise translate(exc, bucket=self.layout.bucket, key=self.layout.run_prefix,
                            action="submit a job to") from exc
        self._jobs[taskid] = job
        self._by_job_id[job.job_id] = job
        return taskid

    def _send(self, taskid, node, node_dir, updatehash) -> _Job:
        """Prepare a node's job here (nipype's objects stay in this thread), and send it in
        the background: storing its inputs and writing its pickle and spec are requests
        that would otherwise queue one job behind another."""
        node._get_inputs()
        node._get_hashval()  # with the controller's paths: the agent keeps this hash
        inputs = _input_paths(node)
        targets = _output_targets(node)
        job_id = f"{taskid:05d}-{_slug(node.fullname)}"
        if os.path.isdir(node_dir):
            shutil.rmtree(node_dir)  # nipype empties a node's folder before running it
        raw = gzip.compress(pickle.dumps(dict(node=node, updatehash=updatehash),
                                         protocol=4), compresslevel=FAST_GZIP_LEVEL, mtime=0)
        n_procs = max(1, int(getattr(node, "n_procs", 1) or 1))
        mem_gb = float(getattr(node, "mem_gb", 0) or 0)
        node_args = getattr(node, "plugin_args", None) or {}
        instance_type = node_args.get("instance_type") if isinstance(node_args, dict) \
            else None
        try:
            fleet = self._fleet(instance_type or self.settings.instance_type)
        except ConfigurationError as exc:
            raise ConfigurationError(f"Node {node.fullname}: {exc}") from exc
        spec = {
            "version": 1, "run_id": self.run_id, "job_id": job_id, "node": node.fullname,
            "node_pickle": self.layout.pickle_key(job_id),
            "node_sha256": hashlib.sha256(raw).hexdigest(),
            "prefixes": sorted({node.base_dir} | set(inputs) | set(targets)),
            # absolute paths it is told to write (out_file="/data/derivs/brain.nii.gz")
            "targets": targets,
            # folders it may write into (what it writes there comes back), made on the
            # instance even when empty (a new subjects_dir holds no file to stage)
            "folders": [p for p in inputs if os.path.isdir(p)],
            "n_procs": n_procs, "mem_gb": mem_gb,
        }
        if self._senders is None:
            self._senders = ThreadPoolExecutor(max_workers=_SENDERS,
                                               thread_name_prefix="nipype-s3-send")
        sending = self._senders.submit(self._deliver, node.fullname, inputs, raw, spec,
                                       fleet.queue_url)
        return _Job(taskid, job_id, node, node_dir, time.time(), n_procs, mem_gb,
                    instance_type=fleet.instance_type, sending=sending,
                    writable=tuple(spec["folders"]) + tuple(targets))

    def _deliver(self, name, inputs, raw, spec, queue_url) -> None:
        # a file input that is a symbolic link arrives as a link (os.path.islink holds
        # there as here), to its target, which is staged at its own path
        links = [p for p in inputs if os.path.islink(p) and os.path.isfile(p)]
        plain = [p for p in inputs if p not in links]
        entries = self.store.put(plain + sorted({os.path.realpath(p) for p in links}))
        entries += [_link_entry(p) for p in links]
        spec = dict(spec, manifest=[e.to_json() for e in entries])
        spec_bytes = json.dumps(spec, sort_keys=True).encode()
        job_id = spec["job_id"]
        self.s3.put_object(Bucket=self.layout.bucket, Key=spec["node_pickle"], Body=raw)
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.spec_key(job_id),
                           Body=spec_bytes, ContentType="application/json")
        body = make_message(self.layout, job_id, spec_bytes, self._job_key)
        self._messages[job_id] = (queue_url, body)  # to send it again, if it must be
        self.sqs.send_message(QueueUrl=queue_url, MessageBody=body)
        logger.info("EC2Plugin: submitted %s as job %s (%d input files)", name, job_id,
                    len(entries))

    def _check_sent(self, job: _Job) -> None:
        """Once ``job`` has been sent, or failed to be: a failure ends the run (with what
        went wrong as its error) and fails the jobs not done yet."""
        sending = job.sending
        if sending is None or not sending.done():
            return
        job.sending = None
        if sending.cancelled() or sending.exception() is None:
            return
        exc = sending.exception()
        if isinstance(exc, botocore.exceptions.ClientError):
            err = translate(exc, bucket=self.layout.bucket, key=self.layout.run_prefix,
                            action="submit a job to")
            err.__cause__ = exc
        else:
            err = exc
        if self._fatal is None:
            self._fatal = err
            logger.error("EC2Plugin: job %s (%s) could not be sent: %s", job.job_id,
                         job.node.fullname, err)
        self._fail_outstanding("its job could not be sent")

    def _get_result(self, taskid):
        """nipype's, then, for a node that failed, its own result file put back where
        MultiProc leaves it (``result_<node>.pklz``, with the outputs and runtime it has;
        nipype's batch plugins leave only ``crashstore.pklz``)."""
        out = super()._get_result(taskid)
        job = self._jobs.get(taskid)
        if out and out.get("traceback") and job is not None:
            kept = out.get("result")
            crash = os.path.join(job.node_dir, "crashstore.pklz")
            if kept is not None and not isinstance(kept, dict) and os.path.exists(crash):
                savepkl(os.path.join(job.node_dir, f"result_{job.node.name}.pklz"), kept)
                os.remove(crash)
        return out

    # -- polling ------------------------------------------------------------------------
    def _is_pending(self, taskid):
        job = self._jobs[taskid]
        if job.done:
            return False
        self._check_sent(job)
        self._poll()
        return not job.done

    def _poll_interval(self) -> float:
        """Seconds between looks at the events queue: quick while few jobs are out (a
        short node's result is seen at once), at most 1 s (half of nipype's poll
        interval) when many are."""
        if len(self._outstanding()) <= _FEW_JOBS:
            return _QUICK_POLL
        return max(_QUICK_POLL, min(1.0, getattr(self, "_user_poll", 1.0) / 2))

    def _poll(self) -> None:
        now = time.monotonic()
        if now - self._last_poll < self._poll_interval():
            return
        self._last_poll = now
        self.stats["polls"] += 1
        self._drain_events()
        if now - self._last_scan >= self.settings.done_scan_interval:
            self._last_scan = now
            self._scan_done()
        if now - self._last_scale >= self.settings.scale_interval:
            self._last_scale = now
            self._scale()

    def _outstanding(self) -> list[_Job]:
        return [j for j in self._by_job_id.values() if not j.done]

    def _scale(self) -> None:
        waiting = self._outstanding()
        if not waiting:
            return
        found = {t: f.pool.live() for t, f in self._fleets.items()}
        live = {t: len(v) for t, v in found.items()}
        if self._check_boots() or self._check_stall(waiting, found) or \
                self._check_cost(waiting):
            return
        total = sum(live.values())
        self.peak = max(self.peak, total)
        for itype, fleet in self._fleets.items():
            cpus = sum(j.n_procs for j in waiting if j.instance_type == itype)
            if not cpus:
                continue
            wanted = self._wanted(fleet, [j for j in waiting if j.instance_type == itype],
                                  live[itype])
            room = int(self.settings.max_instances) - total
            missing = min(wanted - live[itype], room, self._launches_left(),
                          self._affordable(itype))
            if missing <= 0 and total == 0 and self._affordable(itype) <= 0:
                self._stop_run(EC2Error(self._cost_message(waiting, launching=itype)),
                               "the run's cost cap (max_cost_usd) allows no instance")
                return
            if missing <= 0:
                if total == 0 and self._launches_left() <= 0:
                    self._stop_run(InstanceLaunchError(
                        f"Run {self.run_id} launched {self._launches()} instances "
                        f"(max_launches={self._launch_limit()}) and still has "
                        f"{len(waiting)} job(s) waiting: instances keep ending without "
                        "finishing them. See the agents' logs below "
                        f"s3://{self.layout.bucket}/{self.layout.run_prefix}jobs/, or raise "
                        "plugin_args['max_launches'] if the workflow really needs more."),
                        "the run reached its launch limit")
                    return
                continue
            try:
                total += len(fleet.pool.launch(missing))
            except InstanceLaunchError as exc:
                self._stop_run(exc, "no instance could be launched")
                return

    def _boot_estimate(self) -> float:
        """Seconds from launch to a working agent: the median seen in this run, or a
        typical AWS boot before any instance has booted."""
        if self._boot_seconds:
            return max(1.0, statistics.median(self._boot_seconds))
        return _TYPICAL_BOOT

    def _runtime_estimate(self) -> float | None:
        """Seconds a node of this run takes: the median of those finished, or, when the
        jobs running now have already run longer, the longest of those; ``None`` before
        anything is known."""
        done = [t["node_finished"] - t["node_started"] for t in self.timings
                if t.get("node_finished") is not None and t.get("node_started") is not None]
        now = time.time()
        running = [now - j.started for j in self._outstanding() if j.started is not None]
        known = [statistics.median(done)] if done else []
        if running:
            known.append(max(running))
        return max(known) if known else None

    def _wanted(self, fleet: _Fleet, waiting: list[_Job], live: int) -> int:
        """How many instances ``fleet`` should have for ``waiting`` (its jobs not done).

        At most one per ``vcpus`` of queued CPUs, as before; but an instance beyond the
        first only while the queued work is expected to outlast a boot: instances of
        the run's first seconds are billed a minute each whether they run a node or not
        (0.1 s nodes made a run launch every instance it could, each billed its minute).
        Until the run has seen a node's runtime, one instance.
        """
        cpus = sum(j.n_procs for j in waiting)
        most = max(1, math.ceil(cpus / fleet.vcpus))
        runtime = self._runtime_estimate()
        if runtime is None:
            return 1
        queued = sum(j.n_procs for j in waiting if j.started is None)
        work = queued * runtime  # CPU-seconds not yet begun
        worth = int(work // (fleet.vcpus * self._boot_estimate()))
        return max(1, min(most, max(live, worth)))

    def _cost_so_far(self) -> float:
        """The run's estimated cost now: each instance at least its minute."""
        now = time.time()
        total = 0.0
        for fleet in self._fleets.values():
            for info in fleet.pool.launched.values():
                seconds = info.get("terminated", now) - info["launched"]
                total += estimate_cost(info.get("type") or fleet.instance_type, seconds,
                                       spot=info.get("spot", False)) or 0.0
        return total

    def _affordable(self, instance_type: str) -> int:
        """How many more instances of ``instance_type`` fit under ``max_cost_usd``, each
        counted at its minimum (a minute, on-demand)."""
        cap = self.settings.max_cost_usd
        if cap is None:
            return 1 << 30
        each = estimate_cost(instance_type, 60.0) or 0.0
        left = float(cap) - self._cost_so_far()
        return int(left // each) if each > 0 else 1 << 30

    def _cost_message(self, waiting: list[_Job], launching: str | None = None) -> str:
        cap = float(self.settings.max_cost_usd)
        names = sorted(getattr(j.node, "itername", j.node.fullname) for j in waiting)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                        else "")
        what = (f"launching a {launching} (at least ${estimate_cost(launching, 60.0):.4f}) "
                f"would take the run's estimate past max_cost_usd=${cap:g}" if launching
                else f"the run's estimated cost (${self._cost_so_far():.4f}) reached "
                     f"max_cost_usd=${cap:g}")
        return (f"Run {self.run_id} stopped: {what}. {len(names)} node(s) not run: {shown}. "
                "Every instance of the run is terminated. Raise max_cost_usd, or run "
                "fewer or smaller nodes.")

    def _check_cost(self, waiting: list[_Job]) -> bool:
        """Stop the run once its estimated cost reaches ``max_cost_usd``."""
        cap = self.settings.max_cost_usd
        if cap is None or self._cost_so_far() < float(cap):
            return False
        self._stop_run(EC2Error(self._cost_message(waiting)),
                       "the run reached its cost cap (max_cost_usd)")
        return True

    def _stop_run(self, error: BaseException, why: str) -> None:
        self._fatal = error
        logger.error("EC2Plugin: %s", error)
        self._fail_outstanding(why)

    def _launch_limit(self) -> int:
        s = self.settings
        return int(s.max_launches) if s.max_launches else 10 * int(s.max_instances)

    def _launches(self) -> int:
        return sum(len(f.pool.launched) for f in self._fleets.values())

    def _launches_left(self) -> int:
        return self._launch_limit() - self._launches()

    def _check_stall(self, waiting: list[_Job], found: dict) -> bool:
        """End the run when agents are up but no job of it runs, starts or ends for
        ``stall_timeout``: no agent can take its jobs (each refused them), and waiting
        longer only pays for instances."""
        if any(j.started is not None for j in waiting):
            return False  # a job runs: the others wait their turn
        live_up = [i["InstanceId"] for v in found.values() for i in v
                   if i["InstanceId"] in self._booted]
        if not live_up:
            return False  # booting: boot_timeout and max_boot_failures govern that
        queued = [j for j in waiting if j.sending is None or j.sending.done()]
        if not queued:
            return False
        since = max(self._progress, min(j.submitted for j in queued))
        idle = time.time() - since
        if idle < float(self.settings.stall_timeout):
            return False
        self._stop_run(EC2Error(
            f"{len(queued)} job(s) of run {self.run_id} (first: {queued[0].node.fullname}, "
            f"job {queued[0].job_id}) were never started although agents were up on "
            f"{', '.join(live_up[:3])} for {idle:.0f} s (stall_timeout): the agents refuse "
            "or cannot read them. Check the agents' log (/var/log/nipype-s3-agent.log) and "
            "that the instance profile may read the run's prefix and signing key."),
            "no agent started it")
        return True

    def _check_boots(self) -> bool:
        """Stop relaunching when instances keep ending before their agent ever started.

        A bootstrap that cannot work (no route to PyPI, a broken AMI, a profile without
        SSM or SQS access) would otherwise cost a launch after launch, forever.
        """
        self._end_hung_boots()
        dead = [iid for f in self._fleets.values() for iid in f.pool.ended
                if iid not in self._booted]
        if len(dead) < self.settings.max_boot_failures:
            return False
        self._fatal = InstanceLaunchError(
            f"{len(dead)} instances of run {self.run_id} ended before their agent started "
            f"({', '.join(dead[:5])}; an instance silent for boot_timeout="
            f"{self.settings.boot_timeout:.0f} s is ended): the bootstrap fails or hangs. "
            "Check an instance's console "
            "output (aws ec2 get-console-output --instance-id ID), that its subnet reaches "
            "PyPI (or use an AMI with nipype_s3 installed), and that the instance profile "
            "allows S3, SQS and SSM.")
        logger.error("EC2Plugin: %s", self._fatal)
        self._fail_outstanding("its instances ended before their agent started")
        return True

    def _end_hung_boots(self) -> None:
        """Terminate instances whose agent has not said a word ``boot_timeout`` after
        launch: billed, and no use. They then count as boot failures."""
        now = time.time()
        for fleet in self._fleets.values():
            pool = fleet.pool
            hung = [iid for iid, info in pool.launched.items()
                    if iid not in self._booted and "ended" not in info
                    and "terminated" not in info
                    and now - info.get("launched", now) > self.settings.boot_timeout]
            if not hung:
                continue
            logger.warning(
                "EC2Plugin: no agent started on %s within boot_timeout=%.0f s of launch; "
                "terminating (see the console output: aws ec2 get-console-output "
                "--instance-id %s)", ", ".join(hung), self.settings.boot_timeout, hung[0])
            try:
                pool.ec2.terminate_instances(InstanceIds=hung)
            except botocore.exceptions.ClientError as exc:
                logger.error("EC2Plugin: could not terminate %s: %s", ", ".join(hung), exc)
                continue
            for iid in hung:
                pool.launched[iid]["terminated"] = now
                pool.ended.append(iid)

    def _fail_outstanding(self, why: str) -> None:
        """The run cannot go on: every job not done yet fails (those not sent yet are not
        sent)."""
        for job in self._outstanding():
            if job.sending is not None:
                job.sending.cancel()
            self._fail_unrunnable(job, why)

    def _fail_unrunnable(self, job: _Job, why: str | None = None) -> None:
        """Give a job that can never run a crash result naming the run's failure."""
        why = why or f"run {self.run_id} stopped before it could run (the error above)"
        write_failure_result(job.node, [
            f"{type(self._fatal).__name__}: {self._fatal}\n",
            f"[nipype_s3] node {job.node.fullname} was not run: {why}.\n"])
        job.done = True

    def _drain_events(self) -> None:
        """Read the events queue: agents that booted, jobs started and finished.

        An event counts only once its signature verifies with the run's key (an agent
        wrote it); any other message is logged and deleted. A finished job is then
        collected from its report, which is verified again on its own.
        """
        for _ in range(10):
            resp = self.sqs.receive_message(QueueUrl=self.events_queue,
                                            MaxNumberOfMessages=10, WaitTimeSeconds=0)
            messages = resp.get("Messages", [])
            if not messages:
                return
            finished = []
            for msg in messages:
                try:
                    event = unseal(self._job_key, msg.get("Body") or "", "event",
                                   limit=MAX_MESSAGE_BYTES)
                    if event.get("run_id") != self.run_id:
                        raise MessageRejected(f"an event of run {event.get('run_id')!r}")
                except MessageRejected as exc:
                    logger.warning("EC2Plugin: ignored a message on the events queue: %s",
                                   exc)
                    continue
                status, iid = event.get("status"), event.get("instance_id")
                if status == "agent-up":
                    # once per instance of this run (a replayed event changes nothing)
                    if isinstance(iid, str) and iid not in self._booted and any(
                            iid in f.pool.launched for f in self._fleets.values()):
                        self._booted.add(iid)
                        self._progress = time.time()
                        launched = next((f.pool.launched[iid] for f in self._fleets.values()
                                         if iid in f.pool.launched), None)
                        if launched is not None:
                            self._boot_seconds.append(time.time() - launched["launched"])
                    continue
                job_id = event.get("job_id")
                job = self._by_job_id.get(job_id) if isinstance(job_id, str) else None
                if job is None or job.done:
                    continue
                self._progress = time.time()
                if status == "started":
                    job.started = job.started or time.time()
                elif job not in finished:
                    job.reported = True
                    finished.append(job)
            self._collect(finished)
            self.sqs.delete_message_batch(QueueUrl=self.events_queue, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                for i, m in enumerate(messages)])
            if len(messages) < 10:
                return

    def _scan_done(self) -> None:
        if not self._outstanding():
            return
        prefix = self.layout.key("done") + "/"
        finished = []
        for info in iter_objects(self.s3, self.layout.bucket, prefix):
            job = self._by_job_id.get(info.key[len(prefix):-len(".json")])
            if job is not None and not job.done:
                finished.append(job)
        self._collect(finished)

    def _collect(self, jobs: list[_Job]) -> None:
        """Bring finished jobs' results into the controller's node directories.

        Each job costs a few requests, one after the other (the report, then its files,
        the result pickle last): several jobs are fetched at once, so jobs that end
        together are not seen one request-latency after another. Their bookkeeping is
        done here, in the thread running the workflow.

        A job's fetch that fails is that job's alone: an AWS error that may pass leaves
        it to the next poll; a report that does not verify is deleted and waited past
        (its agent writes the real one); anything else becomes the node's crash file.
        Nothing raised here reaches nipype's loop, which would charge it to whichever
        node it polled.
        """
        if not jobs:
            return
        workers = min(_COLLECTORS, len(jobs))
        if workers == 1:
            outcomes = [(jobs[0], *self._fetch_guarded(jobs[0]))]
        else:
            with ThreadPoolExecutor(max_workers=workers,
                                    thread_name_prefix="nipype-s3-collect") as pool:
                futures = [(job, pool.submit(self._fetch_guarded, job)) for job in jobs]
            outcomes = [(job, *future.result()) for job, future in futures]
        for job, collected, error in outcomes:
            if collected is not None:
                self._collected(job, collected)
            elif error is not None:
                self._collect_failed(job, error)

    def _fetch_guarded(self, job: _Job) -> tuple[float | None, BaseException | None]:
        """``(collected, None)``, ``(None, None)`` to try again later, or ``(None,
        error)`` for a job whose results cannot be had."""
        try:
            return self._fetch(job), None
        except MessageRejected as exc:
            logger.error("EC2Plugin: job %s: refused its report (%s); deleted it, waiting "
                         "for its agent's", job.job_id, exc)
            try:
                self.s3.delete_object(Bucket=self.layout.bucket,
                                      Key=self.layout.done_key(job.job_id))
            except _AWS_ERRORS as err:
                logger.warning("EC2Plugin: could not delete it: %s", err)
            if job.reported:
                # its agent said it finished: the genuine report was replaced, and
                # nobody will write it again; the job runs once more (or, too often
                # replaced, fails)
                job.reported, job.started = False, None
                job.resent += 1
                if job.resent > int(self.settings.max_attempts):
                    return None, MessageRejected(
                        f"the report of job {job.job_id} was replaced by one that does not "
                        f"verify {job.resent} times; someone with write access to "
                        f"s3://{self.layout.bucket}/{self.layout.run_prefix} is tampering "
                        "with the run")
                queue, body = self._messages[job.job_id]
                self.sqs.send_message(QueueUrl=queue, MessageBody=body)
                logger.warning("EC2Plugin: job %s sent again", job.job_id)
            return None, None
        except _AWS_ERRORS as exc:
            if transient(exc):
                logger.warning("EC2Plugin: job %s: fetching its results failed (%s); "
                               "trying again", job.job_id, exc)
                return None, None
            return None, exc
        except Exception as exc:  # noqa: BLE001 - this job's failure, not the run's
            return None, exc

    def _collect_failed(self, job: _Job, error: BaseException) -> None:
        """The node's crash file says why its results could not be brought back."""
        logger.error("EC2Plugin: job %s (%s): its results could not be brought back: %s",
                     job.job_id, job.node.fullname, error)
        write_failure_result(job.node, [
            f"{type(error).__name__}: {error}\n",
            f"[nipype_s3] node {job.node.fullname} ran as job {job.job_id}, but its results "
            f"could not be brought back from s3://{self.layout.bucket}/"
            f"{self.layout.done_key(job.job_id)} (see the error above).\n"])
        job.done = True
        self.stats["remote_done"] += 1

    def _collected(self, job: _Job, collected: float) -> None:
        report = job.report
        self._busy_seconds += max(0.0, float(report.get("finished", 0))
                                  - float(report.get("started", 0)))
        self.timings.append({"job_id": job.job_id, "submitted": job.submitted,
                             "received": report.get("received"),
                             "node_started": report.get("node_started"),
                             "node_finished": report.get("node_finished"),
                             "reported": report.get("reported"), "collected": collected})
        status = report.get("status")
        if status != "ok":  # the node's result file, written in the workflow's thread
            self._annotate_failure(job, report)
        job.done = True
        self.stats["remote_done"] += 1
        logger.info("EC2Plugin: job %s (%s) %s on %s (attempt %s)", job.job_id,
                    job.node.fullname, "finished" if status == "ok" else f"FAILED ({status})",
                    report.get("instance_id"), report.get("attempt"))

    def _fetch(self, job: _Job) -> float:
        """A finished job's report and node directory, into the controller's; returns
        when it had them (seconds since the epoch)."""
        data = read_bounded(self.s3, self.layout.bucket, self.layout.done_key(job.job_id),
                            MAX_REPORT_BYTES, what="done report")
        report = unseal(self._job_key, data, "report")
        if report.get("job_id") != job.job_id or report.get("run_id") != self.run_id:
            raise MessageRejected(f"a signed report of job {report.get('job_id')!r} of run "
                                  f"{report.get('run_id')!r} where job {job.job_id!r} "
                                  "belongs")
        os.makedirs(job.node_dir, exist_ok=True)
        outputs = [ManifestEntry.from_json(e) for e in report.get("outputs") or []]
        links = [e for e in outputs if e.link is not None]
        outputs = [e for e in outputs if e.link is None]
        worker_root = report.get("worker_root")
        pathmap = PathMap(worker_root if isinstance(worker_root, str) and
                          os.path.isabs(worker_root) else "/")

        def dest(rel: str) -> str:  # checked as each is written: after the links before it
            return confine(job.node_dir, rel, what=f"output of job {job.job_id}")
        self._write_back(job, report, pathmap)  # before the result pickle, too
        if links:  # before the result pickle, which says the node is done
            self.store.get(links, lambda rel: confine(
                job.node_dir, rel, what=f"link of job {job.job_id}", link=True),
                move_link=pathmap.to_controller)
        if outputs:
            meta = [e for e in outputs if _is_meta(e.path)]
            data = [e for e in outputs if not _is_meta(e.path)]
            result = [e for e in meta if os.path.basename(e.path).startswith("result_")]
            meta = [e for e in meta if e not in result]
            for group in (data, meta, result):  # data first, the result pickle last
                if not group:
                    continue
                self.store.get(group, dest)
                for entry in group:
                    path = dest(entry.path)
                    if entry.path.endswith((".pklz", ".pkl")):
                        rewrite_pickle_file(path, pathmap.to_controller)
                    elif entry.path.endswith((".json", ".rst", ".txt")) and \
                            os.path.basename(entry.path).startswith(("_0x", "report", "_")):
                        rewrite_text_file(path, pathmap.text_to_controller)
                    os.utime(path, (entry.mtime, entry.mtime))
        job.report = report
        return time.time()

    def _write_back(self, job: _Job, report: dict, pathmap: PathMap) -> None:
        """What the node wrote into the folders it was given (a FreeSurfer
        ``subjects_dir``, say) or to absolute paths it was told to write, to the same
        paths here, as ``Linear`` leaves them.

        Only paths within the folders it was given, and the paths it was told to write,
        are written: a report naming anything else is refused with a warning. Nodes on
        different instances do not see each other's writes: when a file here is no
        longer what the job was given (another node wrote it meanwhile), this job's
        version replaces it, with a warning.
        """
        here, was = [], {}
        for data in report.get("written") or []:
            e = ManifestEntry.from_json(data)
            entry = ManifestEntry(pathmap.to_controller(e.path), e.sha256, e.size, e.mtime,
                                  e.link)
            here.append(entry)
            was[entry.path] = data.get("was") if _is_was(data.get("was")) else None
        allowed = [e for e in here if self._may_write(job, e)]
        if len(allowed) < len(here):
            logger.warning("EC2Plugin: job %s reported %d file(s) outside what it may write; "
                           "not written: %s", job.job_id, len(here) - len(allowed),
                           ", ".join(e.path for e in here if e not in allowed)[:500])
        if not allowed:
            return
        with self._write_back_lock:  # jobs are fetched in parallel: one at a time here
            clashes = [e.path for e in allowed if e.link is None and
                       _changed_meanwhile(e, was[e.path])]
            if clashes:
                logger.warning(
                    "EC2Plugin: %s wrote %s, which another node changed while it ran "
                    "(nodes on different instances do not see each other's writes); this "
                    "node's version is kept. Have each node write files of its own.",
                    job.node.fullname,
                    ", ".join(clashes[:5]) + (" ..." if len(clashes) > 5 else ""))
            what = f"path job {job.job_id} wrote"
            self.store.get([e for e in allowed if e.link is not None], lambda path: (
                confine_absolute(job.writable, path, what=what, link=True)),
                move_link=pathmap.to_controller)
            self.store.get([e for e in allowed if e.link is None], lambda path: (
                confine_absolute(job.writable, path, what=what)))
        logger.info("EC2Plugin: %s wrote %d file(s) into folders it was given or paths it "
                    "was told to write; they are in place here too", job.node.fullname,
                    len(allowed))

    @staticmethod
    def _may_write(job: _Job, entry: ManifestEntry) -> bool:
        try:
            confine_absolute(job.writable, entry.path, link=entry.link is not None)
            return True
        except UnsafePath:
            return False

    def _annotate_failure(self, job: _Job, report: dict) -> None:
        """Make the node's result file carry the remote traceback, instance and log."""
        log_uri = f"s3://{self.layout.bucket}/{report['log_key']}" if report.get("log_key") \
            else "(no log)"
        where = (f"\n[nipype_s3] node {job.node.fullname} ran as job {job.job_id} on instance "
                 f"{report.get('instance_id')} (attempt {report.get('attempt')}); agent log: "
                 f"{log_uri}\n")
        if report.get("error"):
            where += f"[nipype_s3] {report['error']}\n"
        root = report.get("worker_root")
        here = PathMap(root if isinstance(root, str) and os.path.isabs(root) else "/")
        tail = str(report.get("log_tail") or "")
        if tail:
            where += "[nipype_s3] log tail:\n" + here.text_to_controller(tail)
        result_file = os.path.join(job.node_dir, f"result_{job.node.name}.pklz")
        data = None
        if os.path.exists(result_file):
            try:
                data = loadpkl(result_file)
            except Exception:
                data = None
        if isinstance(data, dict) and data.get("traceback"):
            # the instance's paths in the traceback become this machine's, as the
            # workflow's final error and the crash file show them
            data["traceback"] = [here.text_to_controller(str(line))
                                 for line in data["traceback"]] + [where]
            savepkl(result_file, data)
        else:
            lines = [here.text_to_controller(str(line))
                     for line in report.get("traceback") or []] or [
                f"RemoteNodeError: job {job.job_id} did not finish ({report.get('status')}).\n"]
            write_failure_result(job.node, lines + [where])


def _link_entry(path: str) -> ManifestEntry:
    """The manifest entry of the symbolic link ``path``: its own target when that is
    the file, else (a chain of links) the file it ends at."""
    target = os.readlink(path)
    first = target if os.path.isabs(target) else os.path.join(os.path.dirname(path), target)
    if os.path.islink(first):
        target = os.path.realpath(path)
    entry = ManifestEntry.for_link(path)
    return ManifestEntry(entry.path, "", 0, entry.mtime, target)


def _is_was(value) -> bool:
    """A report's ``was`` (size and time a file had when staged) of the expected shape."""
    return isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _changed_meanwhile(entry: ManifestEntry, was) -> bool:
    """Whether the file at ``entry.path`` differs from what the job was given there
    (``was``: its size and time, or ``None`` for a file the job made) and from what the
    job wrote: then another node wrote it while the job ran."""
    try:
        st = os.stat(entry.path)
    except OSError:
        return False  # nothing there: no one else wrote it
    if was is not None and st.st_size == was[0] and abs(st.st_mtime - was[1]) <= 1e-3:
        return False
    return not (st.st_size == entry.size and sha256_file(entry.path) == entry.sha256)


def _is_meta(relpath: str) -> bool:
    name = os.path.basename(relpath)
    return name.endswith((".pklz", ".pkl")) or name.startswith("_0x") or \
        relpath.startswith("_report")


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


def _zip_package(pkg_dir: str) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, names in os.walk(pkg_dir):
            # agents need no test helpers (LocalCloud, local servers)
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "testing"))
            for name in sorted(names):
                if name.endswith((".pyc", ".pyo")):
                    continue
                full = os.path.join(dirpath, name)
                arc = os.path.join("nipype_s3", os.path.relpath(full, pkg_dir))
                info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
                with open(full, "rb") as fobj:
                    zf.writestr(info, fobj.read())
    return buf.getvalue()


def dispatch_summary(timings: list[dict]) -> dict:
    """Median and 95th percentile of the waits around each remote node, in seconds.

    ``to_start``: submitted by the controller → the node starts on an instance (queue,
    agent, worker start-up, input staging). ``to_seen``: the node ends → the controller
    has its result in place (output upload, report, event, collection). ``queued``,
    ``starting``, ``running``, ``storing`` and ``collecting`` split the whole way.
    """
    def stats(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        p95 = values[min(len(values) - 1, max(0, math.ceil(0.95 * len(values)) - 1))]
        return {"median": round(statistics.median(values), 3), "p95": round(p95, 3)}

    def waits(start, end):
        return [t[end] - t[start] for t in timings
                if t.get(start) is not None and t.get(end) is not None]

    return {"jobs": len(timings),
            "to_start": stats(waits("submitted", "node_started")),
            "to_seen": stats(waits("node_finished", "collected")),
            # the parts: waiting for a free slot, starting (worker, inputs, unpickling),
            # the node itself, storing its outputs, the controller noticing and fetching
            "queued": stats(waits("submitted", "received")),
            "starting": stats(waits("received", "node_started")),
            "running": stats(waits("node_started", "node_finished")),
            "storing": stats(waits("node_finished", "reported")),
            "collecting": stats(waits("reported", "collected"))}


def _requirements(extra: list, with_self: bool) -> list[str]:
    """The controller's versions of what the agent needs, pinned."""
    from importlib import metadata

    pins = []
    for dist in ("nipype", "boto3", "botocore", "s3transfer", "nibabel", "numpy", "traits",
                 "tqdm"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:  # pragma: no cover
            pins.append(dist)
    try:  # optional: native transfers (nipype_s3.s3.native) when the controller has them
        pins.append(f"awscrt=={metadata.version('awscrt')}")
    except metadata.PackageNotFoundError:  # pragma: no cover
        pass
    if with_self:
        pins.append(f"nipype_s3=={__version__}")
    return pins + list(extra)

