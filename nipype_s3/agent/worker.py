"""Run one job: fetch its inputs, run its node under the worker root, store its outputs.

Started by the agent as ``python -m nipype_s3.agent.worker SPEC OUTCOME`` with the
agent's configuration in ``NIPYPE_S3_AGENT_CONFIG``. It writes an outcome file for the
agent (status, traceback, the output manifest); the agent alone talks to SQS and
writes the run's ``done`` report.

A job given a folder (a FreeSurfer ``subjects_dir``) runs in a view of its own below
``<root>/.views/<job>`` (:func:`private_view`), and what it writes into the folder is
stored with its outputs (:func:`written_elsewhere`) for the controller to put in place.

Order matters: the input files are fetched **before** the node is unpickled, because
unpickling a node re-checks ``File(exists=True)`` inputs; path strings are moved below
the worker root while the pickle is read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import time
from traceback import format_exc

__all__ = ["run_job", "main", "node_dir_contents", "written_elsewhere"]


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


def written_elsewhere(outdir: str, root: str, given: list[str],
                      staged: dict) -> tuple[list[str], list[str]]:
    """What a node wrote outside its own directory, in the folders it was given and at
    the paths it was told to write: ``(files, links)`` that are new, or changed since
    they were staged.

    FreeSurfer's ``recon-all`` writes its subject into the ``subjects_dir`` it is given,
    an interface its ``out_file="/data/derivs/x.nii.gz"``; under ``Linear`` the user
    finds them there, so the controller gets them back at their own paths. ``given``
    are those paths on this worker; ``staged`` maps each file fetched for the job
    (worker path) to its manifest entry. Links are classified as in
    :func:`node_dir_contents` (a link to a folder stays a link, so FreeSurfer's
    ``fsaverage`` link does not bring its content); a link counts as new unless it was
    staged as the same link.
    """
    from ..localfs import is_within
    from ..s3.download import is_partial

    tops: list[str] = []
    for path in sorted(set(given), key=len):
        if not any(is_within(top, path) for top in tops):
            tops.append(path)
    files, links = [], []
    for top in tops:
        if os.path.isdir(top) and not os.path.islink(top):
            found, kept = node_dir_contents(top, root)
        elif os.path.isfile(top) and not os.path.islink(top):
            found, kept = [top], []
        else:
            continue
        for path in found:
            entry = staged.get(path)
            if is_within(outdir, path) or is_partial(path):
                continue
            if entry is None or entry.link is not None:
                files.append(path)
                continue
            st = os.stat(path)
            if st.st_size != entry.size or abs(st.st_mtime - entry.mtime) > 1e-3:
                files.append(path)
        for path in kept:
            entry = staged.get(path)
            if not is_within(outdir, path) and (entry is None or entry.link is None or
                                                 os.readlink(path) != entry.link):
                links.append(path)
    return files, links


def private_view(shared, root: str, manifest, folders: list[str]):
    """Make the job's inputs again below ``root``, its own: the ``PathMap`` to it.

    ``shared`` maps the controller's paths to the agent's root, where the inputs were
    fetched (and stay, for the next job). The view is folders of its own holding hard
    links to those files, so it costs no copy: what the node creates in a folder it was
    given (a subject in a ``subjects_dir``) is in its view alone, and another job packed
    on the instance does not report it as its own. A file changed in place (a log
    appended to) changes for the jobs sharing it, as on one machine; its new time then
    has the next job fetch it afresh.
    """
    from ..localfs import is_within, make_link
    from ..pickles import PathMap
    from ..s3.download import is_partial

    if os.path.lexists(root):  # an earlier attempt of the job on this agent
        shutil.rmtree(root)
    private = PathMap(root, shared.prefixes)

    def partials(folder, names):  # a neighbour job's download under way
        return [name for name in names if is_partial(name)]

    for folder in folders:
        dest = private.to_worker(folder)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copytree(shared.to_worker(folder), dest, symlinks=True, ignore=partials,
                        copy_function=_link_or_copy)
        for dirpath, dirnames, names in os.walk(dest):
            for name in names + dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) and is_within(shared.root, os.readlink(path)):
                    # into the shared root: into this view instead
                    make_link(path, private.to_worker(shared.to_controller(
                        os.readlink(path))))
    for entry in manifest:
        if any(is_within(folder, entry.path) for folder in folders):
            continue
        dest = private.to_worker(entry.path)
        if entry.link is not None:
            make_link(dest, private.to_worker(entry.link) if os.path.isabs(entry.link)
                      else entry.link)
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _link_or_copy(shared.to_worker(entry.path), dest)
    return private


def _link_or_copy(src: str, dest: str) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dest)


def run_job(cfg, spec: dict, outcome_path: str) -> dict:
    """Run the job described by ``spec``; write and return the outcome."""
    import pickle

    from ..pickles import PathMap, rewrite_pickle
    from ..s3.cas import ContentStore, ManifestEntry
    from .runner import run_node, write_failure_result

    os.environ.setdefault("NIPYPE_NO_ET", "1")
    started = time.time()
    root = cfg_root = os.path.abspath(cfg.worker_root)
    outcome = {"job_id": spec["job_id"], "status": "error", "started": started,
               "worker_root": root, "outputs": [], "traceback": None, "output_dir": None}
    node = None
    staged: dict = {}
    given: list[str] = []
    try:
        client = _clients(cfg)
        store = ContentStore(client, cfg.bucket, cfg.prefix)
        manifest = [ManifestEntry.from_json(e) for e in spec["manifest"]]
        pathmap = PathMap(root, tuple(spec.get("prefixes", ())) + tuple(
            e.path for e in manifest))
        store.get(manifest, pathmap.to_worker, move_link=pathmap.to_worker)
        folders = list(spec.get("folders", ()))
        for folder in folders:
            os.makedirs(pathmap.to_worker(folder), exist_ok=True)
        if folders:
            # a folder the node may write into (a subjects_dir): a view of its own (hard
            # links), so that what it makes there is its own, not a neighbour job's too
            root = os.path.join(root, ".views", spec["job_id"])
            pathmap = private_view(pathmap, root, manifest, folders)
            outcome["worker_root"] = root
        # what the job was given, as it arrived: what differs after the run goes back
        staged = {pathmap.to_worker(e.path): e if e.link is None else ManifestEntry(
            e.path, e.sha256, e.size, e.mtime, pathmap.to_worker(e.link)) for e in manifest}
        given = [pathmap.to_worker(p) for p in folders]
        for target in spec.get("targets", ()):  # where it is told to write: made, reported
            os.makedirs(os.path.dirname(pathmap.to_worker(target)), exist_ok=True)
            given.append(pathmap.to_worker(target))

        raw = client.get_object(Bucket=cfg.bucket, Key=spec["node_pickle"])["Body"].read()
        if hashlib.sha256(raw).hexdigest() != spec["node_sha256"]:
            raise RuntimeError("the node pickle does not match the SHA-256 in its signed spec; "
                               "refusing to unpickle it")
        data = rewrite_pickle(gzip.decompress(raw), pathmap.to_worker)
        try:
            info = pickle.loads(data)  # noqa: S301 - verified: signed spec + SHA-256
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(
                f"The node could not be unpickled on this instance ({exc}): its interface, "
                "or a value among its inputs, comes from a module this instance does not "
                "have. Install that module on the instances (EC2Plugin plugin_args "
                "'requirements' or 'setup_commands', or an AMI that has it), or run the "
                "node on the controller with node.plugin_args = {'local': True}.") from exc
        node = info["node"]
        scratch = os.path.join(cfg_root, ".scratch", spec["job_id"])
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
            files, links = written_elsewhere(outdir, root, given, staged)
            if files or links:
                entries = store.put(files, expand_dirs=False)
                entries += [ManifestEntry.for_link(path) for path in links]
                # with what the job was given there, so that the controller can tell
                # whether another node changed the file meanwhile
                was = {p: [e.size, e.mtime] for p, e in staged.items() if e.link is None}
                outcome["written"] = [dict(e.to_json(), was=was.get(e.path))
                                      for e in entries]
            outcome["bytes_up"] = store.bytes_up
        except Exception:
            outcome["status"] = "error"
            outcome["traceback"] = (outcome["traceback"] or []) + [
                "\nStoring the node's outputs failed:\n" + format_exc()]
    if root != cfg_root:  # the job's own view: its outputs are stored
        shutil.rmtree(root, ignore_errors=True)
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
