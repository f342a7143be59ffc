"""EC2Plugin, where nipype users import it from: ``from nipype_s3.plugins.ec2 import
EC2Plugin`` (also ``from nipype_s3 import EC2Plugin``).

The plugin lives in :mod:`nipype_s3.backends.ec2` (instances, user-data, SQS queues) on
the backend-neutral core :mod:`nipype_s3.remote` (placement, staging, collection,
costs, the plugin base).
"""

from ..backends.ec2 import EC2Plugin, EC2Settings
from ..remote.costs import dispatch_summary
from ..remote.job import _Job
from ..remote.placement import (
    _cached_always_run,
    _credential_inputs,
    _input_paths,
    _orchestrates_instances,
    _output_targets,
    _writes_local_files,
)

__all__ = ["EC2Plugin", "EC2Settings", "dispatch_summary", "_Job", "_cached_always_run",
           "_credential_inputs", "_input_paths", "_orchestrates_instances", "_output_targets",
           "_writes_local_files"]
