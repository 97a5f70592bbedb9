"""The task contract: JSON-safe specs that travel from the producer to the workers.

A task message is ``{"task": ShardTask.to_dict()}``: job id, shard id, the URIs or (for spooled
jobs, see ``workers.spool``) the URI of the file that lists them, a model spec and an output spec.
Nothing in it is pickled and nothing in it is secret (connection URLs with passwords come from each
process's environment, never from the message). What travels beside a shard's URIs (kept manifest
columns, carry rows) is a ``ShardList``, stored with the URIs rather than in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

TASK_NAME = "batchinfer.process_shard"
TASKS = ("classify", "features", "classify,features")
POOLINGS = ("avg", "max", "none")
PREPROCESS_FAMILIES = ("caffe", "tf", "torch", "none")
DECODES = ("fast", "keras", "gpu")
PRECISIONS = ("float32", "float16", "bfloat16")  # float16/bfloat16: Keras's mixed_* policy, float32 variables
SINKS = ("parquet", "redis")


def shard_name(shard_id: int) -> str:
    """Zero-padded, deterministic shard name used for files and keys."""
    return f"shard-{shard_id:06d}"


@dataclass(frozen=True)
class ModelSpec:
    """What to run: architecture (or a model file), weights and what to extract.

    ``weights`` is ``"imagenet"``, ``"none"`` (random, seeded so every worker agrees) or a local path.
    ``task`` is ``classify``, ``features`` or ``classify,features`` (one forward pass for both).
    ``layers`` are feature layers (empty: the model's last feature map); ``input_shape`` is (H, W),
    ``None`` for the model's own size. ``model_path`` replaces ``name`` for your own model files.
    ``precision`` is the compute dtype (``PRECISIONS``); outputs are float32 whatever it is.
    """

    name: str = "MobileNetV2"
    weights: str = "imagenet"
    task: str = "classify"
    top_k: int = 5
    pooling: str = "avg"
    layers: tuple[str, ...] = ()
    input_shape: tuple[int, int] | None = None
    decode: str = "fast"
    batch_size: int = 32
    model_path: str | None = None
    labels: str | None = None
    preprocess: str | None = None
    precision: str = "float32"

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.task.split(","))

    def feature_columns(self) -> list[str]:
        """Output column per feature layer: ``features`` for one, ``features_<layer>`` for several."""
        if "features" not in self.tasks:
            return []
        if len(self.layers) <= 1:
            return ["features"]
        return [f"features_{layer}" for layer in self.layers]

    def cache_key(self) -> str:
        """Identity of the built model (everything but the decode mode, which the model never sees)."""
        data = dataclasses.asdict(self)
        data.pop("decode")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        values["layers"] = tuple(values.get("layers") or ())
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(int(v) for v in values["input_shape"])
        return cls(**values)


@dataclass(frozen=True)
class OutputSpec:
    """Where rows go. ``path`` is the Parquet folder; the Redis sink uses ``ttl`` (seconds, 0 = none).

    ``keep_columns`` are the manifest columns copied into every row (``--keep-columns``), as
    ``(name, Arrow type)`` pairs (``("id", "int64")``): the type is fixed once per job by the producer,
    so every shard's schema is the same whatever values its own rows have.
    """

    sink: str = "parquet"
    path: str | None = None
    ttl: int = 0
    keep_columns: tuple[tuple[str, str], ...] = ()

    @property
    def keep_names(self) -> list[str]:
        return [name for name, _ in self.keep_columns]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutputSpec:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        values["keep_columns"] = tuple((str(n), str(t)) for n, t in values.get("keep_columns") or ())
        return cls(**values)


@dataclass
class ShardList:
    """A shard's URIs and what travels with them: the values of the kept manifest columns (one list per
    column, aligned with ``uris``) and, for a carry shard of an incremental run, where each previous row is
    (``{"files": [...], "rows": [[file, row], ...]}``, see ``producer.incremental``).

    Its JSON body (spooled, or kept in the job state) is the plain URI list when nothing travels beside
    the URIs, the form earlier versions wrote, and otherwise ``{"uris": [...], "columns": {...},
    "files": [...], "rows": [...]}`` with only the keys that apply. Both forms are read.
    """

    uris: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    carry: dict[str, Any] | None = None

    def body(self) -> Any:
        if not self.columns and self.carry is None:
            return self.uris
        out: dict[str, Any] = {"uris": self.uris}
        if self.columns:
            out["columns"] = self.columns
        out.update(self.carry or {})
        return out

    @classmethod
    def from_body(cls, body: Any) -> ShardList:
        if isinstance(body, list):
            return cls([str(u) for u in body])
        rest = dict(body)
        uris = [str(u) for u in rest.pop("uris")]
        columns = rest.pop("columns", None) or {}
        return cls(uris, columns, rest or None)


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: a shard of image URIs of one job."""

    job_id: str
    shard_id: int
    uris: list[str]
    model: ModelSpec = field(default_factory=ModelSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    uris_ref: str | None = None  # where the URIs are listed when they do not travel in the message
    columns: dict[str, list[Any]] = field(default_factory=dict)  # kept manifest values, aligned with ``uris``

    @property
    def name(self) -> str:
        return shard_name(self.shard_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only (tuples become lists), exactly what travels in the message."""
        return message(self.job_id, self.shard_id, spec_dicts(self.model, self.output), self.uris, self.uris_ref,
                       self.columns)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardTask:
        return cls(
            job_id=str(data["job_id"]),
            shard_id=int(data["shard_id"]),
            uris=[str(u) for u in data.get("uris") or ()],
            model=ModelSpec.from_dict(data.get("model", {})),
            output=OutputSpec.from_dict(data.get("output", {})),
            uris_ref=data.get("uris_ref"),
            columns={str(k): list(v) for k, v in (data.get("columns") or {}).items()},
        )


def spec_dicts(model: ModelSpec, output: OutputSpec) -> dict[str, Any]:
    """The model and output specs as JSON types, computed once per job (not once per shard)."""
    return json.loads(json.dumps({"model": dataclasses.asdict(model), "output": dataclasses.asdict(output)}))


def message(job_id: str, shard_id: int, specs: dict[str, Any], uris: list[str] | None = None,
            uris_ref: str | None = None, columns: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """A task message's ``task`` argument from precomputed ``spec_dicts`` (cheap: no deep copies).

    Kept column values go with the URIs: in the message only when the URIs are in it too."""
    out: dict[str, Any] = {"job_id": job_id, "shard_id": shard_id, **specs}
    if uris_ref:
        out["uris_ref"] = uris_ref
    else:
        out["uris"] = list(uris or ())
        if columns:
            out["columns"] = columns
    return out


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, for the output metadata (which weights produced these rows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
