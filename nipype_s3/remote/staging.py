"""Sending a node: its input files into the content store, its pickle and signed spec
below the run's prefix, and the message announcing it; and the controller's own
package, shipped for agents to run the same code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions

from .. import __version__
from ..ec2.jobs import (
    MessageRejected,
    make_message,
    read_bounded,
)
from ..exceptions import ConfigurationError
from ..pickles import FAST_GZIP_LEVEL
from ..s3.cas import ManifestEntry
from ..s3.errors import translate
from .job import _Job
from .placement import _input_paths, _output_targets, _slug

logger = logging.getLogger("nipype.workflow")


#: Jobs sent at once: their inputs stored, pickle and spec written, message queued.
_SENDERS = 4


def _link_entry(path: str) -> ManifestEntry:
    """The manifest entry of the symbolic link ``path``: its own target when that is
    the file, else (a chain of links) the file it ends at."""
    target = os.readlink(path)
    first = target if os.path.isabs(target) else os.path.join(os.path.dirname(path), target)
    if os.path.islink(first):
        target = os.path.realpath(path)
    entry = ManifestEntry.for_link(path)
    return ManifestEntry(entry.path, "", 0, entry.mtime, target)


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


def ship_package(s3, store, bucket: str) -> tuple[str, str]:
    """Upload this very nipype_s3 package to the content store, so agents run the
    controller's code: its ``s3://`` URI and SHA-256, which the bootstrap checks before
    installing it.

    Its key is predictable (the zip is the same for the same code), so an object
    already there is not trusted: it is read back and hashed (a few hundred KB, once a
    run), and sent again when it is not these bytes. S3-compatible stores do not all
    keep checksums (nor does moto), so none is relied on.
    """
    import base64

    import nipype_s3

    buf = _zip_package(os.path.dirname(nipype_s3.__file__))
    raw = hashlib.sha256(buf).digest()
    digest, checksum = raw.hex(), base64.b64encode(raw).decode()
    key = store.key(digest)
    try:
        there = read_bounded(s3, bucket, key, len(buf), what="shipped package")
        genuine = hashlib.sha256(there).digest() == raw
    except (botocore.exceptions.ClientError, MessageRejected):
        genuine = False
    if not genuine:
        s3.put_object(Bucket=bucket, Key=key, Body=buf, ChecksumSHA256=checksum)
    return f"s3://{bucket}/{key}", digest


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


class StagingMixin:
    """Preparing and sending jobs (the backend's ``_fleet(instance_type, image)`` says
    where a job goes)."""

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
        node_args = node_args if isinstance(node_args, dict) else {}
        try:
            fleet = self._fleet_for(node, node_args, n_procs, mem_gb)
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
                    instance_type=fleet.instance_type, fleet=fleet.key, sending=sending,
                    writable=tuple(spec["folders"]) + tuple(targets))

    def _fleet_for(self, node, node_args: dict, n_procs: int, mem_gb: float):
        """Where the backend sends ``node``'s job: by default the fleet of its instance
        type and image (a backend may give a node a fleet of its own)."""
        return self._fleet(node_args.get("instance_type") or self.settings.instance_type,
                           node_args.get("image") or self.settings.image)

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
        self._log.info("submitted %s as job %s (%d input files)", name, job_id,
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
            self._log.error("job %s (%s) could not be sent: %s", job.job_id,
                         job.node.fullname, err)
        self._fail_outstanding("its job could not be sent")

    def _ship_package(self) -> tuple[str, str]:
        return ship_package(self.s3, self.store, self.layout.bucket)
