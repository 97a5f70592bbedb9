"""Prometheus metrics of the HTTP service, in a registry of its own (one per app, so tests and several apps in
one process never collide): requests, their latency, and the batches the model ran."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """What ``GET /metrics`` shows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("batchinfer_http_requests", "HTTP requests answered, by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("batchinfer_http_request_seconds", "time to answer a request, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("batchinfer_images", "images received, by outcome (ok or error)", ["outcome"],
                              registry=self.registry)
        self.batch_size = Histogram("batchinfer_batch_size", "images per model call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_seconds = Histogram("batchinfer_batch_seconds", "seconds per model call (padding included)",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queued = Gauge("batchinfer_queued_images", "images waiting for the model", registry=self.registry)
        self.ready = Gauge("batchinfer_ready", "1 once the model is loaded and warm", registry=self.registry)

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
