"""Redis sink: one hash per image, ``batchinfer:job:{job}:img:{uri}``.

Fields: ``uri``, ``shard``, ``width``, ``height``, ``error`` (only on failure); for classify
``label``, ``score`` and ``top_k_indices`` / ``top_k_labels`` / ``top_k_scores`` as JSON lists;
for features ``features`` as raw little-endian float32 bytes (the layout RediSearch vector fields
index). ``close()`` atomically replaces the shard's row list ``batchinfer:job:{job}:rows:{shard}``,
which the collector reads; a re-run overwrites the same keys, so rows are never duplicated.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import redis

from workers import keys
from workers.settings import Settings
from workers.sinks.base import Sink

FEATURE_DTYPE = np.dtype("<f4")


class RedisSink(Sink):
    """Writes rows as they come (pipelined), commits the shard's row list at ``close()``."""

    def __init__(self, task: Any, schema: pa.Schema, settings: Settings | None = None) -> None:
        settings = settings or Settings.from_env()
        self.client = redis.Redis.from_url(settings.redis_sink_url)
        self.job_id = task.job_id
        self.shard = task.name
        self.ttl = int(task.output.ttl or 0)
        self.schema = schema
        self.row_keys: list[str] = []

    def write(self, batch: pa.RecordBatch) -> None:
        pipe = self.client.pipeline(transaction=False)
        for row in batch.to_pylist():
            key = keys.image(self.job_id, row["uri"])
            pipe.delete(key)  # a re-run must not keep stale fields (e.g. an old error)
            pipe.hset(key, mapping=encode_row(row, self.shard))
            if self.ttl:
                pipe.expire(key, self.ttl)
            self.row_keys.append(key)
        pipe.execute()

    def close(self) -> None:
        rows_key = keys.shard_rows(self.job_id, self.shard)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(rows_key)
        if self.row_keys:
            pipe.rpush(rows_key, *self.row_keys)
            if self.ttl:
                pipe.expire(rows_key, self.ttl)
        pipe.execute()


def encode_row(row: dict[str, Any], shard: str) -> dict[str, Any]:
    out: dict[str, Any] = {"uri": row["uri"], "shard": shard}
    for name, value in row.items():
        if name == "uri" or value is None:
            continue
        if name == "features":
            out[name] = np.asarray(value, dtype=FEATURE_DTYPE).tobytes()
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def decode_row(raw: dict[bytes, bytes], schema: pa.Schema) -> dict[str, Any]:
    """A hash read back from Redis -> a row of ``schema`` (the inverse of ``encode_row``)."""
    row: dict[str, Any] = {}
    for field in schema:
        value = raw.get(field.name.encode())
        if value is None:
            row[field.name] = None
        elif field.name == "features":
            row[field.name] = np.frombuffer(value, dtype=FEATURE_DTYPE).tolist()
        elif pa.types.is_list(field.type):
            row[field.name] = json.loads(value)
        elif pa.types.is_integer(field.type):
            row[field.name] = int(value)
        elif pa.types.is_floating(field.type):
            row[field.name] = float(value)
        else:
            row[field.name] = value.decode()
    return row
