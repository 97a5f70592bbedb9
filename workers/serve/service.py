"""The model side of the HTTP service, free of HTTP: images in (uploads or URIs), rows out, through the same
decoders, predictor and row builder as the shard pipeline (``workers.infer``), batched by ``DynamicBatcher``."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.contract import ModelSpec
from workers.decode import DECODERS
from workers.errors import ConfigError
from workers.feed import Loaded, from_bytes, load
from workers.infer import host_inputs, predict_loaded, schema_for, to_rows
from workers.serve.batcher import DynamicBatcher
from workers.serve.metrics import Metrics

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """``batchinfer serve``'s options: the model, where to listen, how to batch, what a request may hold.

    ``allow_uris``: the URI prefixes (``s3://bucket/``, ``https://host/``, a local folder) that requests may
    name in ``{"uris": [...]}`` and ``/search?uri=``; empty (the default): the server reads no URI of a
    client's choosing, only uploads (and URIs already in the index). ``token``: the bearer token every
    request but ``/healthz`` and ``/readyz`` must carry (``$BATCHINFER_API_TOKEN``).
    """

    spec: ModelSpec
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body: int = 32 * MiB
    max_images: int = 64
    max_k: int = 1000
    index: str | None = None
    allow_uris: tuple[str, ...] = ()
    token: str | None = None
    io_threads: int = 8

    def checked(self) -> ServeConfig:
        if self.max_batch < 1:
            raise ConfigError("--max-batch must be at least 1")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError("--max-wait-ms must be between 0 and 10000")
        if self.max_images < 1:
            raise ConfigError("--max-images must be at least 1")
        if self.max_body < 1:
            raise ConfigError("--max-body must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be 0..65535, got {self.port}")
        if self.spec.decode == "gpu":
            raise ConfigError("serve decodes on the CPU: use --decode fast (default) or keras")
        return self


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded sizes compiled for serving: powers of two up to ``max_batch`` (and ``max_batch``), so a
    lone request runs as a batch of one and a full batch as one call."""
    sizes, n = {max_batch}, 1
    while n < max_batch:
        sizes.add(n)
        n *= 2
    return tuple(sorted(sizes))


class Service:
    """A warm predictor (built by ``load``, on a thread, while the server already answers ``/healthz``), the
    batcher in front of it and, optionally, a search index."""

    def __init__(self, config: ServeConfig, index: Any = None, metrics: Metrics | None = None) -> None:
        self.config, self.index = config, index
        self.metrics = metrics or Metrics()
        self.spec = dataclasses.replace(config.spec, batch_size=config.max_batch)
        self.predictor: Any = None
        self.schema: Any = None
        self.load_error: str | None = None
        self.draining = False
        self.decode = DECODERS[self.spec.decode]
        self.batcher: DynamicBatcher[Loaded, dict[str, Any]] = DynamicBatcher(
            self._run_batch, config.max_batch, config.max_wait_ms / 1000, self.metrics.on_batch)
        self._pool: Any = None

    # -- life cycle ---------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.predictor is not None and not self.draining

    @property
    def not_ready_reason(self) -> str:
        """Why requests get 503 now (for ``/readyz`` and the routes)."""
        return self.load_error or ("shutting down" if self.draining else "the model is loading")

    def load(self) -> None:
        """Build the predictor and compile (warm) every batch size; errors are kept for ``/readyz`` and the CLI."""
        try:
            from workers.models.loader import PredictorCache

            sizes = batch_sizes(self.config.max_batch)
            predictor = PredictorCache(1).get(self.spec).with_batch_sizes(sizes)
            for n in sizes:
                predictor.predict(np.zeros((n, *predictor.input_hw, 3), np.uint8))
            if self.index is not None:
                self.index.check_model(predictor)
            self.schema = schema_for(self.spec, predictor)
            gc.collect()
            gc.freeze()  # the framework's ~500k objects are never scanned again: ~10 % more requests/s on 2 cores
            self.predictor = predictor
            self.metrics.ready.set(1)
            log.info("serving %s (%s), batch sizes %s", predictor.model_name, self.spec.task, sizes)
        except Exception as exc:  # reported by /readyz and, as one line, by the CLI, which then stops
            self.load_error = str(exc) or type(exc).__name__
            log.debug("loading the model failed", exc_info=True)

    def pool(self) -> Any:
        if self._pool is None:
            from workers.feed import feeder

            self._pool = feeder(self.config.io_threads).pool
        return self._pool

    # -- images in ------------------------------------------------------------------------------------------
    def allowed(self, uri: str) -> bool:
        """A URI a client may make this server read (``ServeConfig.allow_uris``); local paths are compared
        once resolved, so ``..`` and links cannot leave an allowed folder."""
        for prefix in self.config.allow_uris:
            if "://" in prefix:
                if uri.startswith(prefix):
                    return True
            elif "://" not in uri or uri.startswith("file://"):
                path = os.path.realpath(uri.removeprefix("file://"))
                root = os.path.realpath(prefix)
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    return True
        return False

    async def decode_uploads(self, files: Sequence[tuple[str, bytes]]) -> list[Loaded]:
        loop = asyncio.get_running_loop()
        size = self.predictor.input_hw
        jobs = [loop.run_in_executor(self.pool(), from_bytes, name, data, self.decode, size) for name, data in files]
        return list(await asyncio.gather(*jobs))

    async def load_uris(self, uris: Sequence[str]) -> list[Loaded]:
        loop = asyncio.get_running_loop()
        size = self.predictor.input_hw
        return list(await asyncio.gather(*(loop.run_in_executor(self.pool(), load, uri, self.decode, size)
                                           for uri in uris)))

    # -- the model ------------------------------------------------------------------------------------------
    async def rows(self, loaded: Sequence[Loaded]) -> list[dict[str, Any]]:
        """One output row per image, in order (as ``batchinfer run`` writes it): decoded images through the
        batcher, failed ones straight to their error rows."""
        for item in loaded:
            self.metrics.images.labels("ok" if item.image is not None else "error").inc()
        good = [item for item in loaded if item.image is not None]
        self.metrics.queued.inc(len(good))
        try:
            done = iter(await self.batcher.submit_many(good))
        finally:
            self.metrics.queued.dec(len(good))
        failed = [item for item in loaded if item.image is None]
        errors = iter(to_rows(self.schema, self.predictor, host_inputs(failed), {}).to_pylist() if failed else [])
        return [next(done) if item.image is not None else next(errors) for item in loaded]

    def _run_batch(self, loaded: list[Loaded]) -> list[dict[str, Any]]:
        return predict_loaded(self.predictor, self.schema, loaded).to_pylist()

    @property
    def feature_columns(self) -> list[str]:
        return list(self.predictor.feature_columns) if self.predictor is not None else []

    def describe(self) -> dict[str, Any]:
        p = self.predictor
        info: dict[str, Any] = {
            "model": p.model_name if p else self.spec.name, "task": self.spec.task, "ready": self.ready,
            "max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms,
            "max_images": self.config.max_images, "max_body": self.config.max_body,
        }
        if p is not None:
            info.update(input_size=list(p.input_hw), weights_fingerprint=p.fingerprint,
                        feature_columns=p.feature_columns, top_k=p.top_k or None)
        if self.index is not None:
            info["index"] = {"count": self.index.count, "kind": self.index.kind, "metric": self.index.metric,
                             "column": self.index.column}
        return info
