"""Where a report's rows, job metadata and timings come from: a job id, or an output file, folder or S3 prefix.

A job id reads the job state from Redis (timings of every done shard) and its rows shard by shard from its
output (the Parquet folder or the Redis sink). An output is a Parquet file (``run`` or ``collect``: the
timings are in its metadata, ``workers.jobrecord``), a Parquet job's folder or prefix (timings in
``_manifest.json`` once the job finished) or a collected CSV / JSON Lines file (no metadata, no timings).
Rows are read a chunk at a time, only the columns asked for.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from producer.collect import EXTENSIONS
from workers.errors import ConfigError, SourceError
from workers.schema import read_job_metadata, read_job_record
from workers.storage import is_remote, storage_for

CHUNK_ROWS = 65_536
CHUNK_BYTES = 32 << 20  # of feature vectors a chunk: 6,553 rows of 1280 floats


def chunk_rows(schema: pa.Schema, columns: list[str]) -> int:
    """Rows a chunk: ``CHUNK_ROWS``, fewer when wide feature vectors would make it large."""
    types = [schema.field(c).type for c in columns]
    width = sum(4 * t.list_size for t in types if pa.types.is_fixed_size_list(t))
    return max(1024, min(CHUNK_ROWS, CHUNK_BYTES // width)) if width else CHUNK_ROWS


TEXT_FORMATS = ("csv", "jsonl")


@dataclass
class Source:
    """One report's input. ``tables(columns)`` streams its rows (only those of ``columns`` it has)."""

    name: str
    kind: str  # "job", "file" or "folder"
    fmt: str  # "parquet", "csv" or "jsonl"; a job: its sink, "parquet" or "redis"
    columns: list[str]
    metadata: dict[str, Any]
    record: dict[str, Any] | None  # the job's timings (workers.jobrecord), when the source has them
    rows: int | None  # how many rows to expect, when known (the progress bar)
    read: Callable[[list[str]], Iterator[pa.Table]]
    notes: list[str] = field(default_factory=list)  # shown at the top of the page
    output: str | None = None  # where a job's rows are
    no_timings: str | None = None  # why ``record`` is None

    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        return self.read([c for c in columns if c in self.columns])


def looks_like_path(source: str) -> bool:
    ext = os.path.splitext(source)[1].lower()
    return "://" in source or os.sep in source or "/" in source or (bool(ext) and ext in EXTENSIONS)


@contextlib.contextmanager
def open_source(source: str, broker: str | None = None) -> Iterator[Source]:
    """The ``Source`` of ``source`` (a job id or an output); temporary copies of S3 files go on exit."""
    with tempfile.TemporaryDirectory(prefix="batchinfer-report-") as workdir:
        local = source[len("file://"):] if source.startswith("file://") else source
        try:
            if is_remote(source) or os.path.exists(local):
                opened = _output_source(source, local, workdir)
            elif looks_like_path(source):
                raise SourceError(f"{source}: no such file or folder")
            else:
                from producer.jobs import check_job_id

                opened = _job_source(check_job_id(source), broker)
        except (OSError, pa.ArrowException) as exc:  # e.g. a shard file deleted, a truncated download
            raise SourceError(f"{source}: cannot read it: {exc}") from exc
        yield opened


# -- a job id ---------------------------------------------------------------------------------------------


