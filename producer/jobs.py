"""Job ids and the connection to the job-state store, with broker errors turned into one line."""

from __future__ import annotations

import re
import secrets
import time
from typing import TYPE_CHECKING, Any

from workers.errors import BrokerError, ConfigError
from workers.redis_jobstore import RedisJobStore
from workers.settings import Settings, redact

if TYPE_CHECKING:
    from workers.sinks.redis import RedisRows

JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_job_id() -> str:
    """Sortable and unique: ``YYYYmmdd-HHMMSS-xxxxxx``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_job_id(job_id: str) -> str:
    """Letters, digits, ``-``, ``_`` and ``.`` (not first), at most 128: safe in keys, paths and shells."""
    if not JOB_ID.fullmatch(job_id):
        raise ConfigError(f"invalid job id {job_id!r}: use letters, digits, '-', '_' and '.' (at most 128, "
                          "starting with a letter or digit)")
    return job_id


def connect_store(settings: Settings) -> RedisJobStore:
    """The deployment's job store, its server having answered a ping, or ``BrokerError`` naming the URL
    (password hidden)."""
    store = RedisJobStore.from_settings(settings)
    ping(store.client, settings.state_url)
    return store


def connect_rows(settings: Settings) -> RedisRows:
    """The Redis sink's rows (``collect``, ``report``), its server having answered a ping."""
    from workers.sinks.redis import RedisRows

    rows = RedisRows.from_settings(settings)
    ping(rows.client, settings.redis_sink_url)
    return rows


def ping(client: Any, url: str) -> None:
    import redis

    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, redis.ResponseError) as exc:
        raise BrokerError(f"cannot reach Redis at {redact(url)}: {exc}") from exc
