"""The Celery task: a thin shell that decodes the JSON message and calls ``run_shard``."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from workers.app import app
from workers.contract import TASK_NAME, ShardTask
from workers.errors import ConfigError
from workers.jobstate import RedisJobStore
from workers.pipeline import run_shard
from workers.settings import Settings

log = logging.getLogger(__name__)
MAX_RETRIES = 3


@lru_cache(maxsize=1)
def _process_state() -> tuple[Settings, RedisJobStore, Any]:
    """Per-process singletons, created after the pool forks (never in the parent)."""
    from workers.models.loader import PredictorCache

    settings = Settings.from_env()
    return settings, RedisJobStore.from_url(settings.state_url), PredictorCache(settings.model_cache_size)


@app.task(name=TASK_NAME, bind=True, max_retries=MAX_RETRIES)
def process_shard_task(self: Any, task: dict[str, Any]) -> dict[str, Any]:
    """Process one shard; a bad configuration fails it at once, other failures are retried."""
    shard = ShardTask.from_dict(task)
    settings, store, cache = _process_state()
    final = self.request.retries >= MAX_RETRIES
    try:
        result = run_shard(shard, store, cache.get, settings, final_attempt=final)
    except ConfigError as exc:
        if not final:  # retrying cannot fix a configuration: record the failure now
            store.update_shard(shard.job_id, shard.shard_id, "failed", reason=str(exc))
        log.error("job %s shard %s failed: %s", shard.job_id, shard.name, exc)
        return {"job_id": shard.job_id, "shard_id": shard.shard_id, "error": str(exc)}
    except Exception as exc:
        if final:
            raise
        raise self.retry(exc=exc, countdown=2 ** self.request.retries) from exc
    return {"job_id": shard.job_id, "shard_id": shard.shard_id, "images": result.images, "errors": result.errors}