def _job_source(job_id: str, broker: str | None) -> Source:
    from producer.collect import get_job, shard_tables
    from producer.jobs import connect_rows, connect_store
    from producer.submit import settings_with_broker
    from workers.contract import OutputSpec
    from workers.jobrecord import job_record
    from workers.jobstate import DONE

    settings = settings_with_broker(broker)
    store = connect_store(settings)
    try:
        job = get_job(store, job_id, shards=True)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (and no file or folder of that name)") from exc
    output = OutputSpec.from_dict(job.spec["output"])
    rows = connect_rows(settings) if output.sink == "redis" else None
    done = sorted(i for i, s in job.shards.items() if s.get("state") == DONE)
    schema = _job_schema(job_id, output, done, rows)
    metadata = read_job_metadata(schema) if schema is not None else {}
    if not metadata:
        model = job.spec.get("model") or {}
        metadata = {"job_id": job_id, "model": model.get("name"), "task": model.get("task"), "model_spec": model}

    def read(columns: list[str]) -> Iterator[pa.Table]:
        with contextlib.closing(shard_tables(job, output, rows, columns=columns)) as tables:
            yield from tables

    total = job.shards_total if job.shards_total is not None else len(job.shards)
    notes = []
    if not job.finished:
        notes.append(f"The job is not finished: {len(done)} of {total} shards are done "
                     f"({job.n_running} running). This page shows the shards done so far.")
    if job.cancelled:
        notes.append("The job was cancelled.")
    if job.n_failed:
        notes.append(f"{job.n_failed} shards failed: their images have no rows (the reasons are under Errors).")
    where = output.path if output.sink == "parquet" else "the Redis sink"
    return Source(job_id, "job", output.sink, list(schema.names) if schema is not None else [],
                  _clean(metadata), job_record(job), job.images_done, read, notes, where)


def _job_schema(job_id: str, output: Any, done: list[int], rows: Any) -> pa.Schema | None:
    if not done:
        return None
    if output.sink == "redis":
        return rows.schema(job_id)
    from workers.sinks.parquet import read_schema, shard_uri

    return read_schema(shard_uri(output.path or "", done[0]))


# -- an output ------------------------------------------------------------------------------------------


def _output_source(source: str, local: str, workdir: str) -> Source:
    storage = storage_for(source)
    ext = os.path.splitext(source.rstrip("/"))[1].lower()
    is_file = os.path.isfile(local) if not is_remote(source) else (bool(ext) and storage.exists(source))
    if not is_file:
        return _folder_source(source)
    fmt = EXTENSIONS.get(ext, "parquet")
    if is_remote(source):  # Parquet reads need seeks: one local copy, not the whole file in memory
        local = os.path.join(workdir, "source" + ext)
        with storage.open_read(source) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    if fmt in TEXT_FORMATS:
        return _text_source(source, local, fmt)
    try:
        parquet = pq.ParquetFile(local)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{source}: cannot read it as Parquet ({exc}); a report reads .parquet, .csv or "
                          ".jsonl files and output folders") from exc
    schema = parquet.schema_arrow
    record = read_job_record(schema)
    notes = _record_notes(record) if record is not None else []
    no_timings = None if record is not None else (
        "Timings are not recorded in this file (it was written before outputs kept them); "
        "`batchinfer report JOB` shows them while the job state is kept.")

    def read(columns: list[str]) -> Iterator[pa.Table]:
        for batch in parquet.iter_batches(batch_size=chunk_rows(schema, columns), columns=columns):
            yield pa.Table.from_batches([batch])

    return Source(source, "file", "parquet", list(schema.names), _clean(read_job_metadata(schema)), record,
                  parquet.metadata.num_rows, read, notes, no_timings=no_timings)


