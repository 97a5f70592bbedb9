"""Job ids and the connection to the job-state store, with broker errors turned into one line."""

from __future__ import annotations

import secrets
import time

from workers.errors import BrokerError
from workers.jobstate import RedisJobStore


def new_job_id() -> str:
    """Sortable and unique: ``YYYYmmdd-HHMMSS-xxxxxx``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user + ':' if user else ':'}***@{host}"
    return url


def connect_store(url: str) -> RedisJobStore:
    """A job store whose server answered a ping, or ``BrokerError`` naming the URL (password hidden)."""
    import redis

    store = RedisJobStore.from_url(url)
    try:
        store.client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, redis.ResponseError) as exc:
        raise BrokerError(f"cannot reach Redis at {redact(url)}: {exc}") from exc
    return store
