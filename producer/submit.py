"""``batchinfer submit``: stream sources into shards and enqueue one task per shard as it goes."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from itertools import chain
from typing import Any

from tqdm import tqdm

from producer.jobs import connect_store, new_job_id, redact
from producer.shards import shards
from producer.sources import Filters, check_sources, iter_uris
from workers.contract import TASK_NAME, ModelSpec, OutputSpec, ShardTask
from workers.errors import BrokerError, SourceError
from workers.settings import Settings


def submit(
    sources: list[str], model: ModelSpec, output: OutputSpec, settings: Settings, *,
    filters: Filters = Filters(), shard_size: int = 256, job_id: str | None = None, progress: bool = True,
) -> str:
    """Enqueue every shard of ``sources``; return the job id."""
    from kombu.exceptions import OperationalError

    from workers.app import app

    check_sources(sources)
    uris = iter_uris(sources, filters)
    first = next(uris, None)
    if first is None:
        raise SourceError(f"no images found in {' '.join(sources)}")
    store = connect_store(settings.state_url)
    app.conf.broker_url = settings.broker_url
    _check_broker(app, settings.broker_url)
    job_id = job_id or new_job_id()
    store.create_job(job_id, {"model": asdict(model), "output": asdict(output), "sources": sources,
                              "shard_size": shard_size})
    bar = tqdm(desc=f"submit {job_id}", unit="img", file=sys.stderr, disable=not progress)
    count = n_shards = 0
    try:
        with app.producer_or_acquire() as producer:
            for shard_id, chunk in shards(chain([first], uris), shard_size):
                task = ShardTask(job_id, shard_id, chunk, model, output)
                store.add_shard(job_id, shard_id, len(chunk))
                app.send_task(
                    TASK_NAME, kwargs={"task": task.to_dict()}, queue=settings.queue, producer=producer,
                    retry=True, retry_policy={"max_retries": 3, "interval_start": 0.5},
                )
                count += len(chunk)
                n_shards += 1
                bar.update(len(chunk))
    except OperationalError as exc:
        error: Exception = BrokerError(f"cannot reach the broker at {redact(settings.broker_url)}: {exc}")
        store.fail_submit(job_id, str(error))
        raise error from exc
    except BaseException as exc:  # a bad manifest mid-stream, Ctrl-C: the job must not look "submitting" forever
        store.fail_submit(job_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        bar.close()
    store.finish_submit(job_id, n_shards, count)
    print(f"submitted {count} images in {n_shards} shards as job {job_id}", file=sys.stderr)
    return job_id


def _check_broker(app: Any, url: str) -> None:
    """Fail before creating the job when the broker does not answer."""
    from kombu.exceptions import OperationalError

    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except (OperationalError, OSError) as exc:
        raise BrokerError(f"cannot reach the broker at {redact(url)}: {exc}") from exc


def settings_with_broker(broker: str | None) -> Settings:
    """Settings from the environment, with ``--broker`` replacing the broker (and the state store
    unless ``BATCHINFER_STATE_URL`` names another)."""
    settings = Settings.from_env()
    if not broker:
        return settings
    state = os.environ.get("BATCHINFER_STATE_URL") or broker
    return replace(settings, broker_url=broker, state_url=state,
                   redis_sink_url=os.environ.get("BATCHINFER_REDIS_URL") or state)
