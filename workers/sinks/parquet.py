"""Parquet sink: one file per shard, ``<output>/shard-NNNNNN.parquet``, written then renamed."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.contract import shard_name
from workers.errors import ConfigError
from workers.sinks.base import Sink
from workers.storage import storage_for


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


def read_shard(uri: str) -> pa.Table:
    """Read one shard's file back (used by the collector), from any storage backend."""
    return pq.read_table(io.BytesIO(storage_for(uri).read(uri)))
