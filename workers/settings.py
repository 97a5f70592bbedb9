"""Process configuration from the environment, in one typed object shared by producer and workers.

One ``export BATCHINFER_BROKER_URL=...`` configures a whole machine: the producer, the workers and
the collector all read it. Secrets (Redis passwords) live only in these URLs, never in task messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_BROKER_URL = "redis://localhost:6379/0"


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Environment configuration; see the README's table of variables."""

    broker_url: str = DEFAULT_BROKER_URL
    state_url: str = DEFAULT_BROKER_URL
    redis_sink_url: str = DEFAULT_BROKER_URL
    queue: str = "batchinfer"
    visibility_timeout: int = 6 * 3600
    io_threads: int = 8
    model_cache_size: int = 2

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        broker = env.get("BATCHINFER_BROKER_URL") or DEFAULT_BROKER_URL
        state = env.get("BATCHINFER_STATE_URL") or broker
        return cls(
            broker_url=broker,
            state_url=state,
            redis_sink_url=env.get("BATCHINFER_REDIS_URL") or state,
            queue=env.get("BATCHINFER_QUEUE") or "batchinfer",
            visibility_timeout=_int(env, "BATCHINFER_VISIBILITY_TIMEOUT", 6 * 3600),
            io_threads=_int(env, "BATCHINFER_IO_THREADS", 8),
            model_cache_size=_int(env, "BATCHINFER_MODEL_CACHE_SIZE", 2),
        )
