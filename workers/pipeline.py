"""Process one shard: read -> decode -> predict -> write, each stage timed.

Reading and decoding run on the process's thread pool (``workers.feed``: Pillow and file I/O release
the GIL) and stay a few batches ahead of the model, so the next batch is ready while the current one
runs, across shards too. ``process_shard`` is a plain function: the Celery task and the embedded
``batchinfer run`` both call it through ``workers.attempt.run_attempt``, which records the shard's
state around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from workers import __version__
from workers.contract import ShardTask
from workers.decode import Encoded
from workers.errors import ConfigError, ShardStopped
from workers.feed import Feeder, Loaded, feeder
from workers.infer import Inputs, host_inputs, infer, to_rows
from workers.schema import kept_arrays, output_schema, with_job_metadata
from workers.settings import Settings
from workers.sinks import open_sink

log = logging.getLogger(__name__)


@dataclass
class ShardResult:
    """What one shard produced, and where its time went (seconds per stage)."""

    job_id: str
    shard_id: int
    images: int
    errors: int
    timings: dict[str, float] = field(default_factory=dict)


class Meter(Protocol):
    """Told where each batch's time went (``workers.metrics.worker.WorkerMetrics`` records it)."""

    def batch(self, images: int, errors: int, seconds: dict[str, float]) -> None: ...
    def commit(self, seconds: float) -> None: ...


def job_metadata(task: ShardTask, predictor: Any) -> dict[str, Any]:
    spec = task.model
    features = "features" in spec.tasks
    return {
        "job_id": task.job_id,
        "model": predictor.model_name,
        "model_spec": asdict(spec),  # everything to embed a query exactly as this job did (search indexes)
        "model_path": spec.model_path,
        "weights": spec.weights if not spec.model_path else None,
        "weights_fingerprint": predictor.fingerprint,
        "task": spec.task,
        "layers": list(spec.layers),
        "pooling": spec.pooling if features else None,
        "input_size": list(predictor.input_hw),
        "decode": spec.decode,
        "precision": spec.precision,
        "preprocess": predictor.preprocess_name,
        **_top_k(spec, predictor.top_k),
        "feature_columns": predictor.feature_columns,
        "feature_shapes": predictor.feature_shapes,
        "batchinfer_version": __version__,
        **kept_metadata(task),
    }


def _top_k(spec: Any, effective: int) -> dict[str, Any]:
    """``top_k`` as the rows have it; a request above the model's class count is cut, and said so."""
    if "classify" not in spec.tasks:
        return {"top_k": None}
    if effective < spec.top_k:
        return {"top_k": effective, "top_k_requested": spec.top_k}
    return {"top_k": spec.top_k}


def kept_metadata(task: ShardTask) -> dict[str, Any]:
    """``keep_columns`` (``[[name, type], ...]``) in the job metadata when the job keeps manifest columns,
    so a later incremental run knows which of a previous output's columns came from its manifest."""
    keep = task.output.keep_columns
    return {"keep_columns": [list(pair) for pair in keep]} if keep else {}


def check_kept(task: ShardTask) -> None:
    """Every kept column has one value per URI: a list that does not is a broken job, failed at once."""
    for name in task.output.keep_names:
        values = task.columns.get(name)
        if values is None or len(values) != len(task.uris):
            have = "none" if values is None else f"{len(values)} for {len(task.uris)} URIs"
            raise ConfigError(f"job {task.job_id} {task.name}: its list has no values of kept column {name!r} "
                              f"({have})")


def _host_inputs(batches: Iterator[list[Loaded]]) -> Iterator[Inputs]:
    for batch in batches:
        yield host_inputs(batch)


