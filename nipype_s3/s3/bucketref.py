"""A bucket handed in by the user, made safe to deep-copy and to pickle.

nipype deep-copies every node when a workflow runs, and MultiProc pickles nodes to its
worker processes. A ``boto3`` ``Bucket`` object survives neither, and a pickled one
would carry credentials. :class:`BucketRef` keeps the live object in a per-process
registry and pickles only the bucket's name, endpoint and region plus a random token:

* in the process that made it (Linear) and in forked workers (MultiProc on Linux), the
  token finds the very same ``Bucket`` object again, with its client and credentials;
* anywhere else, a client is rebuilt from the name, endpoint and region with the
  ordinary credentials resolver (``creds_path``/``profile``/default chain).
"""

from __future__ import annotations

import threading
import uuid

from ..exceptions import ConfigurationError
from .session import endpoint_of
from .uri import validate_bucket_name

__all__ = ["BucketRef"]

_registry: dict[str, object] = {}
_lock = threading.Lock()


class BucketRef:
    """A bucket name, where to reach it, and (in this process) the user's live object."""

    __slots__ = ("name", "endpoint_url", "region", "_token")

    def __init__(self, name: str, *, endpoint_url: str | None = None,
                 region: str | None = None, live: object | None = None,
                 _token: str | None = None) -> None:
        self.name = validate_bucket_name(name)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self._token = _token
        if live is not None:
            self._token = uuid.uuid4().hex
            with _lock:
                _registry[self._token] = live

    @classmethod
    def coerce(cls, value: object) -> BucketRef:
        """A ``BucketRef`` from a ``BucketRef``, a bucket name, or a boto3 ``Bucket``."""
        if isinstance(value, BucketRef):
            return value
        if isinstance(value, str):
            return cls(value)
        client = getattr(getattr(value, "meta", None), "client", None)
        name = getattr(value, "name", None)
        if client is None or not isinstance(name, str):
            raise ConfigurationError(
                f"bucket must be a boto3 Bucket (boto3.resource('s3').Bucket('name')) or a "
                f"bucket name, not {type(value).__name__}.")
        return cls(name, endpoint_url=endpoint_of(client),
                   region=getattr(client.meta, "region_name", None), live=value)

    @property
    def live(self) -> object | None:
        """The user's ``Bucket`` object, when this process has it."""
        if self._token is None:
            return None
        with _lock:
            return _registry.get(self._token)

    def client(self, make_client):
        """The live object's client, else ``make_client(name, endpoint_url, region)``."""
        live = self.live
        if live is not None:
            return live.meta.client
        return make_client(self.name, self.endpoint_url, self.region)

    # -- copying and pickling: never the live object, never a credential -------------
    def __getstate__(self):
        return {"name": self.name, "endpoint_url": self.endpoint_url,
                "region": self.region, "_token": self._token}

    def __setstate__(self, state):
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __eq__(self, other):
        return isinstance(other, BucketRef) and (self.name, self.endpoint_url, self.region) \
            == (other.name, other.endpoint_url, other.region)

    def __hash__(self):
        return hash((self.name, self.endpoint_url, self.region))

    def __repr__(self) -> str:
        # Stable across runs (nipype hashes inputs through their repr): no token here.
        extra = "".join(f", {k}={v!r}" for k, v in
                        (("endpoint_url", self.endpoint_url), ("region", self.region)) if v)
        return f"BucketRef({self.name!r}{extra})"

    __str__ = __repr__

