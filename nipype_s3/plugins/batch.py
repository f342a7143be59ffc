"""BatchPlugin, where nipype users import it from: ``from nipype_s3.plugins.batch import
BatchPlugin`` (also ``from nipype_s3 import BatchPlugin``, and ``plugin="Batch"``).

The plugin lives in :mod:`nipype_s3.backends.batch` on the backend-neutral core
:mod:`nipype_s3.remote`.
"""

from ..backends.batch import BatchPlugin
from ..backends.batch.settings import BatchSettings

__all__ = ["BatchPlugin", "BatchSettings"]
