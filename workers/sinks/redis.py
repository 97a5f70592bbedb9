"""Redis sink: one hash per image, ``batchinfer:job:{job}:img:{uri}``.

Fields: ``uri``, ``shard``, ``width``, ``height``, ``error`` (only on failure); for classify
``label``, ``score`` and ``top_k_indices`` / ``top_k_labels`` / ``top_k_scores`` as JSON lists;
for features ``features`` (or ``features_<layer>``) as raw little-endian float32 bytes (the layout
RediSearch vector fields index); kept manifest columns as text (booleans ``1``/``0``), absent when null.
Rows are first written under staging keys; ``close()`` renames them over the final keys
and replaces the shard's row list ``batchinfer:job:{job}:rows:{shard}`` (and its counts in
``batchinfer:job:{job}:committed``) in one MULTI/EXEC, so a
crashed attempt changes nothing and a re-run overwrites the same keys (rows are never duplicated).
Staging keys expire after a day if a worker dies before it can clean up.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import numpy as np
import pyarrow as pa

from workers.keys import Keys
from workers.redis_conn import redis_client, shared_client
from workers.settings import Settings
from workers.sinks.base import Sink

FEATURE_DTYPE = np.dtype("<f4")


STAGING_TTL = 24 * 3600


class RedisSink(Sink):
    """Stages rows as they come (pipelined); ``close()`` commits them all at once."""

    def __init__(self, task: Any, schema: pa.Schema, settings: Settings | None = None) -> None:
        settings = settings or Settings.from_env()
        self.client = shared_client(settings.redis_sink_url, settings.redis_tls)
        self.keys = Keys(settings.namespace)
        self.job_id = task.job_id
        self.shard = task.name
        self.ttl = int(task.output.ttl or 0)
        self.schema = schema
        self.vectors = frozenset(f.name for f in schema if pa.types.is_fixed_size_list(f.type))
        self.staging = self.keys.staging(self.job_id, self.shard, uuid.uuid4().hex[:12])
        self.staged: list[tuple[str, str]] = []  # (staging key, final key)
        self.errors = 0

    def write(self, batch: pa.RecordBatch) -> None:
        pipe = self.client.pipeline(transaction=False)
        table = pa.Table.from_batches([batch])
        for i, field in enumerate(table.schema):
            if pa.types.is_timestamp(field.type):  # stored as integer microseconds
                table = table.set_column(i, field.name, table.column(i).cast(pa.int64()))
        for row in table.to_pylist():
            self.errors += row.get("error") is not None
            temp = f"{self.staging}:{len(self.staged)}"
            pipe.hset(temp, mapping=encode_row(row, self.shard, self.vectors))
            pipe.expire(temp, STAGING_TTL)
            self.staged.append((temp, self.keys.image(self.job_id, row["uri"])))
        pipe.execute()

    def close(self) -> None:
        rows_key = self.keys.shard_rows(self.job_id, self.shard)
        pipe = self.client.pipeline(transaction=True)
        for temp, final in self.staged:
            pipe.rename(temp, final)  # replaces the whole hash: no stale fields from an earlier run
            if self.ttl:
                pipe.expire(final, self.ttl)
            else:
                pipe.persist(final)
        pipe.set(self.keys.schema(self.job_id), self.schema.serialize().to_pybytes())
        if self.ttl:
            pipe.expire(self.keys.schema(self.job_id), self.ttl)
        pipe.delete(rows_key)
        if self.staged:
            pipe.rpush(rows_key, *(final for _, final in self.staged))
            if self.ttl:
                pipe.expire(rows_key, self.ttl)
        # the commit record a later attempt reads instead of redoing the shard (see ``committed``)
        pipe.hset(self.keys.committed(self.job_id), self.shard,
                  json.dumps({"images": len(self.staged), "errors": self.errors}))
        if self.ttl:
            pipe.expire(self.keys.committed(self.job_id), self.ttl)
        pipe.execute()

    @classmethod
    def committed(cls, task: Any, settings: Any) -> dict[str, int] | None:
        settings = settings or Settings.from_env()
        client = shared_client(settings.redis_sink_url, settings.redis_tls)
        raw = client.hget(Keys(settings.namespace).committed(task.job_id), task.name)
        if raw is None:
            return None
        counts = json.loads(raw)
        return counts if counts.get("images") == len(task.uris) else None

    def abort(self) -> None:
        if self.staged:
            self.client.delete(*(temp for temp, _ in self.staged))


Field = bytes | str | int | float  # what a Redis hash field holds (redis-py's EncodableT)


def encode_row(row: dict[str, Any], shard: str, vectors: frozenset[str] | None = None) -> dict[Any, Field]:
    """A row as hash fields; ``vectors``: the feature columns (default: names starting ``features``)."""
    out: dict[Any, Field] = {"uri": row["uri"], "shard": shard}  # Any: redis-py types keys invariantly
    for name, value in row.items():
        if name == "uri" or value is None:
            continue
        vector = name in vectors if vectors is not None else name.startswith("features")
        if vector:
            out[name] = np.asarray(value, dtype=FEATURE_DTYPE).tobytes()
        elif isinstance(value, list):
            out[name] = json.dumps(value)
        elif isinstance(value, bool):  # redis-py refuses booleans
            out[name] = int(value)
        else:
            out[name] = value
    return out


class RedisRows:
    """A job's committed rows read back (``collect``, ``report``): the sink's server and key names."""

    def __init__(self, client: Any, keys: Keys | None = None) -> None:
        self.client = client
        self.keys = keys or Keys()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisRows:
        return cls(redis_client(settings.redis_sink_url, settings.redis_tls, socket_connect_timeout=5),
                   Keys(settings.namespace))

    def schema(self, job_id: str) -> pa.Schema | None:
        """The job's output schema, as the sink stored it (None before any shard committed)."""
        raw = self.client.get(self.keys.schema(job_id))
        return pa.ipc.read_schema(pa.py_buffer(raw)) if raw else None

    def shard(self, job_id: str, shard: str, schema: pa.Schema) -> pa.Table:
        return read_rows(self.client, self.keys.shard_rows(job_id, shard), schema)


def read_rows(client: Any, rows_key: str, schema: pa.Schema) -> pa.Table:
    """A shard's rows as an Arrow table: one pipelined round trip, feature vectors straight from their
    bytes into Arrow through numpy (no Python float per value)."""
    row_keys = client.lrange(rows_key, 0, -1)
    pipe = client.pipeline(transaction=False)
    for key in row_keys:
        pipe.hgetall(key)
    raws = pipe.execute()
    columns = []
    for field in schema:
        name = field.name.encode()
        values = [raw.get(name) for raw in raws]
        if pa.types.is_fixed_size_list(field.type):
            dim = field.type.list_size
            missing = np.array([v is None for v in values], dtype=bool)
            zero = bytes(dim * FEATURE_DTYPE.itemsize)
            flat = np.frombuffer(b"".join(zero if v is None else v for v in values), dtype=FEATURE_DTYPE)
            array = pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32, copy=False)), dim,
                                                      mask=pa.array(missing) if missing.any() else None)
            columns.append(array.cast(field.type))
        else:
            columns.append(pa.array([None if v is None else _scalar(v, field.type) for v in values],
                                    type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _scalar(value: bytes, type_: pa.DataType) -> Any:
    if pa.types.is_list(type_):
        return json.loads(value)
    if pa.types.is_boolean(type_):
        return value == b"1"
    if pa.types.is_integer(type_) or pa.types.is_timestamp(type_):
        return int(value)
    if pa.types.is_floating(type_):
        return float(value)
    return value.decode()
