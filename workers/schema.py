"""The output schema (a contract) and the builder that turns one batch into Arrow rows.

Every input image yields exactly one row. Failed images keep ``uri`` and ``error`` (and the kept
manifest columns, which are join keys) and have nulls elsewhere. Kept columns come last, so the
documented columns keep their places whatever the manifest. Job metadata goes into the Parquet
key-value metadata under the key ``batchinfer``; a collected file also has the job's shard timings under
``batchinfer.job`` (``workers.jobrecord``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

METADATA_KEY = b"batchinfer"
JOB_RECORD_KEY = b"batchinfer.job"


def output_schema(
    task: str, top_k: int = 5, feature_dim: int | None = None, feature_columns: dict[str, int] | None = None,
    keep: Sequence[tuple[str, str]] = (),
) -> pa.Schema:
    """The schema for ``task`` (``classify``, ``features`` or ``classify,features``).

    ``feature_columns`` maps each feature column to its fixed dimension; ``feature_dim`` is the
    shorthand for the single ``features`` column. ``keep``: the kept manifest columns, ``(name, Arrow
    type)`` pairs (``OutputSpec.keep_columns``), appended in that order.
    """
    tasks = task.split(",")
    unknown = set(tasks) - {"classify", "features"}
    if unknown:
        raise ValueError(f"unknown task {task!r}")
    fields = [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("size_bytes", pa.int64()),
        pa.field("modified", pa.timestamp("us", tz="UTC")),
        pa.field("etag", pa.string()),
    ]
    if "classify" in tasks:
        fields += [
            pa.field("label", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("top_k_indices", pa.list_(pa.int32())),
            pa.field("top_k_labels", pa.list_(pa.string())),
            pa.field("top_k_scores", pa.list_(pa.float32())),
        ]
    if "features" in tasks:
        columns = feature_columns or ({"features": feature_dim} if feature_dim else {})
        if not columns:
            raise ValueError("features output needs a feature dimension")
        fields += [pa.field(name, pa.list_(pa.float32(), dim)) for name, dim in columns.items()]
    fields += [pa.field(name, arrow_type(type_name)) for name, type_name in keep]
    return pa.schema(fields)


def arrow_type(name: str) -> pa.DataType:
    """An Arrow type from its name as ``str(type)`` writes it (``int64``, ``double``, ``string``, ``bool``)."""
    return pa.type_for_alias(name)


def kept_arrays(schema: pa.Schema, columns: dict[str, list[Any]], start: int, stop: int) -> dict[str, pa.Array]:
    """Rows ``start:stop`` of the kept columns' values, typed as ``schema`` says."""
    return {name: pa.array(values[start:stop], schema.field(name).type) for name, values in columns.items()}


def feature_column_names(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]


def with_job_metadata(schema: pa.Schema, metadata: dict[str, Any]) -> pa.Schema:
    return schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def read_job_metadata(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def with_job_record(schema: pa.Schema, record: dict[str, Any]) -> pa.Schema:
    """``schema`` with the job's compact record (``workers.jobrecord``) added beside its other metadata."""
    compact = json.dumps(record, separators=(",", ":")).encode()
    return schema.with_metadata({**(schema.metadata or {}), JOB_RECORD_KEY: compact})


def read_job_record(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(JOB_RECORD_KEY)
    return json.loads(raw) if raw else None


def build_batch(
    schema: pa.Schema,
    uris: Sequence[str],
    errors: Sequence[str | None],
    sizes: Sequence[tuple[int, int] | None],
    ok: Sequence[int],
    outputs: dict[str, np.ndarray],
    labels: Sequence[str] | None = None,
    infos: Sequence[Any] | None = None,
    kept: dict[str, pa.Array] | None = None,
) -> pa.RecordBatch:
    """Rows for one batch; ``ok`` lists the positions that went through the model, in order.

    ``infos``: the version of each file that was read (``FileInfo``: size, mtime, ETag), None where
    it could not be read. ``kept``: the kept manifest columns' arrays for these rows (``kept_arrays``)."""
    n = len(uris)
    infos = infos or [None] * n
    columns: dict[str, Any] = {
        "uri": pa.array(list(uris), pa.string()),
        "error": pa.array(list(errors), pa.string()),
        "width": pa.array([s[0] if s else None for s in sizes], pa.int32()),
        "height": pa.array([s[1] if s else None for s in sizes], pa.int32()),
        "size_bytes": pa.array([i.size if i else None for i in infos], pa.int64()),
        "modified": pa.array([i.modified if i else None for i in infos], pa.timestamp("us", tz="UTC")),
        "etag": pa.array([i.etag if i else None for i in infos], pa.string()),
    }
    names = schema.names
    if "label" in names:
        idx: list[Any] = [None] * n
        scores: list[Any] = [None] * n
        for row, pos in enumerate(ok):
            idx[pos] = outputs["top_k_indices"][row].tolist()
            scores[pos] = outputs["top_k_scores"][row].tolist()
        lab = [[labels[i] for i in r] if r is not None and labels else None for r in idx]
        columns["label"] = pa.array([r[0] if r else None for r in lab], pa.string())
        columns["score"] = pa.array([s[0] if s else None for s in scores], pa.float32())
        columns["top_k_indices"] = pa.array(idx, pa.list_(pa.int32()))
        columns["top_k_labels"] = pa.array(lab, pa.list_(pa.string()))
        columns["top_k_scores"] = pa.array(scores, pa.list_(pa.float32()))
    for name in feature_column_names(schema):
        dim = schema.field(name).type.list_size
        flat = np.zeros((n, dim), dtype=np.float32)
        if ok:
            flat[list(ok)] = outputs[name]
        arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float32()), dim)
        mask = np.ones(n, dtype=bool)
        mask[list(ok)] = False
        columns[name] = _null_where(arr, mask) if mask.any() else arr
    columns.update(kept or {})
    return pa.RecordBatch.from_arrays([columns[name] for name in names], schema=schema)


def _null_where(arr: pa.FixedSizeListArray, mask: np.ndarray) -> pa.Array:
    """Same values with nulls at ``mask`` (without a round trip through Python lists)."""
    import pyarrow.compute as pc

    return pc.if_else(pa.array(mask), pa.nulls(len(arr), arr.type), arr)
