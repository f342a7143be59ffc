"""What every nipype_s3 interface shares: S3 connection inputs, the bucket trait,
and keeping secrets out of what nipype records."""

from __future__ import annotations

import logging

from nipype.interfaces.base import BaseInterfaceInputSpec, Str, traits
from nipype.interfaces.base.traits_extension import Undefined, isdefined

from ..config import DEFAULT_MAX_CONCURRENCY, SECRET_ENV_VARS
from ..exceptions import ConfigurationError
from ..s3.bucketref import BucketRef
from ..s3.credentials import resolve_session
from ..s3.session import make_s3_client
from ..secrets import REDACTED

iflogger = logging.getLogger("nipype.interface")


class BucketTrait(traits.TraitType):
    """A bucket override: a boto3 ``Bucket`` object, or a bucket name.

    Stored as a :class:`~nipype_s3.s3.bucketref.BucketRef`, which nipype can deep-copy
    and pickle without the live object or any credential.
    """

    default_value = Undefined
    info_text = "a boto3 Bucket object or a bucket name"

    def validate(self, obj, name, value):
        if value is Undefined or not isdefined(value):
            return value
        try:
            return BucketRef.coerce(value)
        except ConfigurationError as exc:
            raise traits.TraitError(str(exc)) from exc


class S3ConnectionInputSpec(BaseInterfaceInputSpec):
    """The S3 connection inputs shared by nipype_s3 interfaces."""

    creds_path = Str(desc="path to a file with AWS keys: the root-account key file, the "
                     "IAM-user or console CSV, or an INI credentials file")
    profile = Str(desc="a named profile from the shared AWS config files")
    endpoint_url = Str(desc="an S3-compatible server (MinIO, Ceph, SeaweedFS, moto); "
                       "defaults to AWS_ENDPOINT_URL")
    region = Str(desc="the bucket's region; found from the bucket when not given")
    anon = traits.Bool(False, usedefault=True, desc="unsigned requests, for public buckets only")
    max_concurrency = traits.Range(1, 512, DEFAULT_MAX_CONCURRENCY, usedefault=True,
                                   nohash=True, desc="transfers in flight at once (tuning only)")
    progress = traits.Bool(False, usedefault=True, nohash=True,
                           desc="show a progress bar for transfers")


class S3InterfaceMixin:
    """Redacts secrets from the recorded environment and builds S3 clients."""

    def _pre_run_hook(self, runtime):
        runtime = super()._pre_run_hook(runtime)
        redact_environ(runtime.environ)
        return runtime

    def _opt(self, name):
        value = getattr(self.inputs, name, Undefined)
        return value if isdefined(value) else None

    def _s3_client(self, bucket: str):
        """A client for ``bucket``, honouring ``bucket`` overrides and every credential input."""
        ref = self._opt("bucket")
        max_conc = self._opt("max_concurrency") or DEFAULT_MAX_CONCURRENCY

        def build(name, endpoint_url=None, region=None):
            session = resolve_session(creds_path=self._opt("creds_path"),
                                      profile=self._opt("profile"))
            return make_s3_client(
                session, bucket=name,
                endpoint_url=self._opt("endpoint_url") or endpoint_url,
                region=self._opt("region") or region, anon=bool(self._opt("anon")),
                max_concurrency=max_conc)

        if isinstance(ref, BucketRef):
            return ref.client(build)
        return build(bucket)


def redact_environ(environ: dict) -> None:
    """Blank out credential variables in a recorded environment, in place."""
    if not environ:
        return
    for name in SECRET_ENV_VARS:
        if name in environ:
            environ[name] = REDACTED
