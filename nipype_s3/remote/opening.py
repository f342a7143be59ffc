"""The first steps of every remote run, whatever the backend: its id and layout, the
controller's clients and content store, the signing key, the lease, the events queue,
the shipped package, and the configuration its agents get."""

from __future__ import annotations

import logging
import os
import threading
import time

from ..agent.config import AgentConfig
from ..config import env_endpoint_url
from ..ec2.jobs import RunLayout, job_key_parameter, new_job_key, new_run_id, parse_s3_prefix
from ..s3.cas import ContentStore
from ..s3.credentials import resolve_session
from ..s3.errors import s3_errors
from ..s3.session import bucket_region, make_s3_client
from ..secrets import withheld_names, withheld_paths

logger = logging.getLogger("nipype.workflow")


class OpeningMixin:
    """What a backend's ``_start_run`` calls: ``_open_run`` (ids, clients, store) before
    its own checks, ``_open_queues`` (key, lease, events queue, package) after them, and
    ``_start_lease`` last."""

    def _open_run(self):
        """The run's id, layout and clients (S3, SQS, SSM) and its content store; returns
        the boto3 session, for the backend's own clients."""
        s = self.settings
        name = type(s)._PLUGIN
        self._reset()
        bucket, prefix = parse_s3_prefix(s.s3_prefix)
        self.run_id = new_run_id()
        self.layout = RunLayout(bucket, prefix, self.run_id)
        self.started = time.time()
        session = resolve_session(creds_path=s.creds_path, profile=s.profile)
        endpoint = s.endpoint_url or env_endpoint_url()
        region = s.region or session.region_name or bucket_region(bucket, session,
                                                                  endpoint_url=endpoint)
        self.region, self.endpoint_url = region, endpoint
        self.s3 = make_s3_client(session, bucket=bucket, endpoint_url=endpoint, region=region)
        self.sqs = self._client(session, "sqs")
        self.ssm = self._client(session, "ssm")
        self.store = ContentStore(self.s3, bucket, prefix)
        # an input folder that holds them (a home directory, say) is staged without them
        self.store.withhold(*withheld_paths())
        self.store.withhold_names(*withheld_names())
        self.store.on_withheld = lambda paths: logger.warning(
            "%s: %d file(s) of credentials in a folder given to a node are not staged, so "
            "they do not leave this machine: %s%s (see 'Security' in docs/ec2plugin.rst)",
            name, len(paths), ", ".join(paths[:5]), " ..." if len(paths) > 5 else "")
        self._leased = False
        return session

    def _client(self, session, service: str):
        """A client of ``service`` at its endpoint (``AWS_ENDPOINT_URL_<SERVICE>``, else
        the run's)."""
        return session.client(service, region_name=self.region, endpoint_url=os.environ.get(
            f"AWS_ENDPOINT_URL_{service.upper()}") or self.endpoint_url)

    def _open_queues(self) -> None:
        """The run's signing key (in SSM: agents read it there), its signed lease, its
        events queue and, unless told not to, this controller's own package."""
        self._job_key = new_job_key()  # signs the lease too
        with s3_errors(bucket=self.layout.bucket, key=self.layout.lease_key,
                       action="write the lease to", endpoint=self.endpoint_url):
            self._write_lease()
        self._leased = True
        self.events_queue = self.sqs.create_queue(
            QueueName=self.layout.queue_name("events"))["QueueUrl"]
        self.ssm.put_parameter(Name=job_key_parameter(self.run_id), Type="SecureString",
                               Value=self._job_key.hex(), Overwrite=True,
                               Description=f"nipype-s3 job-signing key of run {self.run_id}")
        self._package_uri, self._package_sha256 = (
            self._ship_package() if self.settings.ship_package else (None, None))

    def _start_lease(self) -> None:
        self._lease_stop.clear()
        self._lease_thread = threading.Thread(target=self._lease_loop, daemon=True,
                                              name="nipype-s3-lease")
        self._lease_thread.start()

    def _jobs_queue(self, kind: str) -> str:
        """A queue of the run's jobs (``kind``: its name's last part)."""
        s = self.settings
        return self.sqs.create_queue(
            QueueName=self.layout.queue_name(kind),
            Attributes={"VisibilityTimeout": str(int(s.visibility_timeout)),
                        "MessageRetentionPeriod": "1209600"})["QueueUrl"]

    def _agent_config(self, queue_url: str, vcpus, mem_gb) -> AgentConfig:
        """What the agents serving ``queue_url`` are told (nothing secret)."""
        s = self.settings
        return AgentConfig(
            bucket=self.layout.bucket, prefix=self.layout.prefix, run_id=self.run_id,
            region=self.region, jobs_queue_url=queue_url, events_queue_url=self.events_queue,
            job_key_parameter=job_key_parameter(self.run_id),
            endpoint_url=self.endpoint_url, idle_timeout=s.idle_timeout,
            max_lifetime=s.max_lifetime, visibility_timeout=int(s.visibility_timeout),
            heartbeat=s.heartbeat, poll_wait=int(s.poll_wait),
            lease_check=max(1.0, min(15.0, s.lease_timeout / 4)),
            max_attempts=int(s.max_attempts), worker_root=s.worker_root,
            vcpus=vcpus, mem_gb=mem_gb, versions=self._versions)

    def _delete_queues(self) -> None:
        """The run's job queues and its events queue (an end step of every backend)."""
        urls = [f.queue_url for f in (getattr(self, "_fleets", None) or {}).values()]
        urls.append(getattr(self, "events_queue", None))
        for url in urls:
            if url:
                self.sqs.delete_queue(QueueUrl=url)
