"""One node sent to run remote, as the controller keeps track of it."""

from __future__ import annotations

from dataclasses import dataclass

import botocore.exceptions

_AWS_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


@dataclass
class _Job:
    taskid: int
    job_id: str
    node: object
    node_dir: str
    submitted: float
    n_procs: int
    mem_gb: float
    remote: bool = True
    done: bool = False
    report: dict | None = None
    instance_type: str = ""
    #: the backend's key of where it runs (instance type and image on EC2)
    fleet: str = ""
    #: the upload of its inputs, pickle and spec and the queue message, while under way
    sending: object = None
    #: the folders among its inputs and the paths it is told to write: what it writes
    #: there comes back (nowhere else)
    writable: tuple = ()
    #: when an agent said it started it (a signed event)
    started: float | None = None
    #: an agent said it finished (a signed event); times it was sent again
    reported: bool = False
    resent: int = 0
