"""``batchinfer exporter``: the jobs and queues of the job state as Prometheus metrics, read from Redis at each
scrape (a few reads per unfinished job, whatever its size), and each queue's depth as JSON for autoscalers.

A queue's depth counts its queued **and running** shards: an autoscaler that saw only the broker's list (KEDA's
Redis ``listLength``) would scale busy workers away as the list drains, and their shards would be handed back.

    batchinfer_queue_depth{queue}                       queued + running shards of the queue's unfinished jobs
    batchinfer_queue_shards{queue,state}                queued (pending, retries included) and running
    batchinfer_queue_workers{queue}                     workers that heartbeat on the queue
    batchinfer_broker_messages{queue}                   messages in the broker's list
    batchinfer_job_info{job,queue,model,task,state}     1 per job (unfinished, and the newest finished ones)
    batchinfer_job_shards{job,state}                    pending, running, done, failed
    batchinfer_job_images{job,state}                    ok, error (rows written) and pending
    batchinfer_job_images_per_second{job}               since the job's first shard started
    batchinfer_job_eta_seconds{job}                     at that rate (running jobs)
    batchinfer_job_created_timestamp_seconds{job}, batchinfer_job_finished_timestamp_seconds{job}
    batchinfer_state_up                                 0 when Redis did not answer this scrape

``GET /queue/NAME`` answers ``{"queue", "queued", "running", "depth", "workers"}`` (KEDA's ``metrics-api``
scaler reads ``depth``); ``/healthz`` answers while the process runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from workers.jobstate import DONE, FAILED, PENDING, RUNNING, JobState
from workers.settings import Settings, redact

log = logging.getLogger(__name__)

RECENT = 20  # finished jobs exported beside the unfinished ones (the newest)


@dataclass
class Depth:
    queue: str
    queued: int = 0
    running: int = 0
    workers: int = 0
    messages: int | None = None

    @property
    def depth(self) -> int:
        return self.queued + self.running

    def as_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "queued": self.queued, "running": self.running, "depth": self.depth,
                "workers": self.workers}


@dataclass
class Snapshot:
    jobs: list[JobState] = field(default_factory=list)
    queues: dict[str, Depth] = field(default_factory=dict)


def job_state(job: JobState) -> str:
    from producer.status import state_of

    return state_of(job)


class JobsReader:
    """Reads a ``Snapshot`` from the job state (``store``) and the broker's lists (``broker``: a Redis client)."""

    def __init__(self, store: Any, broker: Any, settings: Settings, recent: int = RECENT) -> None:
        self.store, self.broker, self.settings, self.recent = store, broker, settings, recent

    def _active(self) -> list[JobState]:
        return [job for job in (self.store.get_job(j) for j in self.store.active_jobs()) if job is not None]

    def snapshot(self, jobs: bool = True) -> Snapshot:
        active = self._active()
        shown = {job.job_id: job for job in active}
        if jobs:
            for job in self.store.recent_jobs(self.recent):
                shown.setdefault(job.job_id, job)
        snap = Snapshot(sorted(shown.values(), key=lambda j: j.created))
        for name in {self.settings.queue, *(job.queue for job in shown.values())}:
            snap.queues[name] = self._depth(name, active)
        return snap

    def depth(self, queue: str) -> Depth:
        return self._depth(queue, self._active())

    def _depth(self, queue: str, active: list[JobState]) -> Depth:
        depth = Depth(queue)
        for job in active:
            if job.queue != queue or job.finished:
                continue
            depth.running += job.n_running
            if not job.cancelled:  # a cancelled job's pending shards never start
                depth.queued += job.count(PENDING)
        depth.workers = len(self.store.live_workers(queue, 3 * self.settings.heartbeat_seconds))
        if self.broker is not None:
            depth.messages = int(self.broker.llen(self.settings.broker_prefix + queue))
        return depth


