"""The Celery task: a thin shell that decodes the JSON message and calls ``run_attempt``.

The attempt's outcome becomes Celery's own states: done or skipped (a duplicate delivery) -> SUCCESS,
a failed attempt that will be retried after its backoff -> RETRY, a shard failed for good -> FAILURE.
Retries are scheduled in the job state (``workers.recovery`` enqueues them when due), not as ETA
messages held in a worker's memory.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_shutting_down

from workers.app import app
from workers.attempt import FAILED, RETRYING, run_attempt
from workers.contract import TASK_NAME, ShardTask
from workers.errors import ShardError
from workers.jobstate import Holder
from workers.lease import request_stop
from workers.redis_jobstore import RedisJobStore
from workers.settings import Settings

log = logging.getLogger(__name__)


class ShardFailed(ShardError):
    """The shard failed for good (dead-lettered); ``batchinfer retry`` runs it again."""


@worker_process_init.connect
def _import_libraries(**_: Any) -> None:
    """Keras and its backend (``KERAS_BACKEND``: TensorFlow, JAX or PyTorch) are imported when a pool process
    starts, not inside its first shard: a shard's time limit that fired inside an import would leave
    half-imported modules (``scipy``) that break every later shard of the process. The model itself is
    still built on the first shard."""
    from workers.models import backends

    backends.load()


@lru_cache(maxsize=1)
def _process_state() -> tuple[Settings, RedisJobStore, Any, Any]:
    """Per-process singletons, created after the pool forks (never in the parent): settings, job state, the
    model cache and the metrics this process records (None unless ``BATCHINFER_METRICS_PORT`` is set)."""
    from workers.metrics.worker import pool_metrics
    from workers.models.loader import PredictorCache

    settings = Settings.from_env()
    store = RedisJobStore.from_settings(settings)
    metrics = pool_metrics(settings)
    on_build = (lambda p, seconds: metrics.model_loaded(p.model_name, seconds)) if metrics else None
    return settings, store, PredictorCache(settings.model_cache_size, settings=settings, on_build=on_build), metrics


@worker_shutting_down.connect
def _hand_back_on_shutdown(**_: Any) -> None:
    """SIGTERM (warm shutdown): running shards stop at their next batch and go back to the queue."""
    request_stop()


@app.task(name=TASK_NAME, bind=True)
def process_shard_task(self: Any, task: dict[str, Any]) -> dict[str, Any]:
    """Process one delivery of a shard; see the module docstring for how it ends."""
    shard = ShardTask.from_dict(task)
    settings, store, cache, metrics = _process_state()
    holder = Holder(worker=self.request.hostname or "celery",
                    delivery_tag=(self.request.properties or {}).get("delivery_tag"))
    outcome = run_attempt(shard, store, cache.get, settings, holder, meter=metrics)
    if metrics is not None:
        metrics.attempt(outcome.state, outcome.result.timings["total"] if outcome.result else None)
    if outcome.state == FAILED:
        raise ShardFailed(f"job {shard.job_id} {shard.name}: {outcome.detail}")
    if outcome.state == RETRYING:
        raise Retry(f"attempt {outcome.attempt} failed: {outcome.detail}", when=outcome.retry_in)
    return outcome.summary(shard)
