"""Make S3 clients: endpoint, region, retries, timeouts and a pool sized to the work."""

from __future__ import annotations

import collections.abc
import contextlib
import datetime as _dt
import gc
import logging
import os
import re
import threading
from urllib.parse import urlsplit

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.utils
from botocore import UNSIGNED
from botocore.config import Config

from .. import config as cfg
from ..exceptions import ConfigurationError
from .errors import s3_errors

__all__ = ["make_s3_client", "bucket_region", "check_endpoint_url", "client_config", "endpoint_of",
           "signs_payloads"]

logger = logging.getLogger(__name__)

_region_cache: dict[tuple[str | None, str], str] = {}
_region_lock = threading.Lock()


def signs_payloads(endpoint_url: str | None) -> bool:
    """Whether request bodies sent to ``endpoint_url`` are hashed into their signature.

    Only over plain HTTP, where the SHA-256 in the signature is the one thing that lets
    the server notice a body changed on the way. Over HTTPS (AWS itself, or an ``https``
    endpoint) TLS already guarantees that, and the hash costs a second read of every
    byte plus about 1.5 s of CPU per GiB. botocore would hash every S3 body we send,
    HTTPS included, because we leave out the CRC checksums many S3-compatible stores
    reject; requests are signed with ``UNSIGNED-PAYLOAD`` instead, as the AWS SDKs do
    for S3 over HTTPS.
    """
    return not (endpoint_url or "https://").lower().startswith("https://")