def _device_inputs(batches: Iterator[list[Loaded]], decoder: Any, ahead: ThreadPoolExecutor) -> Iterator[Inputs]:
    """``--decode gpu``: the pool only read the files; each batch is decoded on the device one batch ahead of
    the model, on a thread of its own, into a uint8 batch that reaches the model without a trip through the host."""
    def decode(batch: list[Loaded]) -> Inputs:
        t0 = time.perf_counter()
        read = [i for i, b in enumerate(batch) if b.image is not None]
        decoded = decoder.decode([b.image.data for b in batch if isinstance(b.image, Encoded)])
        errors: list[str | None] = [b.error for b in batch]
        sizes: list[tuple[int, int] | None] = [None] * len(batch)
        for i, error, size in zip(read, decoded.errors, decoded.sizes):
            errors[i], sizes[i] = error, size
        return Inputs(batch, errors, sizes, [read[j] for j in decoded.ok], device=decoded.x,
                       seconds=time.perf_counter() - t0)

    pending: Future[Inputs] | None = None
    for batch in batches:
        future = ahead.submit(decode, batch)
        if pending is not None:
            yield pending.result()
        pending = future
    if pending is not None:
        yield pending.result()


def process_shard(task: ShardTask, predictor: Any, settings: Settings | None = None,
                  should_stop: Callable[[], str | None] | None = None,
                  on_batch: Callable[[int], None] | None = None, feed: Feeder | None = None,
                  meter: Meter | None = None) -> ShardResult:
    """Run one shard through ``predictor`` into its sink; return counts and stage timings.

    ``should_stop`` is asked before each batch; a reason makes it raise ``ShardStopped``, and the sink
    discards what it wrote (nothing of the shard is committed). ``on_batch(n)`` is told each batch's
    image count (a progress bar), ``meter`` each batch's stage seconds. Images load through ``feed``, by
    default this process's feeder with ``settings.io_threads`` threads, which may have started on this shard
    already (``Feeder.announce``).
    """
    settings = settings or Settings.from_env()
    spec = task.model
    check_kept(task)
    kept = {name: task.columns[name] for name in task.output.keep_names}
    size = predictor.input_hw
    feed = feed or feeder(settings.io_threads)
    decoder = None
    if spec.decode == "gpu":  # ConfigError without torch or CUDA, before the sink opens
        from workers.decode_gpu import batch_decoder

        decoder = batch_decoder(size, map_fn=feed.pool.map)  # CPU fallbacks decode on the pool
    schema = with_job_metadata(
        output_schema(spec.task, spec.top_k, feature_columns=predictor.feature_columns,
                      keep=task.output.keep_columns),
        job_metadata(task, predictor),
    )
    timings = {"read_decode": 0.0, "wait": 0.0, "predict": 0.0, "write": 0.0}
    images = errors = 0
    start = time.perf_counter()

    batches = feed.batches(task, size, settings.allowed_roots)
    with ExitStack() as stack:
        sink = stack.enter_context(open_sink(task, schema, settings))
        stack.enter_context(closing(batches))  # a stop cancels the loads not started
        if decoder is None:
            ready = _host_inputs(batches)
        else:
            ready = _device_inputs(batches, decoder, stack.enter_context(ThreadPoolExecutor(1)))
        while True:
            reason = should_stop() if should_stop else None
            if reason:
                raise ShardStopped(reason)
            t0 = time.perf_counter()
            item = next(ready, None)
            waited = time.perf_counter() - t0
            timings["wait"] += waited
            if item is None:
                break
            batch, ok = item.batch, item.ok
            t0 = time.perf_counter()
            outputs = infer(predictor, item)
            t1 = time.perf_counter()
            rows = to_rows(schema, predictor, item, outputs, kept_arrays(schema, kept, images, images + len(batch)))
            sink.write(rows)
            t2 = time.perf_counter()
            seconds = {"read_decode": sum(b.seconds for b in batch) + item.seconds, "wait": waited,
                       "predict": t1 - t0, "write": t2 - t1}
            for stage, value in seconds.items():
                timings[stage] += value
            images += len(batch)
            errors += len(batch) - len(ok)
            if on_batch is not None:
                on_batch(len(batch))
            if meter is not None:
                meter.batch(len(batch), len(batch) - len(ok), seconds)
        t0 = time.perf_counter()
    committed = time.perf_counter() - t0  # the sink's commit
    timings["write"] += committed
    if meter is not None:
        meter.commit(committed)
    timings["total"] = time.perf_counter() - start
    log.info(
        "job %s %s: %d images, %d errors in %.2fs (%s)", task.job_id, task.name, images, errors,
        timings["total"], ", ".join(f"{k} {v:.2f}s" for k, v in timings.items() if k != "total"),
    )
    return ShardResult(task.job_id, task.shard_id, images, errors, timings)
