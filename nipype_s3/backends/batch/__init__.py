"""The AWS Batch backend: BatchPlugin (agents as Batch jobs), and what it runs on
(``setup``/``teardown`` of a job queue, the same as a CloudFormation template)."""

from .environment import BatchEnvironment, cloudformation_template
from .plugin import BatchPlugin
from .setup import setup, teardown

__all__ = ["BatchPlugin", "BatchEnvironment", "setup", "teardown",
           "cloudformation_template"]