class JobsCollector:
    """The Prometheus side of ``JobsReader``: one snapshot per scrape."""

    def __init__(self, reader: JobsReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("batchinfer_state_up", "1 when the job state store answered this scrape")
        try:
            snap = self.reader.snapshot()
        except Exception as exc:  # Redis away: say so in the metrics, don't fail the scrape
            log.warning("cannot read the job state: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        def family(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        depth = family("batchinfer_queue_depth", "queued + running shards of unfinished jobs", ["queue"])
        qshards = family("batchinfer_queue_shards", "shards of unfinished jobs, queued or running", ["queue", "state"])
        workers = family("batchinfer_queue_workers", "workers heartbeating on the queue", ["queue"])
        messages = family("batchinfer_broker_messages", "messages in the broker's list of the queue", ["queue"])
        for name, d in sorted(snap.queues.items()):
            depth.add_metric([name], d.depth)
            qshards.add_metric([name, "queued"], d.queued)
            qshards.add_metric([name, "running"], d.running)
            workers.add_metric([name], d.workers)
            if d.messages is not None:
                messages.add_metric([name], d.messages)
        yield from (depth, qshards, workers, messages)

        info = family("batchinfer_job_info", "a job (value 1) with its queue, model, task and state",
                      ["job", "queue", "model", "task", "state"])
        shards = family("batchinfer_job_shards", "a job's shards by state", ["job", "state"])
        images = family("batchinfer_job_images", "a job's images: ok and error rows written, pending",
                        ["job", "state"])
        rate = family("batchinfer_job_images_per_second", "images per second since the first shard started", ["job"])
        eta = family("batchinfer_job_eta_seconds", "seconds left at the current rate", ["job"])
        created = family("batchinfer_job_created_timestamp_seconds", "when the job was created", ["job"])
        finished = family("batchinfer_job_finished_timestamp_seconds", "when the job finished", ["job"])
        for job in snap.jobs:
            model = job.spec.get("model") or {}
            info.add_metric([job.job_id, job.queue, str(model.get("name") or model.get("model_path") or ""),
                             str(model.get("task") or ""), job_state(job)], 1)
            for state in (PENDING, RUNNING, DONE, FAILED):
                shards.add_metric([job.job_id, state], job.count(state))
            total = job.images_total if job.images_total is not None else job.images_done
            images.add_metric([job.job_id, "ok"], job.images_done - job.errors)
            images.add_metric([job.job_id, "error"], job.errors)
            images.add_metric([job.job_id, "pending"], max(total - job.images_done, 0))
            speed = job.rate(job.now)
            if speed:
                rate.add_metric([job.job_id], speed)
                if not job.finished and not job.cancelled and job.images_total is not None:
                    eta.add_metric([job.job_id], max(job.images_total - job.images_done, 0) / speed)
            created.add_metric([job.job_id], job.created)
            if job.finished_at is not None:
                finished.add_metric([job.job_id], job.finished_at)
        yield from (info, shards, images, rate, eta, created, finished)


def serve(reader: JobsReader, host: str, port: int) -> Any:
    """The bound server (``/metrics``, ``/queue/NAME``, ``/healthz``); call ``serve_forever`` on it."""
    from prometheus_client import CollectorRegistry

    from workers.metrics.http import Endpoint, bind

    registry = CollectorRegistry()
    registry.register(JobsCollector(reader))

    def queue(name: str) -> tuple[int, dict[str, Any] | str]:
        try:
            return 200, reader.depth(name).as_dict()
        except Exception as exc:  # KEDA keeps its last value (or its fallback) while Redis is away
            return 503, {"queue": name, "error": f"cannot read the job state: {exc}"}

    def healthz(_: str) -> tuple[int, dict[str, Any] | str]:
        return 200, "ok"

    return bind(Endpoint(registry, {"/healthz": healthz, "/queue/": queue}), host, (port, port))


def exporter_command(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or Ctrl-C. Redis need not be up yet: scrapes say ``batchinfer_state_up 0`` meanwhile."""
    from producer.submit import settings_with_broker
    from workers.errors import ConfigError
    from workers.metrics.http import url_of
    from workers.recovery import broker_client
    from workers.redis_jobstore import RedisJobStore

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}")
    settings = settings_with_broker(args.broker)
    store = RedisJobStore.from_settings(settings, socket_timeout=10)
    broker = store.client if settings.broker_url == settings.state_url else broker_client(settings.broker_url,
                                                                                          settings.redis_tls)
    server = serve(JobsReader(store, broker, settings), args.host, args.port)
    print(f"batchinfer exporter: serving {url_of(server)} for {redact(settings.state_url)}", file=sys.stderr,
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="exporter", daemon=True)
    thread.start()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0