def _folder_source(source: str) -> Source:
    from producer.incremental import previous_files
    from workers.sinks.parquet import read_schema, read_shard

    files = previous_files(source, "SOURCE")
    base = source.rstrip("/")
    manifest: dict[str, Any] = {}
    with contextlib.suppress(FileNotFoundError, ValueError):  # none yet, or not ours: the rows still count
        manifest = json.loads(storage_for(f"{base}/_manifest.json").read(f"{base}/_manifest.json"))
    schema = read_schema(files[0])
    record = manifest.get("job")
    notes = _record_notes(record) if record else []
    no_timings = None
    if not manifest:
        notes.append("This folder has no _manifest.json (the job has not finished): the rows are the shards "
                     "written so far.")
        no_timings = ("Timings are in the job state until the job finishes and writes _manifest.json: "
                      "`batchinfer report JOB`.")
    elif record is None:
        no_timings = "Timings are not recorded in this folder's _manifest.json (written before it kept them)."

    def read(columns: list[str]) -> Iterator[pa.Table]:
        with ThreadPoolExecutor(4, thread_name_prefix="report-read") as pool:
            pending: deque[Future[pa.Table]] = deque()
            try:
                for uri in files:
                    pending.append(pool.submit(read_shard, uri, columns))
                    if len(pending) > 4:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    metadata = read_job_metadata(schema) or manifest.get("metadata") or {}
    return Source(source, "folder", "parquet", list(schema.names), _clean(metadata), record,
                  manifest.get("rows"), read, notes, no_timings=no_timings)


def _text_source(source: str, local: str, fmt: str) -> Source:
    with open(local, encoding="utf-8", newline="") as fh:
        first = fh.readline()
    if fmt == "csv":
        columns = next(csv.reader([first]), [])
    else:
        try:
            columns = list(json.loads(first)) if first.strip() else []
        except json.JSONDecodeError as exc:
            raise SourceError(f"{source}: not JSON Lines ({exc})") from exc
    if "uri" not in columns:
        raise SourceError(f"{source}: not a batchinfer output (no uri column)")

    def read(wanted: list[str]) -> Iterator[pa.Table]:
        yield from (_csv_tables(local, wanted) if fmt == "csv" else _jsonl_tables(local, wanted))

    why = (f"Timings are not recorded in {fmt.upper()} output (nor the job metadata): report the job, or its "
           "Parquet output, for them.")
    return Source(source, "file", fmt, columns, {}, None, None, read, no_timings=why)


# list columns are JSON text in CSV; the sampler reads them as such
TEXT_TYPES = {"uri": pa.string(), "error": pa.string(), "label": pa.string(), "score": pa.float32(),
              "size_bytes": pa.int64()}


def _csv_tables(path: str, columns: list[str]) -> Iterator[pa.Table]:
    from pyarrow import csv as pacsv

    convert = pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=True,
                                   column_types={c: TEXT_TYPES.get(c, pa.string()) for c in columns})
    try:
        with pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=16 << 20),
                            convert_options=convert) as reader:
            for batch in reader:
                yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as exc:
        raise SourceError(f"{path}: cannot read it as CSV ({exc})") from exc


def _jsonl_tables(path: str, columns: list[str]) -> Iterator[pa.Table]:
    with open(path, encoding="utf-8") as text:
        while True:
            try:
                rows = [json.loads(line) for line in _take(text, CHUNK_ROWS) if line.strip()]
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}: not JSON Lines ({exc})") from exc
            if not rows:
                return
            yield pa.table({c: _jsonl_column(c, [row.get(c) for row in rows]) for c in columns})


def _take(text: Any, n: int) -> list[str]:
    lines = []
    for line in text:
        lines.append(line)
        if len(lines) >= n:
            break
    return lines


def _jsonl_column(name: str, values: list[Any]) -> pa.Array:
    if name in TEXT_TYPES:
        return pa.array(values, TEXT_TYPES[name])
    if name.startswith("features") or name == "top_k_scores":
        return pa.array(values, pa.list_(pa.float32()))
    if name == "top_k_labels":
        return pa.array(values, pa.list_(pa.string()))
    return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def _record_notes(record: dict[str, Any]) -> list[str]:
    """What a recorded job says about the rows a file or folder holds."""
    notes = []
    if record.get("finished") is None:
        notes.append(f"The job was not finished when this output was written: {record.get('done', 0)} of "
                     f"{record.get('shards_total')} shards were done.")
    if record.get("failed"):
        notes.append(f"{record['failed']} shards failed: their images have no rows (the reasons are under Errors).")
    return notes


def _clean(metadata: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k != "shard_id"}
