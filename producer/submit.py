"""``batchinfer submit``: stream sources into shards and enqueue one task per shard as it goes.

Each shard is recorded in the job state (with its URIs) before its message is sent, so a submit cut
short by a broker outage can be resumed: ``submit --resume JOB`` scans the same sources again, checks
that the last recorded shard is unchanged, sends it again (its message may not have gone out) and
carries on from there.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from tqdm import tqdm

from producer.dedupe import duplicates_line
from producer.incremental import Previous
from producer.jobs import check_job_id, connect_store, new_job_id
from producer.keep import kept_columns
from producer.shards import ShardStream
from producer.sources import Filters, check_sources
from producer.words import plural
from workers.contract import TASK_NAME, ModelSpec, OutputSpec, ShardList, message, shard_name, spec_dicts
from workers.errors import BrokerError, ConfigError, JobExists, ShardError, SourceError
from workers.settings import Settings, check_redis_url, redact
from workers.spool import STATE, shard_ref, spool_for, write_shard_list

SPOOL_WRITERS = 16  # shard lists written at once (S3 PUTs overlap)


def _outage_errors() -> tuple[type[BaseException], ...]:
    import redis
    from kombu.exceptions import OperationalError

    return (OperationalError, redis.ConnectionError, redis.TimeoutError, ConnectionError)


def submit(
    sources: list[str], model: ModelSpec, output: OutputSpec, settings: Settings, *,
    filters: Filters = Filters(), shard_size: int = 256, job_id: str | None = None, progress: bool = True,
    skip_unchanged: str | None = None, keep_columns: Sequence[str] = (),
) -> str:
    """Create a job and enqueue every shard of ``sources``; return the job id. With ``skip_unchanged``
    (a previous output), unchanged images reuse their rows (``producer.incremental``); ``keep_columns``
    are manifest columns copied into every row (``producer.keep``)."""
    if job_id is not None:
        check_job_id(job_id)
    check_sources(sources)
    output = replace(output, keep_columns=kept_columns(sources, keep_columns, model))
    if skip_unchanged and not spool_for("x", output, settings.spool):
        raise ConfigError("--skip-unchanged needs a Parquet --output (or BATCHINFER_SPOOL) to list the reused rows")
    previous = Previous(skip_unchanged, model) if skip_unchanged else None
    stream = ShardStream(sources, filters, shard_size, output.keep_columns, previous)
    if stream.empty():
        raise SourceError(f"no images found in {' '.join(sources)}")
    store = connect_store(settings)
    app = _app(settings)
    job_id = job_id or new_job_id()
    spec: dict[str, Any] = {
        "model": asdict(model), "output": asdict(output), "sources": sources, "shard_size": shard_size,
        "include": list(filters.include), "exclude": list(filters.exclude), "queue": settings.queue,
        "spool": spool_for(job_id, output, settings.spool), "skip_unchanged": skip_unchanged}
    if not store.create_job(job_id, spec):
        raise JobExists(f"job {job_id} already exists (choose another --job-id, or `batchinfer delete {job_id}`)")
    return _enqueue(store, app, settings, job_id, model, output, stream, progress, spool=spec["spool"])


def resume(job_id: str, settings: Settings, progress: bool = True) -> str:
    """Carry on with a submit that stopped part way (see the module docstring)."""
    store = connect_store(settings)
    job = store.get_job(check_job_id(job_id))
    if job is None:
        raise ConfigError(f"unknown job {job_id!r}")
    if job.submitted:
        raise ConfigError(f"job {job_id} was submitted completely; nothing to resume (see `batchinfer retry`)")
    if job.cancelled:
        raise ConfigError(f"job {job_id} was cancelled")
    spec = job.spec
    settings = replace(settings, queue=spec.get("queue") or settings.queue)
    filters = Filters(tuple(spec.get("include") or ()), tuple(spec.get("exclude") or ()))
    check_sources(spec["sources"])
    model = ModelSpec.from_dict(spec["model"])
    output = OutputSpec.from_dict(spec["output"])
    kept_columns(spec["sources"], output.keep_names, model)  # the columns are still there (their types are the job's)
    previous = Previous(spec["skip_unchanged"], model) if spec.get("skip_unchanged") else None
    stream = ShardStream(spec["sources"], filters, spec["shard_size"], output.keep_columns, previous)
    app = _app(settings)
    store.resume_submit(job_id)
    return _enqueue(store, app, settings, job_id, model, output, stream, progress, recorded=job.n_shards,
                    spool=spec.get("spool"))


def _app(settings: Settings) -> Any:
    from workers.app import app

    app.conf.broker_url = settings.broker_url
    _check_broker(app, settings.broker_url)
    return app


def _enqueue(store: Any, app: Any, settings: Settings, job_id: str, model: ModelSpec, output: OutputSpec,
             stream: ShardStream, progress: bool, recorded: int = 0, spool: str | None = None) -> str:
    """Record and send every shard; the first ``recorded`` ones were recorded by an earlier submit.

    With a spool, each shard's list is written to storage first (a few writes in flight at once, for
    S3), and the message carries its URI; the shard is recorded, then sent, once its list is written.
    Either way the message carries a pointer, never the URIs or kept values.
    """
    bar = tqdm(desc=f"submit {job_id}", unit="img", file=sys.stderr, disable=not progress)
    specs = spec_dicts(model, output)
    count = n_shards = reused = 0
    inflight: deque[tuple[int, ShardList, Future[None] | None]] = deque()

    def send(producer: Any, shard_id: int, listed: ShardList, written: Future[None] | None) -> None:
        ref = STATE
        if written is not None:
            written.result()
            ref = shard_ref(spool, shard_id)  # type: ignore[arg-type]
        store.add_shard(job_id, shard_id, listed.uris, keep_uris=spool is None, columns=listed.columns)
        app.send_task(
            TASK_NAME, kwargs={"task": message(job_id, shard_id, specs, listed.uris, ref)}, queue=settings.queue,
            producer=producer, argsrepr="()", kwargsrepr=f"{job_id}/{shard_name(shard_id)}",
            retry=True, retry_policy={"max_retries": 3, "interval_start": 0.5},
        )

    try:
        with app.producer_or_acquire() as producer, ThreadPoolExecutor(SPOOL_WRITERS) as pool:
            for shard_id, listed in stream:
                count += len(listed.uris)
                reused += len(listed.uris) if listed.carry else 0
                n_shards += 1
                bar.update(len(listed.uris))
                if shard_id < recorded - 1:
                    continue
                if shard_id == recorded - 1 and store.shard_uris(job_id, shard_id) != listed.uris:
                    raise SourceError(f"the sources of job {job_id} changed since it was submitted "
                                      f"(shard {shard_id} differs); submit a new job")
                written = pool.submit(write_shard_list, shard_ref(spool, shard_id), listed) if spool else None
                inflight.append((shard_id, listed, written))
                if len(inflight) > SPOOL_WRITERS:
                    send(producer, *inflight.popleft())
            while inflight:
                send(producer, *inflight.popleft())
    except _outage_errors() as exc:
        bar.close()
        _mark_failed(store, job_id, f"broker unreachable after {n_shards} shards")
        print(job_id)  # the job exists: scripts can resume it
        raise BrokerError(f"lost the broker at {redact(settings.broker_url)} after {n_shards} shards ({exc}); "
                          f"job {job_id} is incomplete: resume it with `batchinfer submit --resume {job_id}`") from exc
    except (ShardError, OSError) as exc:  # the spool's storage is unreachable: the same as an outage
        bar.close()
        _mark_failed(store, job_id, f"cannot write shard lists after {n_shards} shards: {exc}")
        print(job_id)
        raise ShardError(f"cannot write shard lists: {exc}; job {job_id} is incomplete: resume it with "
                         f"`batchinfer submit --resume {job_id}`") from exc
    except BaseException as exc:  # a bad manifest mid-stream, Ctrl-C: the job must not look "submitting" forever
        bar.close()
        _mark_failed(store, job_id, f"{type(exc).__name__}: {exc}")
        raise
    bar.close()
    if n_shards < recorded:
        raise SourceError(f"the sources of job {job_id} now have fewer shards ({n_shards}) than were submitted "
                          f"({recorded}); submit a new job")
    store.finish_submit(job_id, n_shards, count)
    print(f"submitted {plural(count, 'image')} in {plural(n_shards, 'shard')} as job {job_id}", file=sys.stderr)
    if stream.duplicates:
        print(duplicates_line(stream.duplicates), file=sys.stderr)
    if reused:
        print(f"{plural(count - reused, 'image')} to process, {reused} unchanged (their rows are reused)",
              file=sys.stderr)
    return job_id


def _mark_failed(store: Any, job_id: str, reason: str) -> None:
    try:
        store.fail_submit(job_id, reason)
    except _outage_errors():  # the state store is down too: the job stays "submitting" until resumed
        pass


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
    broker = check_redis_url(broker, "--broker")
    state = os.environ.get("BATCHINFER_STATE_URL") or broker
    return replace(settings, broker_url=broker, state_url=state,
                   redis_sink_url=os.environ.get("BATCHINFER_REDIS_URL") or state).checked()
