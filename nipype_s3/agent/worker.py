"""Run one job: fetch its inputs, run its node under the worker root, store its outputs.

Started by the agent as ``python -m nipype_s3.agent.worker SPEC OUTCOME`` with the
agent's configuration in ``NIPYPE_S3_AGENT_CONFIG``. It writes an outcome file for the
agent (status, traceback, the output manifest); the agent alone talks to SQS and
writes the run's ``done`` report.

Order matters: the input files are fetched **before** the node is unpickled, because
unpickling a node re-checks ``File(exists=True)`` inputs; path strings are moved below
the worker root while the pickle is read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import time
from traceback import format_exc

__all__ = ["run_job", "main", "node_dir_contents"]


_client_cache: dict = {}


def _clients(cfg):
    """The job's S3 client: made once per worker (a client costs ~0.2 s of model loading)."""
    key = (cfg.region, cfg.endpoint_url)
    if key not in _client_cache:
        import boto3

        from ..s3.session import make_s3_client

        session = boto3.Session(region_name=cfg.region)
        _client_cache[key] = make_s3_client(session, endpoint_url=cfg.endpoint_url,
                                            region=cfg.region)
    return _client_cache[key]


def node_dir_contents(outdir: str, root: str) -> tuple[list[str], list[str]]:
    """What of a node's directory to store: ``(files, links)``, each sorted.

    Symbolic links are kept as links (the controller makes them again, their targets
    moved from ``root`` to its own paths) when they point below ``root`` (the node's
    directory, its inputs, other nodes' outputs: all where the controller has them),
    into a folder, or nowhere (a broken link is what the node left; it is no reason to
    fail the job). A link to an existing file elsewhere on the instance (``/opt/...``)
    is stored as that file, which the controller may not have. Pipes and sockets hold
    nothing to store and are left out.
    """
    from ..localfs import is_within

    files, links = [], []
    for dirpath, dirnames, names in os.walk(outdir):  # does not descend into links
        dirnames.sort()
        for name in sorted(names) + [d for d in dirnames if os.path.islink(
                os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                if os.path.isfile(path):  # not a pipe or socket: reading one would hang
                    files.append(path)
            elif is_within(root, os.path.realpath(path)) or os.path.isdir(path) or \
                    not os.path.exists(path):
                links.append(path)
            else:
                files.append(path)
    return files, links


def run_job(cfg, spec: dict, outcome_path: str) -> dict:
    """Run the job described by ``spec``; write and return the outcome."""
    import pickle

    from ..pickles import PathMap, rewrite_pickle
    from ..s3.cas import ContentStore, ManifestEntry
    from .runner import run_node, write_failure_result

    os.environ.setdefault("NIPYPE_NO_ET", "1")
    started = time.time()
    root = os.path.abspath(cfg.worker_root)
    outcome = {"job_id": spec["job_id"], "status": "error", "started": started,
               "worker_root": root, "outputs": [], "traceback": None, "output_dir": None}
    node = None
    try:
        client = _clients(cfg)
        store = ContentStore(client, cfg.bucket, cfg.prefix)
        manifest = [ManifestEntry.from_json(e) for e in spec["manifest"]]
        pathmap = PathMap(root, tuple(spec.get("prefixes", ())) + tuple(
            e.path for e in manifest))
        store.get(manifest, pathmap.to_worker, move_link=pathmap.to_worker)

        raw = client.get_object(Bucket=cfg.bucket, Key=spec["node_pickle"])["Body"].read()
        if hashlib.sha256(raw).hexdigest() != spec["node_sha256"]:
            raise RuntimeError("the node pickle does not match the SHA-256 in its signed spec; "
                               "refusing to unpickle it")
        data = rewrite_pickle(gzip.decompress(raw), pathmap.to_worker)
        info = pickle.loads(data)  # noqa: S301 - verified: signed spec + SHA-256
        node = info["node"]
        scratch = os.path.join(root, ".scratch", spec["job_id"])
        os.makedirs(scratch, exist_ok=True)
        os.chdir(scratch)
        outcome["node_started"] = time.time()
        traceback = run_node(node, updatehash=info.get("updatehash", False))
        outcome["node_finished"] = time.time()
        outcome["status"] = "ok" if traceback is None else "error"
        outcome["traceback"] = traceback
    except Exception:
        outcome["traceback"] = [format_exc()]
        if node is not None:
            try:
                write_failure_result(node, outcome["traceback"])
            except Exception:  # pragma: no cover - best effort
                pass
    if node is not None and os.path.isdir(node.output_dir()):
        from ..secrets import scrub_tree, secret_values

        outdir = node.output_dir()
        outcome["output_dir"] = outdir
        scrub_tree(outdir, secret_values())
        files, links = node_dir_contents(outdir, root)
        try:
            client = _clients(cfg)
            store = ContentStore(client, cfg.bucket, cfg.prefix)
            entries = store.put(files, expand_dirs=False)
            entries += [ManifestEntry.for_link(path) for path in links]
            outcome["outputs"] = [dict(e.to_json(), path=os.path.relpath(e.path, outdir))
                                  for e in entries]
            outcome["bytes_up"] = store.bytes_up
        except Exception:
            outcome["status"] = "error"
            outcome["traceback"] = (outcome["traceback"] or []) + [
                "\nStoring the node's outputs failed:\n" + format_exc()]
    outcome["finished"] = time.time()
    tmp = outcome_path + ".tmp"
    with open(tmp, "w") as fobj:
        json.dump(outcome, fobj)
    os.replace(tmp, outcome_path)
    return outcome


def main(argv=None) -> int:
    from .config import AgentConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m nipype_s3.agent.worker SPEC.json OUTCOME.json", file=sys.stderr)
        return 2
    cfg = AgentConfig.from_json(os.environ["NIPYPE_S3_AGENT_CONFIG"])
    with open(argv[0]) as fobj:
        spec = json.load(fobj)
    outcome = run_job(cfg, spec, argv[1])
    print(f"nipype-s3 worker: job {spec['job_id']} finished: {outcome['status']}", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
