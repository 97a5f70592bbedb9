"""A worker's Prometheus metrics, served on ``BATCHINFER_METRICS_PORT`` by its main process.

The Celery worker is prefork: shards run in a pool child that may be replaced (a crash, a time limit), while
the main process lives on. So the main process serves (``serve_worker_metrics``, from ``worker_init``) and the
children record (``WorkerMetrics``), through prometheus_client's multiprocess mode in a folder of the worker's
own (several workers on one host never mix their samples). Counters of a dead child stay counted; its gauges go.

    batchinfer_images_total{status}          images through the model, ok or error rows
    batchinfer_shards_total{state}           attempts by how they ended (done, failed, retrying, handed_back, ...)
    batchinfer_stage_seconds{stage}          per batch: read_decode (pool time), wait (the model waiting for
                                             decoded batches: a starved model), predict, write
    batchinfer_shard_seconds                 a shard's wall time
    batchinfer_batch_size                    images per model call
    batchinfer_model_load_seconds{model}     building a model (weights read, compiled, warmed)
    batchinfer_device_memory_bytes{device}   accelerator memory in use (absent on a CPU)
    batchinfer_worker_resident_memory_bytes  resident memory of the pool processes
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from workers.lease import pid_alive
from workers.metrics.device import device_memory, resident_bytes
from workers.metrics.http import Endpoint, bind, serve_in_background, url_of
from workers.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("read_decode", "wait", "predict", "write")
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SHARD_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    """What a pool process records. ``registry`` None: the metrics are only written to the multiprocess folder
    (the main process serves them); tests pass a ``CollectorRegistry`` to read them in one process."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        kw: dict[str, Any] = {"registry": registry}
        self.images = Counter("batchinfer_images", "images through the model, by outcome (ok or error row)",
                              ["status"], **kw)
        self.shards = Counter("batchinfer_shards", "shard attempts by how they ended", ["state"], **kw)
        self.stage = Histogram("batchinfer_stage_seconds", "seconds per batch in each stage; wait is the model "
                               "waiting for decoded images", ["stage"], buckets=STAGE_BUCKETS, **kw)
        self.shard_seconds = Histogram("batchinfer_shard_seconds", "wall seconds of a processed shard",
                                       buckets=SHARD_BUCKETS, **kw)
        self.batch_size = Histogram("batchinfer_batch_size", "images per model call", buckets=BATCH_BUCKETS, **kw)
        self.model_load = Histogram("batchinfer_model_load_seconds", "seconds to build a model", ["model"],
                                    buckets=LOAD_BUCKETS, **kw)
        self.device_memory = Gauge("batchinfer_device_memory_bytes", "accelerator memory in use", ["device"],
                                   multiprocess_mode="livemax", **kw)
        self.resident = Gauge("batchinfer_worker_resident_memory_bytes", "resident memory of the pool processes",
                              multiprocess_mode="livesum", **kw)
        for status in ("ok", "error"):  # every series exists from the start: rate() needs its zero
            self.images.labels(status)
        for stage in STAGES:
            self.stage.labels(stage)

    # the pipeline's meter (``workers.pipeline.Meter``)
    def batch(self, images: int, errors: int, seconds: dict[str, float]) -> None:
        self.images.labels("ok").inc(images - errors)
        if errors:
            self.images.labels("error").inc(errors)
        self.batch_size.observe(images)
        for stage, value in seconds.items():
            self.stage.labels(stage).observe(value)

    def commit(self, seconds: float) -> None:
        self.stage.labels("write").observe(seconds)

    def attempt(self, state: str, seconds: float | None) -> None:
        """An attempt ended (``workers.attempt.Outcome.state``); ``seconds``: its shard's wall time if processed."""
        self.shards.labels(state.replace(" ", "_")).inc()
        if seconds is not None:
            self.shard_seconds.observe(seconds)
        self.refresh()

    def model_loaded(self, model: str, seconds: float) -> None:
        self.model_load.labels(model).observe(seconds)
        self.refresh()

    def refresh(self) -> None:
        """The gauges: device and resident memory, read now."""
        for device, used in device_memory().items():
            self.device_memory.labels(device).set(used)
        rss = resident_bytes()
        if rss is not None:
            self.resident.set(rss)


@dataclass
class Health:
    """The main process's probes: alive while it runs; ready once it consumes, until it shuts down."""

    ready: bool = False

    def healthz(self, _: str) -> tuple[int, str]:
        return 200, "ok"

    def readyz(self, _: str) -> tuple[int, str]:
        return (200, "ready") if self.ready else (503, "not consuming")


HEALTH = Health()


class _LiveCollector:
    """prometheus_client's multiprocess collector, after dropping the gauges of pool children that are gone
    (a SIGKILLed child never says so itself)."""

    def __init__(self, folder: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.folder = folder
        self.inner = MultiProcessCollector(None, folder)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.multiprocess import mark_process_dead

        for path in glob.glob(os.path.join(self.folder, "gauge_live*_*.db")):
            match = re.search(r"_(\d+)\.db$", path)
            if match and not pid_alive(int(match.group(1))):
                mark_process_dead(int(match.group(1)), self.folder)
        return self.inner.collect()


def serve_worker_metrics(settings: Settings) -> str | None:
    """In the worker's main process, before the pool starts: a multiprocess folder of its own, and the endpoint
    (``/metrics``, ``/healthz``, ``/readyz``) on the first free port of ``BATCHINFER_METRICS_PORT``. Returns the
    URL, or None when metrics are off; ``ConfigError`` when no port is free."""
    if settings.metrics_ports is None:
        return None
    folder = tempfile.mkdtemp(prefix="batchinfer-metrics-")
    atexit.register(shutil.rmtree, folder, True)
    os.environ[MULTIPROC_ENV] = folder  # the pool children fork with it
    from prometheus_client import CollectorRegistry, values

    values.ValueClass = values.get_value_class()  # in case prometheus_client was imported before the variable
    registry = CollectorRegistry()
    registry.register(_LiveCollector(folder))
    server = bind(Endpoint(registry, {"/healthz": HEALTH.healthz, "/readyz": HEALTH.readyz}),
                  settings.metrics_host, settings.metrics_ports, "BATCHINFER_METRICS_PORT")
    serve_in_background(server, "batchinfer-metrics")
    url = url_of(server)
    log.info("metrics on %s", url)
    return url


def pool_metrics(settings: Settings) -> WorkerMetrics | None:
    """In a pool process: the metrics it records, when its main process serves them."""
    if settings.metrics_ports is None or not os.environ.get(MULTIPROC_ENV):
        return None
    return WorkerMetrics()
