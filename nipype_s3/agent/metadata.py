"""What the agent asks the instance metadata service (IMDSv2): its instance id, and
whether EC2 is about to reclaim it (a spot interruption notice).

EC2 gives a spot instance two minutes' notice at
``/latest/meta-data/spot/instance-action`` (404 until then). An agent that sees it
stops taking jobs and hands the ones it runs back to the queue at once, so they start
again on another instance instead of waiting out their visibility timeout.

``NIPYPE_S3_IMDS_URL`` points at another metadata service (LocalCloud runs one per
instance, where a test can post the notice).
"""

from __future__ import annotations

import json
import logging
import os

__all__ = ["Metadata", "IMDS_URL_VAR"]

logger = logging.getLogger("nipype_s3.agent")

#: the environment variable naming another metadata service (LocalCloud's)
IMDS_URL_VAR = "NIPYPE_S3_IMDS_URL"

_ACTIONS = {"terminate", "stop", "hibernate"}


class Metadata:
    """The metadata service of the instance the agent runs on."""

    def __init__(self, base_url: str | None = None, timeout: float = 1.0) -> None:
        from botocore.utils import IMDSFetcher

        url = base_url or os.environ.get(IMDS_URL_VAR)
        env = dict(os.environ)
        if url:  # asked for by name: on, whatever disables botocore's own use of it
            env["AWS_EC2_METADATA_DISABLED"] = "false"
        self.disabled = env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        kwargs = {"base_url": url.rstrip("/")} if url else {}
        self._fetcher = IMDSFetcher(timeout=timeout, num_attempts=1, env=env, **kwargs)

    def get(self, path: str) -> str | None:
        """The text at ``path``; ``None`` when there is none (404), or no service."""
        if self.disabled:
            return None
        try:
            token = self._fetcher._fetch_metadata_token()
            resp = self._fetcher._get_request(path, lambda response: False, token)
        except Exception:  # noqa: BLE001 - no metadata service: nothing to say
            return None
        return resp.text if resp.status_code == 200 else None

    def instance_id(self) -> str | None:
        text = self.get("/latest/meta-data/instance-id")
        return text.strip() if text and text.strip() else None

    def interruption(self) -> dict | None:
        """The spot interruption notice (``{"action": "terminate", "time": ...}``), or
        ``None``. Anything that is not such a notice counts as none."""
        text = self.get("/latest/meta-data/spot/instance-action")
        if not text:
            return None
        try:
            notice = json.loads(text)
        except ValueError:
            return None
        if isinstance(notice, dict) and notice.get("action") in _ACTIONS:
            return notice
        return None
