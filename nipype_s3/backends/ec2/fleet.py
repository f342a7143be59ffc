"""EC2Plugin's instances: one SQS queue and pool per instance type, launched as the
queued work warrants (and the cost cap and launch limit allow), boots watched, stalls
detected, all terminated at the end.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass

import botocore.exceptions

from ...ec2.instances import FLEET_TAG, InstancePool, LaunchSpec
from ...ec2.pricing import instance_shape
from ...ec2.userdata import render_user_data
from ...exceptions import EC2Error, InstanceLaunchError
from ...remote.job import _Job
from ...remote.placement import _slug
from ...remote.staging import _requirements

logger = logging.getLogger("nipype.workflow")


#: what an agent in a user's image needs besides the image's own nipype
_AGENT_NEEDS = ("boto3", "botocore", "s3transfer", "nipype_s3")

#: seconds from launch to a working agent on AWS, until this run has measured one
_TYPICAL_BOOT = 60.0


@dataclass
class _Fleet:
    instance_type: str
    queue_url: str
    pool: InstancePool
    vcpus: int
    mem_gb: float
    image: str | None = None

    @property
    def key(self) -> str:
        return _fleet_key(self.instance_type, self.image)


def _fleet_key(instance_type: str, image: str | None) -> str:
    return f"{instance_type} {image}" if image else instance_type


def _has_gpus(instance_type: str) -> bool:
    """GPU instance families (g4dn, g5, g6e, gr6, p3, p4d, p5, ...)."""
    family = instance_type.split(".")[0]
    return family.startswith("gr") or (family[:1] in ("g", "p") and family[1:2].isdigit())


class FleetMixin:
    """Instances and queues per instance type."""

    def _fleet(self, instance_type: str, image: str | None = None) -> _Fleet:
        """The queue and instances for one instance type and image (made on first use)."""
        fleet = self._fleets.get(_fleet_key(instance_type, image))
        if fleet is not None:
            return fleet
        s = self.settings
        default = instance_type == s.instance_type and image == s.image
        vcpus, mem_gb = self._shape(instance_type)  # a type that does not exist: nothing made
        kind = "jobs" if default else f"jobs-{_slug(instance_type).replace('.', '-')}"
        if image and not default:
            kind += "-" + hashlib.sha256(image.encode()).hexdigest()[:10]
        queue = self._jobs_queue(kind)
        if s.agent_vcpus:
            vcpus = int(s.agent_vcpus)
        if s.agent_mem_gb:
            mem_gb = float(s.agent_mem_gb)
        agent_cfg = self._agent_config(queue, s.agent_vcpus, s.agent_mem_gb)
        requirements = _requirements(s.requirements, self._package_uri is None)
        if image:  # the image has nipype and the node's tools: the agent's own needs (if
            # the image lacks them), and the user's requirements
            requirements = [r for r in _requirements([], self._package_uri is None)
                            if r.split("==")[0] in _AGENT_NEEDS]
        user_data = render_user_data(
            run_id=self.run_id, config_json=agent_cfg.to_json(), region=self.region,
            worker_root=s.worker_root, requirements=requirements,
            package_s3_uri=self._package_uri, package_sha256=self._package_sha256,
            setup_commands=s.setup_commands, image=image,
            image_requirements=list(s.requirements) if image else [],
            gpus=bool(image) and _has_gpus(instance_type))
        pool = InstancePool(self.ec2, self.run_id, LaunchSpec(
            ami=self._ami, instance_type=instance_type, user_data=user_data,
            iam_instance_profile=s.iam_instance_profile, subnet_id=s.subnet_id,
            security_group_ids=list(s.security_group_ids), key_name=s.key_name,
            volume_gb=s.volume_gb, extra_tags=dict(s.tags, **{FLEET_TAG: kind})), spot=s.spot,
            spot_retries=s.spot_retries)
        fleet = _Fleet(instance_type, queue, pool, vcpus, mem_gb, image)
        self._fleets[fleet.key] = fleet
        return fleet

    def _shape(self, instance_type: str) -> tuple[int, float]:
        """(vCPUs, GiB) of ``instance_type``, looked up once a run."""
        if instance_type not in self._shapes:
            self._shapes[instance_type] = instance_shape(instance_type, self.ec2)
        return self._shapes[instance_type]

    @property
    def pool(self) -> InstancePool | None:
        """The default instance type's pool (for inspection)."""
        fleet = (getattr(self, "_fleets", None) or {}).get(
            _fleet_key(self.settings.instance_type, self.settings.image))
        return fleet.pool if fleet is not None else None

    def _launched(self, instance_id: str) -> bool:
        return any(instance_id in fleet.pool.launched for fleet in self._fleets.values())

    def _agent_name(self, instance_id: str) -> str:
        for fleet in self._fleets.values():
            if instance_id in fleet.pool.launched and getattr(fleet, "image", None):
                return f"the agent on {instance_id} (image {fleet.image})"
        return f"the agent on {instance_id}"

    def _agent_up(self, instance_id: str) -> bool:
        for fleet in self._fleets.values():
            launched = fleet.pool.launched.get(instance_id)
            if launched is not None:
                self._boot_seconds.append(time.time() - launched["launched"])
                return True
        return False

    def _end_steps(self) -> list:
        return [self._terminate_instances, self._delete_queues]

    def _terminate_instances(self) -> None:
        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if fleets:
            ids = fleets[0].pool.terminate_all()  # by run tag: every fleet's instances
            now = time.time()
            for fleet in fleets[1:]:
                for iid in ids:
                    if iid in fleet.pool.launched:
                        fleet.pool.launched[iid]["terminated"] = now

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
        for key, fleet in self._fleets.items():
            itype = fleet.instance_type
            mine = [j for j in waiting if (j.fleet or j.instance_type) == key]
            if not mine:
                continue
            wanted = self._wanted(fleet, mine, live[key])
            room = int(self.settings.max_instances) - total
            missing = min(wanted - live[key], room, self._launches_left(),
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
        images = sorted({f.image for f in self._fleets.values() if f.image and any(
            iid in f.pool.ended for iid in dead)})
        in_image = (f" Their agents were to run in {', '.join(images)}: check that it can "
                    f"be pulled and has python3 with nipype (nipype-s3 check-image "
                    f"{images[0]} says which)." if images else "")
        self._fatal = InstanceLaunchError(
            f"{len(dead)} instances of run {self.run_id} ended before their agent started "
            f"({', '.join(dead[:5])}; an instance silent for boot_timeout="
            f"{self.settings.boot_timeout:.0f} s is ended): the bootstrap fails or hangs. "
            "Check an instance's console "
            "output (aws ec2 get-console-output --instance-id ID), that its subnet reaches "
            "PyPI (or use an AMI with nipype_s3 installed), that the shipped package at "
            f"{self._package_uri or 'its S3 key'} was not replaced (the "
            "bootstrap installs it only when its SHA-256 matches), that the AMI has, or can "
            "install, "
            f"Python {sys.version_info[0]}.{sys.version_info[1]} (the controller's: "
            "/var/log/nipype-s3-agent.log on the instance says 'no Python' otherwise), "
            "and that the instance profile allows S3, SQS and SSM." + in_image)
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
