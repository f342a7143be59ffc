"""``plugin_args`` of EC2Plugin."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...remote.settings import AT_LEAST, RemoteSettings


@dataclass
class EC2Settings(RemoteSettings):
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
    image : str
        A container image (Docker) to run the nodes in, e.g. one of nipype's or an ECR
        image with FSL: the instance starts Docker, pulls it (logging in to ECR when it
        is there) and runs the agent inside it, so each node runs where the image's
        tools are. It must hold ``python3`` >= 3.10 with the controller's minor versions
        of Python and nipype (an agent that differs refuses, and the run stops naming
        both); check one with ``nipype-s3 check-image IMAGE``. A node can name its own
        (``node.plugin_args = {"image": ...}``). GPU instance types (g*, p*) give the
        container their GPUs. Default: no image (a virtual environment on the AMI).
    requirements : list of str
        pip requirements the nodes need beyond nipype (``["nitime", "nilearn==0.10.3"]``):
        installed in the agent's environment at boot, or, with ``image``, with the
        image's ``pip`` into a folder beside the agent's code (the image is not changed).
    setup_commands : str
        Shell lines the bootstrap runs (as root) before the agent starts.
    ship_package : bool
        Send this controller's own ``nipype_s3`` code to the agents (default True);
        False: they install ``nipype_s3`` of this version from the package index.
    local_nodes : list of str
        Names of nodes to run on the controller (as ``node.plugin_args = {"local": True}``).
    tags : dict
        More tags for the instances (each also gets ``nipype-s3:run``).
    worker_root : str
        The agents' work folder on the instance (default ``/var/lib/nipype-s3/work``);
        not a system folder.
    subnet_id, security_group_ids, key_name, volume_gb
        Where and how instances are launched (default: the account's default VPC, no
        key pair, the AMI's volume size).
    agent_vcpus, agent_mem_gb
        What an agent packs jobs into (default: the instance type's vCPUs and memory).
    poll_wait, done_scan_interval, scale_interval
        Seconds: an agent's SQS long poll, how often the controller also lists finished
        reports, and how often it decides on launches.
    endpoint_url, profile, creds_path, region
        Where AWS is and which credentials the controller uses (default: boto3's own
        resolution; ``AWS_ENDPOINT_URL`` is honoured).
    max_cost_usd : float
        A cap on the run's estimated cost (on-demand list prices, 60 s minimum per
        instance): no instance is launched that would take the estimate past it, and
        when the estimate reaches it the run stops, naming the nodes not run, with
        nothing left running. Default: no cap.
    """

    instance_type: str = "c6i.large"
    max_instances: int = 4
    ami: str | None = None
    iam_instance_profile: str | None = "nipype-s3-agent"
    spot: bool = False
    spot_retries: int = 2
    subnet_id: str | None = None
    security_group_ids: list = field(default_factory=list)
    key_name: str | None = None
    volume_gb: int | None = None
    setup_commands: str = ""
    max_boot_failures: int = 3
    boot_timeout: float = 900.0
    max_launches: int | None = None

    _PLUGIN = "EC2Plugin"
    _SIZING_HINT = ("EC2Plugin sizes the machines instead: 'instance_type' (e.g. "
                    "'c6i.2xlarge', 8 vCPUs and 16 GiB) and 'max_instances' (how many at "
                    "once)")


#: the least value each numeric plugin argument may take
_AT_LEAST = dict(AT_LEAST, max_instances=1, spot_retries=0, volume_gb=1,
                 max_boot_failures=1, boot_timeout=1, max_launches=1)

EC2Settings._AT_LEAST = _AT_LEAST
