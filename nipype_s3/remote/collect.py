"""Bringing a finished job back: its signed report verified, its files fetched by
digest into the node's folder (data first, the result pickle last) with every path
confined, what it wrote elsewhere put in place, and a failure turned into the node's
crash file. A job's collection error is that job's alone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

from nipype.utils.filemanip import loadpkl, savepkl

from ..agent.main import transient
from ..agent.runner import write_failure_result
from ..ec2.jobs import (
    MAX_REPORT_BYTES,
    MessageRejected,
    read_bounded,
    unseal,
)
from ..exceptions import UnsafePath
from ..localfs import confine, confine_absolute
from ..pickles import PathMap, rewrite_pickle_file, rewrite_text_file
from ..s3.cas import ManifestEntry, sha256_file
from ..s3.listing import iter_objects
from .job import _AWS_ERRORS, _Job

logger = logging.getLogger("nipype.workflow")


#: Finished jobs fetched at once (each a few small requests, mostly waiting).
_COLLECTORS = 8


def _is_was(value) -> bool:
    """A report's ``was`` (size and time a file had when staged) of the expected shape."""
    return isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _changed_meanwhile(entry: ManifestEntry, was) -> bool:
    """Whether the file at ``entry.path`` differs from what the job was given there
    (``was``: its size and time, or ``None`` for a file the job made) and from what the
    job wrote: then another node wrote it while the job ran."""
    try:
        st = os.stat(entry.path)
    except OSError:
        return False  # nothing there: no one else wrote it
    if was is not None and st.st_size == was[0] and abs(st.st_mtime - was[1]) <= 1e-3:
        return False
    return not (st.st_size == entry.size and sha256_file(entry.path) == entry.sha256)


def _is_meta(relpath: str) -> bool:
    name = os.path.basename(relpath)
    return name.endswith((".pklz", ".pkl")) or name.startswith("_0x") or \
        relpath.startswith("_report")


