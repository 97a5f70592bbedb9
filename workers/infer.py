"""One batch of loaded images -> the model -> Arrow rows: the step the shard pipeline, the HTTP service and
``batchinfer search`` share, so an image gets the same numbers whichever way it comes in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from workers.contract import ModelSpec
from workers.feed import Loaded
from workers.schema import build_batch, output_schema


@dataclass
class Inputs:
    """One batch ready for the model: per input its error and (width, height), the indices that decoded
    (``ok``), and those images as host arrays or as one batch already on the device."""

    batch: list[Loaded]
    errors: list[str | None]
    sizes: list[tuple[int, int] | None]
    ok: list[int]
    arrays: list[np.ndarray] = field(default_factory=list)
    device: Any = None
    seconds: float = 0.0  # decode time beyond the pool's (the device decoder's)


def host_inputs(batch: list[Loaded]) -> Inputs:
    """A batch decoded on the host (the pool's decoders)."""
    ok = [i for i, item in enumerate(batch) if item.image is not None]
    sizes = [(b.image.width, b.image.height) if b.image else None for b in batch]
    return Inputs(batch, [b.error for b in batch], sizes, ok, [batch[i].image.array for i in ok])  # type: ignore[union-attr]


def infer(predictor: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    """The model's outputs for the images of ``inputs`` that decoded (none: no model call)."""
    if not inputs.ok:
        return {}
    x = inputs.device if inputs.device is not None else predictor.preprocess(np.stack(inputs.arrays))
    return dict(predictor.predict(x))


def to_rows(schema: pa.Schema, predictor: Any, inputs: Inputs, outputs: dict[str, np.ndarray],
            kept: dict[str, pa.Array] | None = None) -> pa.RecordBatch:
    """One row per input, in order: the model's outputs, or the input's error."""
    batch = inputs.batch
    return build_batch(schema, [b.uri for b in batch], inputs.errors, inputs.sizes, inputs.ok, outputs,
                       predictor.labels, [b.info for b in batch], kept)


def schema_for(spec: ModelSpec, predictor: Any) -> pa.Schema:
    """The output schema of ``spec``'s rows as ``predictor`` makes them (no kept columns, no metadata)."""
    return output_schema(spec.task, spec.top_k, feature_columns=predictor.feature_columns)


def predict_loaded(predictor: Any, schema: pa.Schema, loaded: Sequence[Loaded]) -> pa.RecordBatch:
    """Rows for images already loaded (any number: run in batches of the predictor's size)."""
    size = predictor.spec.batch_size
    parts = []
    for start in range(0, len(loaded), size):
        inputs = host_inputs(list(loaded[start:start + size]))
        parts.append(to_rows(schema, predictor, inputs, infer(predictor, inputs)))
    if len(parts) == 1:  # the service's batches: one model call, no copy
        return parts[0]
    if not parts:
        return pa.RecordBatch.from_pylist([], schema=schema)
    return pa.Table.from_batches(parts, schema).combine_chunks().to_batches()[0]