def client_config(*, max_concurrency: int = cfg.DEFAULT_MAX_CONCURRENCY, anon: bool = False,
                  region: str | None = None, sign_payloads: bool = True) -> Config:
    """botocore ``Config`` for our clients.

    Adaptive retries with backoff, bounded connect and read timeouts (a stalled
    connection ends in a retry, never a hang) and a connection pool large enough for
    ``max_concurrency`` transfers at once. ``sign_payloads=False`` leaves S3 request
    bodies out of the signature (see :func:`signs_payloads`).
    """
    kwargs = dict(
        retries={"mode": "adaptive", "max_attempts": cfg.max_attempts()},
        connect_timeout=cfg.DEFAULT_CONNECT_TIMEOUT,
        read_timeout=cfg.read_timeout(),
        max_pool_connections=max(10, int(max_concurrency) + 4),
        tcp_keepalive=True,
        region_name=region,
        # checksums only where an operation requires them: S3-compatible stores
        # (and older moto) reject or ignore the newer default CRC headers.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if anon:
        kwargs["signature_version"] = UNSIGNED
    if not sign_payloads:
        kwargs["s3"] = {"payload_signing_enabled": False}
    return Config(**kwargs)


def _drop_expect_header(request, **kwargs) -> None:
    # botocore sends "Expect: 100-continue" for larger bodies and can wait forever when
    # a connection closes right after the interim status line. The header is not
    # signed, so dropping it is safe; the body is simply sent at once.
    request.headers.pop("Expect", None)


def fast_timestamp(value):
    """Parse an S3 timestamp: ISO 8601 directly, anything else as botocore does.

    A LIST answer has one timestamp per key, and botocore's general parser (dateutil)
    spends most of the time of parsing it (measured: 0.13 s of 0.18 s for 500 keys).
    The datetime is aware, in UTC; the same instant botocore gives (in local time).
    """
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T":
        text = value[:-1] + "+00:00" if value.endswith("Z") else value
        try:
            parsed = _dt.datetime.fromisoformat(text)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return botocore.utils.parse_timestamp(value)


def _use_fast_timestamps(session: boto3.Session) -> None:
    try:
        factory = session._session.get_component("response_parser_factory")
        factory.set_parser_defaults(timestamp_parser=fast_timestamp)
    except Exception as exc:  # noqa: BLE001 - a speed-up only
        logger.debug("kept botocore's timestamp parser: %s", exc)


@contextlib.contextmanager
def paused_gc():
    """No cyclic garbage collection inside the block (restored after, if it was on).

    Building a client loads botocore's S3 model: some 35,000 new dicts and lists, all
    kept. Each batch of them sets off the collector, which walks every object in the
    process; with nipype and numpy loaded that is most of the time (measured: 0.15 s for
    the first client, 0.06 s with collection paused). Nothing cyclic is left behind, so
    there is nothing for the collector to find.
    """
    enabled = gc.isenabled()
    made = gc.get_count()[0]
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_count()[0] - made > _MANY_OBJECTS:  # a model loaded, not a few
                _promote_young_objects()
            gc.enable()


#: Objects made in a :func:`paused_gc` block above which they are promoted at once (a
#: client whose model was already loaded makes a few thousand).
_MANY_OBJECTS = 10_000


def _promote_young_objects() -> None:
    """Move every object the collector tracks into its oldest generation.

    The model objects just made live as long as the process (the loader caches them),
    yet would each be walked once by a young collection and once more by a middle one
    before reaching the oldest generation (measured: 15 to 20 ms of a 0.45 s grab of
    500 files). ``freeze`` then ``unfreeze`` moves the young generations into the
    oldest in one step; nothing becomes uncollectable, and full collections still see
    everything. Skipped when anything is frozen already (a server preparing to fork, or
    Python 3.12, which starts with a few hundred objects of its own frozen): ``unfreeze``
    would release those too.
    """
    if not hasattr(gc, "freeze") or gc.get_freeze_count():
        return
    gc.freeze()
    gc.unfreeze()


_loaders: dict[tuple, object] = {}


def _share_loader(session: boto3.Session) -> None:
    """Give ``session`` the process's botocore data loader, so models load once.

    Each node makes its own session (its own credentials), and a new session loads and
    parses the S3 model again (measured: 0.07 s a client; 0.01 s with the loader
    shared). A loader only caches the read-only JSON it finds on its search path, so
    sessions whose loaders are of the same kind with the same search path
    (``AWS_DATA_PATH``, or paths a user added) can share one. A loader of botocore's own
    kind becomes a :class:`_QuickLoader`.
    """
    try:
        core = session._session
        own = core.get_component("data_loader")
        key = (type(own), tuple(own.search_paths))
        with _region_lock:
            shared = _loaders.setdefault(key, own)
            if type(shared) is botocore.loaders.Loader and \
                    hasattr(shared, "_potential_locations"):
                shared.__class__ = _QuickLoader  # the same loader, one method quicker
        if shared is not own:
            core.register_component("data_loader", shared)
    except Exception as exc:  # noqa: BLE001 - a speed-up only
        logger.debug("botocore data loader not shared: %s", exc)


class _QuickLoader(botocore.loaders.Loader):
    """botocore's loader, answering "is there such a service?" without listing them all.

    Loading a model first checks that the service is in the list of every service on
    the search path: some 2,900 ``stat`` calls, 18 ms of the 73 ms a fresh process spent
    making its first S3 client (measured: 53 ms with this). The list given here looks up
    only the name asked about, in the same places; anything else asked of it (its length,
    its items) is botocore's own list, made then.
    """

    def list_available_services(self, type_name):
        return _ServiceNames(self, type_name)


class _ServiceNames(collections.abc.Sequence):
    """The services with a ``type_name`` model, as botocore lists them; ``in`` is quick."""

    def __init__(self, loader, type_name: str) -> None:
        self._loader = loader
        self._type_name = type_name
        self._names: list | None = None

    def __contains__(self, name) -> bool:
        try:
            for folder in self._loader._potential_locations(name, is_dir=True):
                for version in os.listdir(folder):
                    if self._loader.file_loader.exists(
                            os.path.join(folder, version, self._type_name)):
                        return True
            return False
        except Exception:  # noqa: BLE001 - botocore's own list decides instead
            return name in self._all()

    def _all(self) -> list:
        if self._names is None:
            self._names = botocore.loaders.Loader.list_available_services(
                self._loader, self._type_name)
        return self._names

    def __getitem__(self, index):
        return self._all()[index]

    def __len__(self) -> int:
        return len(self._all())


def check_endpoint_url(url: str) -> str:
    """``url`` if it is an ``http(s)://host[:port]`` URL, else a ``ConfigurationError``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        hint = f" (did you mean 'http://{url}' or 'https://{url}'?)" if "://" not in url else ""
        raise ConfigurationError(
            f"S3 endpoint {url!r} is not an http:// or https:// URL{hint}. Set endpoint_url "
            "(or AWS_ENDPOINT_URL) to the server's URL, e.g. 'http://127.0.0.1:9000'.")
    return url


def endpoint_of(client) -> str | None:
    """The custom endpoint URL of a client, or ``None`` for AWS's own endpoints."""
    url = getattr(client.meta, "endpoint_url", None) or ""
    return None if url.endswith(".amazonaws.com") or "amazonaws.com" in url else url


def bucket_region(bucket: str, session: boto3.Session, *, anon: bool = False,
                  endpoint_url: str | None = None) -> str:
    """Find the region a bucket lives in (one ``HeadBucket``, cached per process).

    For a custom endpoint (MinIO, SeaweedFS, moto...) the session's region, or
    ``us-east-1``, is returned without a request.
    """
    if endpoint_url:
        return session.region_name or "us-east-1"
    key = (None, bucket)
    with _region_lock:
        if key in _region_cache:
            return _region_cache[key]
    probe = session.client("s3", region_name="us-east-1",
                           config=client_config(anon=anon, region="us-east-1"))
    region = None
    try:
        resp = probe.head_bucket(Bucket=bucket)
        region = resp["ResponseMetadata"]["HTTPHeaders"].get("x-amz-bucket-region")
    except botocore.exceptions.ClientError as exc:
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
        region = headers.get("x-amz-bucket-region")
        if not region:
            with s3_errors(bucket=bucket, action="find the region of"):
                raise
    region = region or "us-east-1"
    with _region_lock:
        _region_cache[key] = region
    logger.debug("bucket %s is in region %s", bucket, region)
    return region


def make_s3_client(session: boto3.Session, *, bucket: str | None = None,
                   endpoint_url: str | None = None, region: str | None = None,
                   anon: bool = False, max_concurrency: int = cfg.DEFAULT_MAX_CONCURRENCY):
    """An S3 client for ``bucket``.

    Parameters
    ----------
    session : boto3.Session
        From :func:`nipype_s3.s3.credentials.resolve_session`.
    bucket : str, optional
        When given and ``region`` is not, the region is found from the bucket.
    endpoint_url : str, optional
        An S3-compatible server; defaults to ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``.
    region : str, optional
        The bucket's region.
    anon : bool
        Unsigned requests, for public buckets.
    max_concurrency : int
        Transfers at once; sizes the connection pool.
    """
    endpoint_url = endpoint_url or cfg.env_endpoint_url()
    if endpoint_url:
        check_endpoint_url(endpoint_url)
    if not region:
        if bucket and not endpoint_url:
            region = bucket_region(bucket, session, anon=anon)
        else:
            region = session.region_name or "us-east-1"
    _use_fast_timestamps(session)
    _share_loader(session)
    sign = signs_payloads(endpoint_url)
    with paused_gc():
        client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=client_config(max_concurrency=max_concurrency, anon=anon, region=region,
                                 sign_payloads=sign))
        if not sign and signs_payloads(client.meta.endpoint_url):
            # plain HTTP after all (an endpoint from the shared config file): sign bodies
            client = session.client(
                "s3", endpoint_url=endpoint_url, region_name=region,
                config=client_config(max_concurrency=max_concurrency, anon=anon,
                                     region=region))
    client.meta.events.register("before-send.s3", _drop_expect_header)
    client.meta.events.register_first("needs-retry.s3", _tls_misconfiguration_is_final)
    return client


#: TLS failures that no retry mends: an untrusted or mismatched certificate, or TLS
#: spoken to a plain-HTTP port.
_TLS_FINAL = re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|"
                        r"WRONG_VERSION_NUMBER|doesn't match|IP address mismatch|"
                        r"Hostname mismatch", re.IGNORECASE)


def _tls_misconfiguration_is_final(caught_exception=None, **kwargs):
    """Stop botocore retrying a TLS setup that cannot work (``needs-retry`` handler).

    botocore counts every ``SSLError`` as transient, so a self-signed certificate or an
    ``https://`` URL for a plain-HTTP server took eight attempts and ~50 s of backoff
    before its error. Those answers never change: the error is raised at once (and then
    explained by :func:`~nipype_s3.s3.errors.translate`). Other TLS errors (a connection
    dropped during the handshake) are retried as before.
    """
    if isinstance(caught_exception, botocore.exceptions.SSLError) and \
            _TLS_FINAL.search(str(caught_exception)):
        raise caught_exception
    return None
