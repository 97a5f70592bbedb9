"""Parquet sink: one file per shard, ``<output>/shard-NNNNNN.parquet``, written then renamed."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.contract import shard_name
from workers.errors import ConfigError
from workers.schema import METADATA_KEY
from workers.sinks.base import Sink
from workers.storage import storage_for
from workers.storage.local import to_path as storage_path


def shard_uri(output: str, shard_id: int) -> str:
    return f"{output.rstrip('/')}/{shard_name(shard_id)}.parquet"


class ParquetSink(Sink):
    """Streams batches into a temporary file; ``close()`` moves it into place atomically.

    A re-run shard replaces its file, so the output never holds two copies of a row.
    """

    def __init__(self, task: Any, schema: pa.Schema, settings: Any = None) -> None:
        if not task.output.path:
            raise ConfigError("the parquet sink needs an output folder (--output DIR)")
        self.uri = shard_uri(task.output.path, task.shard_id)
        self._file = storage_for(self.uri).open_atomic(self.uri)
        self._writer = pq.ParquetWriter(self._file.path, schema, compression="zstd")
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._file.discard()


    @classmethod
    def committed(cls, task: Any, settings: Any) -> dict[str, int] | None:
        if not task.output.path:
            return None
        uri = shard_uri(task.output.path, task.shard_id)
        storage = storage_for(uri)
        if hasattr(storage, "remove_stale"):  # temporary files that killed attempts of this shard left
            storage.remove_stale(uri)
        if not storage.exists(uri):
            return None
        meta = pq.read_metadata(io.BytesIO(storage.read(uri)) if "://" in uri else storage_path(uri))
        job = json.loads((meta.metadata or {}).get(METADATA_KEY, b"{}"))
        if job.get("job_id") != task.job_id or meta.num_rows != len(task.uris):
            return None  # another job's file in the same folder, or a different shard layout
        error_col = meta.schema.to_arrow_schema().get_field_index("error")
        nulls = 0
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(error_col).statistics
            if stats is None or not stats.has_null_count:
                return None
            nulls += stats.null_count
        return {"images": meta.num_rows, "errors": meta.num_rows - nulls}


def read_shard(uri: str) -> pa.Table:
    """Read one shard's file back (used by the collector), from any storage backend."""
    return pq.read_table(io.BytesIO(storage_for(uri).read(uri)))
