"""Start a job's worker as a fork of the agent, whose imports are already done.

A fresh ``python -m nipype_s3.agent.worker`` spends one to two seconds importing nipype,
numpy and boto3 before it does anything, on every job. The agent imports them once
(:func:`preload`), with numeric libraries limited to one thread, and each one-CPU job
then runs in a child forked from it: it starts in milliseconds. Jobs asking for more
than one CPU still get a fresh interpreter, so their thread pools are sized for them.

A fork is only used while the agent has no other thread (a fork copies only the calling
thread, and a lock held by another would stay locked in the child).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback

__all__ = ["ForkedWorker", "preload", "can_fork"]

logger = logging.getLogger("nipype_s3.agent")

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_PRELOAD = ("numpy", "nibabel", "nipype.pipeline.engine", "nipype.interfaces.utility",
            "nipype.interfaces.io", "boto3", "nipype_s3.agent.worker", "nipype_s3.agent.runner",
            "nipype_s3.s3.cas", "nipype_s3.pickles")
_preloaded = False


def preload() -> bool:
    """Import what every worker needs, once, in the agent. True when it worked."""
    global _preloaded
    if _preloaded:
        return True
    for name in _THREAD_VARS:  # one-CPU jobs: no numeric thread pool to copy at fork
        os.environ.setdefault(name, "1")
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    import importlib

    try:
        for module in _PRELOAD:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - workers then start fresh interpreters
        logger.warning("could not preload %s (%s): each job starts a fresh interpreter",
                       module, exc)
        return False
    _preloaded = True
    if _os_threads() > 1:
        logger.info("this agent runs %d threads (a numeric library's pool: start it with "
                    "OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1): each job starts a fresh "
                    "interpreter", _os_threads())
    return True


def can_fork() -> bool:
    """A fork is safe now: preloaded, POSIX, and this is the process's only thread."""
    return _preloaded and hasattr(os, "fork") and threading.active_count() == 1 \
        and _os_threads() <= 1


def _os_threads() -> int:
    """Threads of this process as the OS sees them (native libraries' included)."""
    try:
        return len(os.listdir(f"/proc/{os.getpid()}/task"))
    except OSError:  # not Linux: Python's own count is what there is
        return threading.active_count()


class ForkedWorker:
    """A worker forked from the agent; ``poll``/``kill``/``wait`` like ``subprocess.Popen``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    @classmethod
    def start(cls, spec_path: str, outcome_path: str, log_path: str, cwd: str,
              env: dict, forget=None) -> ForkedWorker:
        """Fork a worker; in the child, ``forget()`` runs first (the agent wipes the
        run's signing key there: the node's code has no business with it)."""
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        try:
            pid = os.fork()
        except OSError:  # no memory or process slot: the caller starts an interpreter
            os.close(log_fd)
            os.close(null_fd)
            raise
        if pid == 0:  # the child: never returns
            code = 1
            try:
                if forget is not None:
                    forget()
                os.dup2(null_fd, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.close(log_fd)
                os.close(null_fd)
                # Python-level streams onto the new descriptors (the agent's may be
                # wrappers around something else)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                logging.getLogger().handlers.clear()  # the agent's log is not the job's
                os.environ.update(env)
                os.chdir(cwd)
                from .worker import main

                code = main([spec_path, outcome_path])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the job's log
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        os.close(log_fd)
        os.close(null_fd)
        return cls(pid)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        while self.poll() is None:
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = -1
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
