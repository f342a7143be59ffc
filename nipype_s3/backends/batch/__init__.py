"""The AWS Batch backend: BatchPlugin (agents as Batch jobs)."""

from .plugin import BatchPlugin

__all__ = ["BatchPlugin"]
