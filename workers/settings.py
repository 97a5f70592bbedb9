"""Process configuration from the environment, in one typed object shared by producer and workers.

One ``export BATCHINFER_BROKER_URL=...`` configures a whole machine: the producer, the workers and
the collector all read it. Secrets (Redis passwords) live only in these URLs, never in task messages.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace

from workers.confine import ANYWHERE, NOWHERE, Roots, trusted_models
from workers.errors import ConfigError
from workers.keys import DEFAULT_NAMESPACE
from workers.redis_conn import RedisTLS, readable_file
from workers.signing import Signing

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
REDIS_SCHEMES = ("redis", "rediss", "unix")  # what redis-py's from_url and kombu's Redis transport take


_SECRET_PARAM = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|secret|token)[^=&]*=)[^&]*")
# a URL in free text, without the punctuation that ends its sentence
_URL_IN_TEXT = re.compile(r"\b(?:rediss?|unix|amqps?|sentinel)://[^\s'\"<>]*[^\s'\"<>.,:;)]")


def redact(url: str) -> str:
    """The URL without its secrets, for messages and logs: the password of ``user:password@`` (a lone userinfo
    too, which some clients read as a password) and the values of query parameters such as ``password=``."""
    head, q, query = url.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep and "@" in rest.partition("/")[0]:
        creds, host = rest.split("@", 1) if "/" not in rest.partition("@")[0] else (None, rest)
        if creds is not None:
            user, colon, _ = creds.partition(":")
            head = f"{scheme}://{user}:***@{host}" if colon else f"{scheme}://***@{host}"
    return head + q + _SECRET_PARAM.sub(r"\1***", query)


def redact_text(text: str) -> str:
    """Every Redis or AMQP URL in ``text`` redacted (a message quoting a URL it was given)."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


class RedactSecrets(logging.Filter):
    """Redacts the URLs in a log record's message (installed on the worker's log handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact_text(message), None
        return True


def normalized_redis_url(url: str) -> str:
    """``?password=`` (and ``?username=``) moved into the URL's userinfo: redis-py reads both forms, but kombu's
    URL parser fails on the query form, and one form is simpler to keep secret."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    found = {k: v for k, v in params if k in ("password", "username")}
    if not found or "@" in parts.netloc or parts.scheme == "unix":
        return url
    user = quote(found.get("username", ""), safe="")
    password = quote(found["password"], safe="") if "password" in found else None
    userinfo = user + (f":{password}" if password is not None else "")
    query = urlencode([(k, v) for k, v in params if k not in found])
    return urlunsplit((parts.scheme, f"{userinfo}@{parts.netloc}", parts.path, query, parts.fragment))


def with_password(url: str, password: str | None) -> str:
    """``url`` with ``password`` added when it has none of its own (``BATCHINFER_REDIS_PASSWORD_FILE``: a
    secret mounted as a file, so the URL in the environment names the user but holds no secret)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if password is None or parts.password is not None or "password=" in parts.query:
        return url
    secret = quote(password, safe="")
    if parts.scheme == "unix":  # no host to put userinfo before: redis-py reads the query parameter
        return f"{url}{'&' if '?' in url else '?'}password={secret}"
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit((parts.scheme, f"{user}:{secret}@{host}", parts.path, parts.query, parts.fragment))


def _password_file(env: dict[str, str]) -> str | None:
    path = readable_file(env, "BATCHINFER_REDIS_PASSWORD_FILE")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            password = fh.read().rstrip("\n")  # as the shell reads it (infra/redis/render-acl.sh)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"BATCHINFER_REDIS_PASSWORD_FILE: cannot read {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if not password:
        raise ConfigError(f"BATCHINFER_REDIS_PASSWORD_FILE: {path} is empty")
    return password


def check_redis_url(url: str, what: str) -> str:
    """A Redis URL, or ``ConfigError`` naming where it came from (the broker and job state are Redis)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES or not rest:
        shown = redact(url)
        raise ConfigError(f"{what} must be a Redis URL (redis://HOST:PORT/DB, rediss:// or unix://), got {shown!r}")
    return normalized_redis_url(url)


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def _positive(env: dict[str, str], name: str, default: int, least: int = 1) -> int:
    value = _int(env, name, default)
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, got {value}")
    return value


def _flag(env: dict[str, str], name: str) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise ConfigError(f"{name} must be 1 or 0, got {raw!r}")


