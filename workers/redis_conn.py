"""Every Redis connection the product makes (job state, the broker's keys, the Redis sink, the exporter) goes
through ``redis_client``, which applies TLS to ``rediss://`` URLs from one typed object.

TLS options come from the environment, named after the keys of Celery's ``broker_use_ssl``:
``BATCHINFER_REDIS_SSL_CA_CERTS`` (the CA bundle that signed the server's certificate; default: the system's),
``BATCHINFER_REDIS_SSL_CERTFILE`` and ``BATCHINFER_REDIS_SSL_KEYFILE`` (a client certificate, when the server
asks for one: ``tls-auth-clients yes``), ``BATCHINFER_REDIS_SSL_CERT_REQS`` (``required``, the default: the
server's certificate must verify; ``optional``; ``none`` turns verification off, for tests only).
"""

from __future__ import annotations

import functools
import os
import ssl
from dataclasses import dataclass
from typing import Any

from workers.errors import ConfigError

CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
TLS_SCHEME = "rediss://"


@dataclass(frozen=True)
class RedisTLS:
    """TLS options of ``rediss://`` connections (see the module docstring)."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"

    @classmethod
    def from_env(cls, env: dict[str, str]) -> RedisTLS:
        tls = cls(ca_certs=readable_file(env, "BATCHINFER_REDIS_SSL_CA_CERTS"),
                  certfile=readable_file(env, "BATCHINFER_REDIS_SSL_CERTFILE"),
                  keyfile=readable_file(env, "BATCHINFER_REDIS_SSL_KEYFILE"),
                  cert_reqs=(env.get("BATCHINFER_REDIS_SSL_CERT_REQS") or "required").strip().lower())
        if tls.cert_reqs not in CERT_REQS:
            raise ConfigError(f"BATCHINFER_REDIS_SSL_CERT_REQS must be one of {', '.join(CERT_REQS)}, "
                              f"got {tls.cert_reqs!r}")
        if tls.keyfile and not tls.certfile:
            raise ConfigError("BATCHINFER_REDIS_SSL_KEYFILE needs BATCHINFER_REDIS_SSL_CERTFILE (the client "
                              "certificate)")
        return tls

    def redis_kwargs(self) -> dict[str, Any]:
        """redis-py's ``ssl_*`` arguments."""
        out: dict[str, Any] = {"ssl_cert_reqs": self.cert_reqs}
        for name in ("ca_certs", "certfile", "keyfile"):
            if getattr(self, name):
                out[f"ssl_{name}"] = getattr(self, name)
        return out

    def celery(self) -> dict[str, Any]:
        """Celery's ``broker_use_ssl`` (the same names, with the ``ssl`` module's constant)."""
        return {**self.redis_kwargs(), "ssl_cert_reqs": CERT_REQS[self.cert_reqs]}


def readable_file(env: dict[str, str], name: str) -> str | None:
    """The file the variable ``name`` names, None when unset, or ``ConfigError`` when it cannot be read."""
    path = (env.get(name) or "").strip()
    if not path:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"{name}: cannot read {path}")
    return path


def redis_client(url: str, tls: RedisTLS | None = None, **kwargs: Any) -> Any:
    """A ``redis.Redis`` for ``url``; a ``rediss://`` URL gets ``tls`` (default: verify against the system CAs)."""
    import redis

    if url.startswith(TLS_SCHEME):
        kwargs = {**(tls or RedisTLS()).redis_kwargs(), **kwargs}
    return redis.Redis.from_url(url, **kwargs)


@functools.lru_cache(maxsize=16)
def shared_client(url: str, tls: RedisTLS | None = None) -> Any:
    """One client per URL for the life of the process, for what runs once per shard (the Redis sink): its pool
    keeps the connections open instead of a new one, and with ``rediss://`` a TLS handshake, every shard.
    redis-py's pool notices a fork and opens new connections in the child."""
    return redis_client(url, tls)