class CollectMixin:
    """Collection of finished jobs into the controller's node folders."""

    def _get_result(self, taskid):
        """nipype's, then, for a node that failed, its own result file put back where
        MultiProc leaves it (``result_<node>.pklz``, with the outputs and runtime it has;
        nipype's batch plugins leave only ``crashstore.pklz``)."""
        out = super()._get_result(taskid)
        job = self._jobs.get(taskid)
        if out and out.get("traceback") and job is not None:
            kept = out.get("result")
            crash = os.path.join(job.node_dir, "crashstore.pklz")
            if kept is not None and not isinstance(kept, dict) and os.path.exists(crash):
                savepkl(os.path.join(job.node_dir, f"result_{job.node.name}.pklz"), kept)
                os.remove(crash)
        return out

    def _scan_done(self) -> None:
        if not self._outstanding():
            return
        prefix = self.layout.key("done") + "/"
        finished = []
        for info in iter_objects(self.s3, self.layout.bucket, prefix):
            job = self._by_job_id.get(info.key[len(prefix):-len(".json")])
            if job is not None and not job.done:
                finished.append(job)
        self._collect(finished)

    def _collect(self, jobs: list[_Job]) -> None:
        """Bring finished jobs' results into the controller's node directories.

        Each job costs a few requests, one after the other (the report, then its files,
        the result pickle last): several jobs are fetched at once, so jobs that end
        together are not seen one request-latency after another. Their bookkeeping is
        done here, in the thread running the workflow.

        A job's fetch that fails is that job's alone: an AWS error that may pass leaves
        it to the next poll; a report that does not verify is deleted and waited past
        (its agent writes the real one); anything else becomes the node's crash file.
        Nothing raised here reaches nipype's loop, which would charge it to whichever
        node it polled.
        """
        if not jobs:
            return
        workers = min(_COLLECTORS, len(jobs))
        if workers == 1:
            outcomes = [(jobs[0], *self._fetch_guarded(jobs[0]))]
        else:
            with ThreadPoolExecutor(max_workers=workers,
                                    thread_name_prefix="nipype-s3-collect") as pool:
                futures = [(job, pool.submit(self._fetch_guarded, job)) for job in jobs]
            outcomes = [(job, *future.result()) for job, future in futures]
        for job, collected, error in outcomes:
            if collected is not None:
                self._collected(job, collected)
            elif error is not None:
                self._collect_failed(job, error)

    def _fetch_guarded(self, job: _Job) -> tuple[float | None, BaseException | None]:
        """``(collected, None)``, ``(None, None)`` to try again later, or ``(None,
        error)`` for a job whose results cannot be had."""
        try:
            return self._fetch(job), None
        except MessageRejected as exc:
            self._log.error("job %s: refused its report (%s); deleted it, waiting "
                         "for its agent's", job.job_id, exc)
            try:
                self.s3.delete_object(Bucket=self.layout.bucket,
                                      Key=self.layout.done_key(job.job_id))
            except _AWS_ERRORS as err:
                self._log.warning("could not delete it: %s", err)
            if job.reported:
                # its agent said it finished: the genuine report was replaced, and
                # nobody will write it again; the job runs once more (or, too often
                # replaced, fails)
                job.reported, job.started = False, None
                job.resent += 1
                if job.resent > int(self.settings.max_attempts):
                    return None, MessageRejected(
                        f"the report of job {job.job_id} was replaced by one that does not "
                        f"verify {job.resent} times; someone with write access to "
                        f"s3://{self.layout.bucket}/{self.layout.run_prefix} is tampering "
                        "with the run")
                queue, body = self._messages[job.job_id]
                self.sqs.send_message(QueueUrl=queue, MessageBody=body)
                self._log.warning("job %s sent again", job.job_id)
            return None, None
        except _AWS_ERRORS as exc:
            if transient(exc):
                self._log.warning("job %s: fetching its results failed (%s); "
                               "trying again", job.job_id, exc)
                return None, None
            return None, exc
        except Exception as exc:  # noqa: BLE001 - this job's failure, not the run's
            return None, exc

    def _collect_failed(self, job: _Job, error: BaseException) -> None:
        """The node's crash file says why its results could not be brought back."""
        self._log.error("job %s (%s): its results could not be brought back: %s",
                     job.job_id, job.node.fullname, error)
        write_failure_result(job.node, [
            f"{type(error).__name__}: {error}\n",
            f"[nipype_s3] node {job.node.fullname} ran as job {job.job_id}, but its results "
            f"could not be brought back from s3://{self.layout.bucket}/"
            f"{self.layout.done_key(job.job_id)} (see the error above).\n"])
        job.done = True
        self.stats["remote_done"] += 1

    def _collected(self, job: _Job, collected: float) -> None:
        report = job.report
        self._busy_seconds += max(0.0, float(report.get("finished", 0))
                                  - float(report.get("started", 0)))
        self.timings.append({"job_id": job.job_id, "submitted": job.submitted,
                             "received": report.get("received"),
                             "node_started": report.get("node_started"),
                             "node_finished": report.get("node_finished"),
                             "reported": report.get("reported"), "collected": collected})
        status = report.get("status")
        if status != "ok":  # the node's result file, written in the workflow's thread
            self._annotate_failure(job, report)
        job.done = True
        self.stats["remote_done"] += 1
        self._log.info("job %s (%s) %s on %s (attempt %s)", job.job_id,
                    job.node.fullname, "finished" if status == "ok" else
                    f"FAILED ({plain(status)})", plain(report.get("instance_id")),
                    plain(report.get("attempt")))

    def _fetch(self, job: _Job) -> float:
        """A finished job's report and node directory, into the controller's; returns
        when it had them (seconds since the epoch)."""
        data = read_bounded(self.s3, self.layout.bucket, self.layout.done_key(job.job_id),
                            MAX_REPORT_BYTES, what="done report")
        report = unseal(self._job_key, data, "report")
        if report.get("job_id") != job.job_id or report.get("run_id") != self.run_id:
            raise MessageRejected(f"a signed report of job {report.get('job_id')!r} of run "
                                  f"{report.get('run_id')!r} where job {job.job_id!r} "
                                  "belongs")
        os.makedirs(job.node_dir, exist_ok=True)
        outputs = [ManifestEntry.from_json(e) for e in report.get("outputs") or []]
        links = [e for e in outputs if e.link is not None]
        outputs = [e for e in outputs if e.link is None]
        worker_root = report.get("worker_root")
        pathmap = PathMap(worker_root if isinstance(worker_root, str) and
                          os.path.isabs(worker_root) else "/")

        def dest(rel: str) -> str:  # checked as each is written: after the links before it
            return confine(job.node_dir, rel, what=f"output of job {job.job_id}")
        self._write_back(job, report, pathmap)  # before the result pickle, too
        if links:  # before the result pickle, which says the node is done
            self.store.get(links, lambda rel: confine(
                job.node_dir, rel, what=f"link of job {job.job_id}", link=True),
                move_link=pathmap.to_controller)
        if outputs:
            meta = [e for e in outputs if _is_meta(e.path)]
            data = [e for e in outputs if not _is_meta(e.path)]
            result = [e for e in meta if os.path.basename(e.path).startswith("result_")]
            meta = [e for e in meta if e not in result]
            for group in (data, meta, result):  # data first, the result pickle last
                if not group:
                    continue
                self.store.get(group, dest)
                for entry in group:
                    path = dest(entry.path)
                    if entry.path.endswith((".pklz", ".pkl")):
                        rewrite_pickle_file(path, pathmap.to_controller)
                    elif entry.path.endswith((".json", ".rst", ".txt")) and \
                            os.path.basename(entry.path).startswith(("_0x", "report", "_")):
                        rewrite_text_file(path, pathmap.text_to_controller)
                    os.utime(path, (entry.mtime, entry.mtime))
        job.report = report
        return time.time()

    def _write_back(self, job: _Job, report: dict, pathmap: PathMap) -> None:
        """What the node wrote into the folders it was given (a FreeSurfer
        ``subjects_dir``, say) or to absolute paths it was told to write, to the same
        paths here, as ``Linear`` leaves them.

        Only paths within the folders it was given, and the paths it was told to write,
        are written: a report naming anything else is refused with a warning. Nodes on
        different instances do not see each other's writes: when a file here is no
        longer what the job was given (another node wrote it meanwhile), this job's
        version replaces it, with a warning.
        """
        here, was = [], {}
        for data in report.get("written") or []:
            e = ManifestEntry.from_json(data)
            entry = ManifestEntry(pathmap.to_controller(e.path), e.sha256, e.size, e.mtime,
                                  e.link)
            here.append(entry)
            was[entry.path] = data.get("was") if _is_was(data.get("was")) else None
        allowed = [e for e in here if self._may_write(job, e)]
        if len(allowed) < len(here):
            self._log.warning("job %s reported %d file(s) outside what it may write; "
                           "not written: %s", job.job_id, len(here) - len(allowed),
                           ", ".join(e.path for e in here if e not in allowed)[:500])
        if not allowed:
            return
        with self._write_back_lock:  # jobs are fetched in parallel: one at a time here
            clashes = [e.path for e in allowed if e.link is None and
                       _changed_meanwhile(e, was[e.path])]
            if clashes:
                self._log.warning(
                    "%s wrote %s, which another node changed while it ran "
                    "(nodes on different instances do not see each other's writes); this "
                    "node's version is kept. Have each node write files of its own.",
                    job.node.fullname,
                    ", ".join(clashes[:5]) + (" ..." if len(clashes) > 5 else ""))
            what = f"path job {job.job_id} wrote"
            self.store.get([e for e in allowed if e.link is not None], lambda path: (
                confine_absolute(job.writable, path, what=what, link=True)),
                move_link=pathmap.to_controller)
            self.store.get([e for e in allowed if e.link is None], lambda path: (
                confine_absolute(job.writable, path, what=what)))
        self._log.info("%s wrote %d file(s) into folders it was given or paths it "
                    "was told to write; they are in place here too", job.node.fullname,
                    len(allowed))

    @staticmethod
    def _may_write(job: _Job, entry: ManifestEntry) -> bool:
        try:
            confine_absolute(job.writable, entry.path, link=entry.link is not None)
            return True
        except UnsafePath:
            return False

    def _annotate_failure(self, job: _Job, report: dict) -> None:
        """Make the node's result file carry the remote traceback, instance and log."""
        log_uri = f"s3://{self.layout.bucket}/{report['log_key']}" if report.get("log_key") \
            else "(no log)"
        where = (f"\n[nipype_s3] node {job.node.fullname} ran as job {job.job_id} on "
                 f"{self._AGENT_KIND} {plain(report.get('instance_id'))} (attempt "
                 f"{plain(report.get('attempt'))}); agent log: {plain(log_uri, 400)}\n")
        if isinstance(report.get("instance_id"), str):
            where += self._where_ran(report["instance_id"])
        if report.get("error"):
            where += f"[nipype_s3] {plain(str(report['error']).strip(), 2000, lines=True)}\n"
        root = report.get("worker_root")
        here = PathMap(root if isinstance(root, str) and os.path.isabs(root) else "/")
        tail = str(report.get("log_tail") or "")
        if tail:
            where += "[nipype_s3] log tail:\n" + plain(
                here.text_to_controller(tail), 1 << 20, lines=True).rstrip("\n")
            where += "\n[nipype_s3] end of the log tail; the node's error:\n\n"
        result_file = os.path.join(job.node_dir, f"result_{job.node.name}.pklz")
        data = None
        if os.path.exists(result_file):
            try:
                data = loadpkl(result_file)
            except Exception:
                data = None
        said = "".join(str(line) for line in (
            data.get("traceback") if isinstance(data, dict) and data.get("traceback")
            else report.get("traceback") or []))
        where += _hints(here.text_to_controller(said))
        if isinstance(data, dict) and data.get("traceback"):
            # the instance's paths in the traceback become this machine's, as the
            # workflow's final error and the crash file show them
            # where it ran and its log first: the error itself stays the last line, as
            # under Linear and MultiProc
            data["traceback"] = [where] + [_shown(here, line) for line in data["traceback"]]
            savepkl(result_file, data)
        else:
            lines = [_shown(here, line) for line in report.get("traceback") or []] or [
                f"RemoteNodeError: job {job.job_id} did not finish "
                f"({plain(report.get('status'))}).\n"]
            write_failure_result(job.node, [where] + lines)


