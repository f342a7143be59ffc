"""The agent that runs a run's jobs on an instance (``python -m nipype_s3.agent``)."""

from .config import AgentConfig
from .main import Agent, main

__all__ = ["Agent", "AgentConfig", "main"]
