"""Parquet sink: one file per shard, ``<output>/shard-NNNNNN.parquet``, written then renamed.

The output folder is a Parquet dataset that pyarrow, pandas, DuckDB, polars and Spark read as it is:
every file has the same schema (job metadata included), temporary names start with ``.`` and the
spooled URI lists live under ``_batchinfer/`` (both ignored by dataset readers), and when the job
finishes the worker that finished it writes ``_manifest.json`` (job metadata, schema, each shard's
file and row count, the job's shard timings for ``batchinfer report``) and then, if no shard failed,
``_SUCCESS`` — last, so a reader that sees it sees every shard. Readers during the job see only committed
shards.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.contract import shard_name
from workers.errors import ConfigError
from workers.jobrecord import job_record
from workers.schema import METADATA_KEY
from workers.sinks.base import Sink
from workers.storage import check_writable, storage_for
from workers.storage.local import to_path as storage_path

ROW_GROUP_ROWS = 65_536
ROW_GROUP_BYTES = 64 << 20


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
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = self._pending_bytes = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffered into row groups of up to ``ROW_GROUP_ROWS`` rows / ``ROW_GROUP_BYTES`` (a whole
        shard is usually one row group), not one per model batch."""
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=self._pending_rows)
            self._pending, self._pending_rows, self._pending_bytes = [], 0, 0

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._file.commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._file.discard()

    @classmethod
    def check(cls, output: Any) -> None:
        if not output.path:
            raise ConfigError("the parquet sink needs an output folder (--output DIR)")
        check_writable(output.path, folder=True)

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
        meta = pq.read_metadata(_source(uri))
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

    @classmethod
    def on_job_complete(cls, job: Any) -> None:
        """Write ``_manifest.json``, then ``_SUCCESS`` if every shard is done (see the module docstring)."""
        output = job.spec["output"]
        if not output.get("path"):
            return
        base = output["path"].rstrip("/")
        done = sorted((i, r) for i, r in job.shards.items() if r.get("state") == "done")
        schema = read_schema(shard_uri(base, done[0][0])) if done else None
        manifest = {
            "job_id": job.job_id,
            "created": job.created,
            "finished": job.finished_at,
            "metadata": json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}")) if schema else {},
            "schema": [{"name": f.name, "type": str(f.type)} for f in schema] if schema else [],
            "rows": sum(int(r.get("images", 0)) for _, r in done),
            "error_rows": sum(int(r.get("errors", 0)) for _, r in done),
            "shards": [{"file": f"{shard_name(i)}.parquet", "rows": r.get("images"), "errors": r.get("errors")}
                       for i, r in done],
            "failed_shards": sorted(i for i, r in job.shards.items() if r.get("state") == "failed"),
            "job": job_record(job),
        }
        _write_bytes(f"{base}/_manifest.json", json.dumps(manifest, indent=1).encode())
        if not manifest["failed_shards"] and len(done) == job.n_shards:
            _write_bytes(f"{base}/_SUCCESS", b"")


def _write_bytes(uri: str, data: bytes) -> None:
    with storage_for(uri).open_atomic(uri) as target, open(target.path, "wb") as fh:
        fh.write(data)


def read_shard(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file back (a shard for the collector, a previous output for an incremental run),
    local files in place, others through their storage backend."""
    return pq.read_table(_source(uri), columns=columns)


def read_schema(uri: str) -> pa.Schema:
    return pq.read_schema(_source(uri))


def _source(uri: str) -> Any:
    """A local path as it is; another backend's bytes copied into memory that Arrow owns.

    Never a Python object (``io.BytesIO``, ``pa.py_buffer``): Arrow's Parquet scan lets go of its
    source and of the buffers read from it on its own pool threads, after ``read_table`` has returned.
    Releasing a Python object there takes the GIL; once the interpreter is finalizing, that thread is
    ended inside a C++ destructor and the process aborts ("terminate called without an active
    exception", exit 134) after the command has done its work. ``scripts/collect_loop.py`` shows it.
    """
    if "://" not in uri or uri.startswith("file://"):
        return storage_path(uri)
    return pa.BufferReader(_arrow_bytes(storage_for(uri).read(uri)))


def _arrow_bytes(data: bytes) -> pa.Buffer:
    """``data`` copied into a buffer of Arrow's allocator (one native copy); see ``_source`` for why."""
    buf = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(buf).write(data)
    return buf
