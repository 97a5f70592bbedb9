"""The task contract: JSON-safe specs that travel from the producer to the workers.

A task message is ``{"task": ShardTask.to_dict()}``: job id, shard id, URIs, a model spec and an
output spec. Nothing in it is pickled and nothing in it is secret (connection URLs with passwords
come from each process's environment, never from the message).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

TASK_NAME = "batchinfer.process_shard"
TASKS = ("classify", "features")
POOLINGS = ("avg", "max")
DECODES = ("fast", "keras")
SINKS = ("parquet", "redis")


def shard_name(shard_id: int) -> str:
    """Zero-padded, deterministic shard name used for files and keys."""
    return f"shard-{shard_id:06d}"


@dataclass(frozen=True)
class ModelSpec:
    """What to run: architecture, weights and what to extract.

    ``weights`` is ``"imagenet"``, ``"none"`` (random, seeded so every worker agrees) or a local path.
    ``input_size`` of ``None`` means the architecture's default size.
    """

    name: str = "MobileNetV2"
    weights: str = "imagenet"
    task: str = "classify"
    top_k: int = 5
    pooling: str = "avg"
    layer: str | None = None
    input_size: int | None = None
    decode: str = "fast"
    batch_size: int = 32

    def cache_key(self) -> str:
        """Identity of the built model: specs that differ only in batch-independent fields share it."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class OutputSpec:
    """Where rows go. ``path`` is the Parquet folder; the Redis sink uses ``ttl`` (seconds, 0 = none)."""

    sink: str = "parquet"
    path: str | None = None
    ttl: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard of image URIs of one job."""

    job_id: str
    shard_id: int
    uris: list[str]
    model: ModelSpec = field(default_factory=ModelSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    @property
    def name(self) -> str:
        return shard_name(self.shard_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardTask:
        return cls(
            job_id=str(data["job_id"]),
            shard_id=int(data["shard_id"]),
            uris=[str(u) for u in data["uris"]],
            model=ModelSpec.from_dict(data.get("model", {})),
            output=OutputSpec.from_dict(data.get("output", {})),
        )


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, for the output metadata (which weights produced these rows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
