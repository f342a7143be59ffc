"""The agent's settings: where its run lives and how long to wait for what.

Nothing here is secret: it travels in EC2 user-data, which anyone with API access to
the account can read. Credentials come from the instance role; the job-signing key is
read from SSM Parameter Store at start.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields

from ..ec2.jobs import RunLayout
from ..exceptions import ConfigurationError

__all__ = ["AgentConfig", "DEFAULT_WORKER_ROOT"]

DEFAULT_WORKER_ROOT = "/var/lib/nipype-s3/work"

logger = logging.getLogger("nipype_s3.agent")


@dataclass
class AgentConfig:
    """Everything an agent needs to serve one run.

    Times are seconds. ``vcpus``/``mem_gb`` default to the machine's.
    """

    bucket: str
    prefix: str
    run_id: str
    region: str
    jobs_queue_url: str
    events_queue_url: str
    job_key_parameter: str
    endpoint_url: str | None = None
    idle_timeout: float = 300.0
    max_lifetime: float = 6 * 3600.0
    visibility_timeout: int = 120
    heartbeat: float = 30.0
    poll_wait: int = 20
    lease_check: float = 15.0
    max_attempts: int = 3
    #: how long AWS may stay unreachable (every request failing) before an agent with no
    #: job running gives up; running jobs are never killed for it
    max_outage: float = 600.0
    worker_root: str = DEFAULT_WORKER_ROOT
    vcpus: int | None = None
    mem_gb: float | None = None
    #: the controller's Python, nipype and nibabel versions: an agent that cannot match
    #: them (another image) refuses to run its nodes (see nipype_s3.remote.versions)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.bucket, self.prefix, self.run_id)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> AgentConfig:
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                # a newer controller: run with what this version knows
                logger.warning("agent configuration: ignoring settings this nipype_s3 "
                               "version does not know: %s", ", ".join(unknown))
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"Invalid agent configuration: {exc}") from None

    @classmethod
    def from_file(cls, path: str) -> AgentConfig:
        try:
            with open(path, encoding="utf-8") as fobj:
                return cls.from_json(fobj.read())
        except OSError as exc:
            raise ConfigurationError(f"Cannot read the agent configuration {path!r}: "
                                     f"{exc.strerror}") from None

    def machine_vcpus(self) -> int:
        return int(self.vcpus or os.cpu_count() or 1)

    def machine_mem_gb(self) -> float:
        if self.mem_gb:
            return float(self.mem_gb)
        try:
            with open("/proc/meminfo") as fobj:
                for line in fobj:
                    if line.startswith("MemTotal:"):
                        return int(line.split()[1]) / (1024 * 1024)
        except OSError:  # pragma: no cover - not Linux
            pass
        return 4.0
