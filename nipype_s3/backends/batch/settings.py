"""``plugin_args`` of BatchPlugin."""

from __future__ import annotations

from dataclasses import dataclass

from ...exceptions import ConfigurationError
from ...remote.settings import AT_LEAST, RemoteSettings


@dataclass
class BatchSettings(RemoteSettings):
    """``plugin_args`` of :class:`BatchPlugin`, with their defaults.

    Parameters
    ----------
    s3_prefix : str
        **Required.** ``s3://bucket/prefix`` for the run's files and the content store.
    job_queue : str
        **Required.** The Batch job queue the agents are submitted to (its compute
        environments own capacity, spot and quotas).
    image : str
        **Required** unless ``job_definition`` is given: the container image the agents
        (and so the nodes) run in. It needs ``python3`` >= 3.10 with nipype at the
        controller's minor versions, and boto3 (``nipype-s3 check-image IMAGE``).
    job_definition : str
        An existing job definition to submit the agents with (name, ``name:revision`` or
        ARN), for accounts where registering is refused. Default: one registered for the
        image and resources, named by their digest (``nipype-s3-<hash>``), reused across
        runs.
    job_role_arn : str
        The IAM role the agents' containers run with (S3, SQS and SSM access below the
        run's prefix: ``nipype-s3 policy agent``).
    max_agents : int
        Agent jobs running or waiting at once (default 4).
    agent_vcpus, agent_mem_gb
        Each agent job's vCPUs and memory (default 2 and 4 GiB); jobs are packed into
        them by their ``n_procs``/``mem_gb``.
    max_boot_failures : int
        Agent jobs that may end before their agent starts (an image that cannot be
        pulled, a role that may not read the run) before the run stops, saying why.
    idle_timeout, max_lifetime, lease_timeout, visibility_timeout, heartbeat,
    max_attempts, poll_wait, worker_root, ship_package, local_nodes, tags,
    done_scan_interval, scale_interval, stall_timeout, endpoint_url, profile,
    creds_path, region
        As for :class:`~nipype_s3.EC2Plugin`.
    """

    job_queue: str = ""
    job_definition: str | None = None
    job_role_arn: str | None = None
    max_agents: int = 4
    max_boot_failures: int = 3
    idle_timeout: float = 60.0

    #: where a job goes, as nipype_s3's core asks it (Batch has no instance types here)
    instance_type = "batch"
    _PLUGIN = "BatchPlugin"
    _SIZING_HINT = ("BatchPlugin sizes its agents instead: 'agent_vcpus' and "
                    "'agent_mem_gb' (each agent job's), and 'max_agents' (how many at once)")
    _AT_LEAST = dict(AT_LEAST, max_agents=1, max_boot_failures=1)
    _ELSEWHERE = {
        "spot": "spot or on-demand is the job queue's compute environment's "
                "(nipype-s3 batch setup --spot)",
        "instance_type": "Batch picks the instances; size the agents with 'agent_vcpus' "
                         "and 'agent_mem_gb'",
        "max_instances": "use 'max_agents' (agent jobs at once); the compute "
                         "environment's maxvCpus caps the instances",
        "iam_instance_profile": "the agents run with the job role: 'job_role_arn' "
                                "(nipype-s3 batch setup makes one)",
        "ami": "Batch picks the instances' AMI; the agents run in 'image'",
        "subnet_id": "the compute environment's subnets are its own (nipype-s3 batch "
                     "setup --subnets)",
        "security_group_ids": "the compute environment's security groups are its own "
                              "(nipype-s3 batch setup --security-groups)",
    }

    def _check(self) -> None:
        if not self.job_queue:
            raise ConfigurationError(
                "BatchPlugin needs plugin_args['job_queue']: the Batch job queue to submit "
                "the agents to (nipype-s3-local on LocalCloud).")
        if not (self.image or self.job_definition):
            raise ConfigurationError(
                "BatchPlugin needs plugin_args['image'] (the container image the nodes run "
                "in, with python3, nipype and boto3) or an existing 'job_definition'.")
        if self.requirements:
            raise ConfigurationError(
                "BatchPlugin installs nothing at start-up: put the nodes' packages "
                f"({', '.join(map(str, self.requirements))}) in the image, and remove "
                "plugin_args['requirements'].")
        if self.max_cost_usd is not None:
            raise ConfigurationError(
                "BatchPlugin does not cap costs (max_cost_usd) yet: Batch's compute "
                "environment caps capacity (its maxvCpus). Remove max_cost_usd.")

    @property
    def vcpus(self) -> int:
        return int(self.agent_vcpus or 2)

    @property
    def mem_gb(self) -> float:
        return float(self.agent_mem_gb or 4.0)
