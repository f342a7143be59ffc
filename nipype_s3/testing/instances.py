"""A LocalCloud instance: what stands for it (its agent process or sandbox), and the
metadata service every instance asks."""

from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass

__all__ = ["LocalInstance", "AGENT_APP_ID", "serve_metadata", "keep_environment",
           "remove_containers"]

#: The User-Agent "app/..." of LocalCloud agents' botocore requests.
AGENT_APP_ID = "nipype-s3-agent"


@dataclass
class LocalInstance:
    """One launched instance and the agent process standing in for it."""

    instance_id: str
    root: str
    proc: subprocess.Popen | None
    log_path: str
    started: float
    ended: float | None = None
    killed: bool = False
    via_ssm: bool = False
    #: booted from its user-data (LocalCloud(boot="user-data"))
    sandbox: object = None
    env_kept: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fobj:
                return fobj.read()
        except OSError:
            return ""


def keep_environment(inst: LocalInstance, errors: list) -> None:
    """Keep the environment ``inst``'s bootstrap built, once its agent runs (once)."""
    box = inst.sandbox
    if box is None or inst.env_kept or not inst.alive or "serving run" not in inst.log():
        return
    inst.env_kept = True
    try:
        box.save_environment()
    except (OSError, subprocess.CalledProcessError) as exc:
        errors.append(f"keeping {inst.instance_id}'s environment: {exc!r}")


def remove_containers(label: str) -> None:
    """Remove the containers LocalCloud labelled ``label`` (an instance's, a job's)."""
    import shutil

    if not shutil.which("docker"):
        return
    found = subprocess.run(["docker", "ps", "-aq", "--filter",
                            f"label=nipype-s3-localcloud={label}"],
                           capture_output=True, text=True, timeout=60)
    if found.stdout.split():
        subprocess.run(["docker", "rm", "-f", *found.stdout.split()], capture_output=True,
                       timeout=60)


def serve_metadata(notices: dict):
    """One metadata service for every instance: ``<url>/<instance id>/latest/...``
    (IMDSv2: a token first), with its instance id and any spot notice in ``notices``
    (instance id -> the notice's JSON). Returns the running server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _answer(self, code: int, text: str = "") -> None:
            body = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self):  # noqa: N802 - the token
            self._answer(200, "localcloud-token")

        def do_GET(self):  # noqa: N802
            iid, _, path = self.path.lstrip("/").partition("/")
            path = path.lstrip("/")
            if self.headers.get("x-aws-ec2-metadata-token") != "localcloud-token":
                self._answer(401)
            elif path == "latest/meta-data/instance-id":
                self._answer(200, iid)
            elif path == "latest/meta-data/spot/instance-action" and iid in notices:
                self._answer(200, notices[iid])
            else:
                self._answer(404)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True,
                     name="nipype-s3-localcloud-imds").start()
    return server


def _running_jobs(inst: LocalInstance) -> int:
    """Jobs the agent has started and not finished, from its log (a child process alone
    is not proof: imports may run one)."""
    text = inst.log()
    return max(0, text.count(") started in ") - text.count(" finished: "))


def _transient(exc: BaseException) -> bool:
    """An error of moto's that a second look usually does not meet (a 500 page)."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ResponseParserError):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return isinstance(exc, (botocore.exceptions.ConnectionError,
                            botocore.exceptions.HTTPClientError))