def _ports(env: dict[str, str], name: str) -> tuple[int, int] | None:
    """``9808`` or a range ``9808-9815`` (several workers on one host take the first free port of it)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    low, dash, high = raw.partition("-")
    try:
        ports = (int(low), int(high if dash else low))
    except ValueError:
        raise ConfigError(f"{name} must be a port (9808) or a range (9808-9815), got {raw!r}") from None
    if not 0 < ports[0] <= ports[1] < 65536:
        raise ConfigError(f"{name} must be a port from 1 to 65535 or a rising range of them, got {raw!r}")
    return ports


NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _namespace(raw: str | None) -> str | None:
    """Letters, digits, ``_``, ``.`` and ``-``: safe in an ACL key pattern (no glob characters, no ``:``)."""
    value = (raw or "").strip()
    if value and not NAMESPACE.fullmatch(value):
        raise ConfigError(f"BATCHINFER_NAMESPACE must be letters, digits, '_', '.' and '-' (at most 64, starting "
                          f"with a letter or digit), got {value!r}")
    return value or None


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Environment configuration; see the README's table of variables.

    The failure settings: a running shard's lease lasts ``lease_seconds`` and is renewed every
    ``heartbeat_seconds`` (also how often each worker looks for expired leases and due shards); a shard
    gets ``max_attempts`` deliveries; a failed attempt is retried after ``retry_backoff`` x 4^(n-1)
    seconds (at most ``retry_backoff_max``, +-25 % jitter); an attempt running past ``shard_time_limit``
    seconds is failed like a crash; a finished job's state is kept ``retention`` seconds.

    The http(s) settings (``workers.storage.http*``): ``http_timeout`` seconds to connect and between bytes
    received (also the longest wait between retries), ``http_retries`` retries of a request that failed
    to connect, timed out or got 429/5xx, at most ``http_max_redirects`` redirects, and responses larger
    than ``http_max_bytes`` are refused.

    ``metrics_ports`` (``BATCHINFER_METRICS_PORT``: a port or a range): a worker serves Prometheus metrics there,
    on ``metrics_host``; unset, it serves none.

    ``redis_tls``: the TLS options of ``rediss://`` URLs (``workers.redis_conn``).

    ``namespace`` (``BATCHINFER_NAMESPACE``): the prefix of every Redis key of this deployment (``workers.keys``),
    ``batchinfer`` when unset; once set, the broker's keys move under ``{namespace}:broker:`` too (kombu's
    ``global_keyprefix``), so deployments sharing a Redis server are kept apart by ACL key patterns.

    ``signing``: the key, certificate and trusted certificates of signed messages (``workers.signing``);
    off unless ``BATCHINFER_SIGNING_KEY``, ``_CERT`` and ``_CERTS`` are all set.

    ``torch_compile`` (``BATCHINFER_TORCH_COMPILE=1``): on the torch backend, ``torch.compile`` the model's
    call (slower start, often faster batches on a GPU); the other backends always compile.

    Confinement (``workers.confine``): ``allowed_roots`` (``BATCHINFER_ALLOWED_ROOTS``: local folders, ``s3://``
    and ``http(s)://`` prefixes) are the only places a task may make a worker read or write, anywhere when
    unset; ``trusted_models`` (``BATCHINFER_TRUST_MODELS``: ``1`` or local folders) are the model files that may
    run their own code (SavedModels, Lambda layers), none when unset.
    """

    broker_url: str = DEFAULT_BROKER_URL
    state_url: str = DEFAULT_BROKER_URL
    redis_sink_url: str = DEFAULT_BROKER_URL
    queue: str = "batchinfer"
    visibility_timeout: int = 6 * 3600
    io_threads: int = 8
    model_cache_size: int = 2
    lease_seconds: int = 60
    heartbeat_seconds: int = 10
    max_attempts: int = 3
    retry_backoff: int = 60
    retry_backoff_max: int = 900
    shard_time_limit: int = 3600
    retention: int = 7 * 24 * 3600
    spool: str | None = None
    http_timeout: float = 10.0
    http_retries: int = 3
    http_max_redirects: int = 5
    http_max_bytes: int = 50 << 20
    torch_compile: bool = False
    metrics_ports: tuple[int, int] | None = None
    metrics_host: str = "0.0.0.0"
    redis_tls: RedisTLS = RedisTLS()
    namespace_set: str | None = None  # BATCHINFER_NAMESPACE as given (None: the default, broker keys unprefixed)
    signing: Signing = Signing()
    # confinement (workers.confine)
    allowed_roots: Roots = ANYWHERE
    trusted_models: Roots = NOWHERE

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        password = _password_file(env)
        broker = env.get("BATCHINFER_BROKER_URL") or DEFAULT_BROKER_URL
        state = env.get("BATCHINFER_STATE_URL") or broker
        return cls(
            broker_url=with_password(broker, password),
            state_url=with_password(state, password),
            redis_sink_url=with_password(env.get("BATCHINFER_REDIS_URL") or state, password),
            queue=env.get("BATCHINFER_QUEUE") or "batchinfer",
            visibility_timeout=_positive(env, "BATCHINFER_VISIBILITY_TIMEOUT", 6 * 3600),
            io_threads=_positive(env, "BATCHINFER_IO_THREADS", 8),
            model_cache_size=_positive(env, "BATCHINFER_MODEL_CACHE_SIZE", 2),
            lease_seconds=_positive(env, "BATCHINFER_LEASE_SECONDS", 60),
            heartbeat_seconds=_positive(env, "BATCHINFER_HEARTBEAT_SECONDS", 10),
            max_attempts=_positive(env, "BATCHINFER_MAX_ATTEMPTS", 3),
            retry_backoff=_positive(env, "BATCHINFER_RETRY_BACKOFF", 60),
            retry_backoff_max=_positive(env, "BATCHINFER_RETRY_BACKOFF_MAX", 900),
            shard_time_limit=_positive(env, "BATCHINFER_SHARD_TIME_LIMIT", 3600),
            retention=_positive(env, "BATCHINFER_RETENTION", 7 * 24 * 3600),
            spool=env.get("BATCHINFER_SPOOL") or None,
            http_timeout=_seconds(env, "BATCHINFER_HTTP_TIMEOUT", 10.0),
            http_retries=_positive(env, "BATCHINFER_HTTP_RETRIES", 3, least=0),
            http_max_redirects=_positive(env, "BATCHINFER_HTTP_MAX_REDIRECTS", 5, least=0),
            http_max_bytes=_positive(env, "BATCHINFER_HTTP_MAX_BYTES", 50 << 20),
            torch_compile=_flag(env, "BATCHINFER_TORCH_COMPILE"),
            metrics_ports=_ports(env, "BATCHINFER_METRICS_PORT"),
            metrics_host=env.get("BATCHINFER_METRICS_HOST") or "0.0.0.0",
            redis_tls=RedisTLS.from_env(env),
            namespace_set=_namespace(env.get("BATCHINFER_NAMESPACE")),
            signing=Signing.from_env(env),
            allowed_roots=Roots.parse(env.get("BATCHINFER_ALLOWED_ROOTS"), "BATCHINFER_ALLOWED_ROOTS"),
            trusted_models=trusted_models(env.get("BATCHINFER_TRUST_MODELS")),
        ).checked()

    def checked(self) -> Settings:
        """Every value usable, or ``ConfigError`` with one line naming the variable."""
        checked = replace(self, broker_url=check_redis_url(self.broker_url, "BATCHINFER_BROKER_URL"),
                          state_url=check_redis_url(self.state_url, "BATCHINFER_STATE_URL"),
                          redis_sink_url=check_redis_url(self.redis_sink_url, "BATCHINFER_REDIS_URL"))
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ConfigError(f"BATCHINFER_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be at most half of "
                             f"BATCHINFER_LEASE_SECONDS ({self.lease_seconds}), or live shards would lose their lease")
        return checked

    @property
    def namespace(self) -> str:
        """The prefix of this deployment's Redis keys."""
        return self.namespace_set or DEFAULT_NAMESPACE

    @property
    def broker_prefix(self) -> str:
        """kombu's ``global_keyprefix``: the broker's keys under the namespace, once one is set."""
        return f"{self.namespace_set}:broker:" if self.namespace_set else ""

    def backoff(self, attempt: int, jitter: float = 0.5) -> float:
        """Seconds to wait before retrying after failed attempt number ``attempt`` (1-based)."""
        import random

        base = min(self.retry_backoff_max, self.retry_backoff * 4 ** max(attempt - 1, 0))
        return base * (1 + jitter * (random.random() - 0.5))