def _shown(here, line) -> str:
    """A traceback line of the report, in this machine's paths, as plain text."""
    return plain(here.text_to_controller(str(line)), 1 << 20, lines=True)


def plain(value, limit: int = 120, *, lines: bool = False) -> str:
    """What a report says, as one short line of plain text (``lines``: newlines kept)
    (a report is a claim: its fields may hold anything, terminal escapes included)."""
    text = "".join(c if c.isprintable() or (lines and c in "\n\t") else "?"
                   for c in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


_MISSING_FILE = re.compile(r"No such file or directory: '([^'\n]+)'")
_MISSING_COMMAND = re.compile(r'No command "([^"\n]{1,200})" found')
_MISSING_MODULE = re.compile(r"No module named '([\w.]{1,200})'")
#: hints of each kind at most (a traceback is the node's: it may repeat itself)
_MOST_HINTS = 3


def _hints(text: str) -> str:
    """What a remote error that would not happen here means (a file only this machine
    has, a package only this machine has), with what to do."""
    out = []
    for path in list(dict.fromkeys(_MISSING_FILE.findall(text)))[:_MOST_HINTS]:
        if len(path) <= 1024 and os.path.isabs(path) and os.path.exists(path):
            out.append(
                f"[nipype_s3] {path} exists on this machine but not on the instance: a node "
                "gets only the files among its inputs (File/Directory traits, a Function's "
                "arguments), not every path its code names. Give it as an input.\n")
    for command in list(dict.fromkeys(_MISSING_COMMAND.findall(text)))[:_MOST_HINTS]:
        out.append(
            f"[nipype_s3] the instance has no command {command!r}: run the node in an "
            "image that has it (plugin_args['image'] or node.plugin_args['image'], e.g. "
            "an FSL or ANTs image), or install it with plugin_args['setup_commands'].\n")
    for module in list(dict.fromkeys(_MISSING_MODULE.findall(text)))[:_MOST_HINTS]:
        top = module.split(".")[0]
        out.append(
            f"[nipype_s3] the instance's Python has no module {top!r}"
            f"{' (this machine has it)' if importlib.util.find_spec(top) else ''}: add its "
            f"package to plugin_args['requirements'] (e.g. ['{top}']), or run the nodes in "
            "an image that has it (plugin_args['image']).\n")
    return "".join(out)
