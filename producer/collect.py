"""``batchinfer collect``: gather every row of a job, shard by shard, into one file.

Rows are streamed (one shard in memory at a time) into a temporary file that is renamed into place.
Missing or failed shards make it fail and say which, unless partial output is allowed. A Parquet file
also carries the job's shard timings (``workers.jobrecord``), so ``batchinfer report`` of the file has them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from itertools import chain
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from workers.contract import OutputSpec
from workers.errors import BatchInferError, ConfigError
from workers.jobrecord import job_record
from workers.jobstate import DONE, FAILED, JobState
from workers.schema import read_job_metadata, with_job_metadata, with_job_record
from workers.sinks.parquet import read_shard, shard_uri
from workers.storage import storage_for

if TYPE_CHECKING:
    from workers.sinks.redis import RedisRows

FORMATS = ("parquet", "csv", "jsonl")


class IncompleteJob(BatchInferError):
    """Some shards are missing or failed."""


EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl",
              ".ndjson": "jsonl", "": "parquet"}


def format_for(path: str, fmt: str | None) -> str:
    """``--format``, else the file extension (no extension: Parquet); an unknown extension is an error."""
    if fmt:
        return fmt
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext not in EXTENSIONS:
        raise ConfigError(f"cannot tell the output format of {path}: use .parquet, .csv or .jsonl, or --format")
    return EXTENSIONS[ext]


def wait_for(store: Any, job_id: str, interval: float = 1.0, timeout: float | None = None,
             progress: bool = True) -> JobState:
    """Poll until every shard is done or failed, with a progress bar on stderr."""
    job = get_job(store, job_id)
    bar = tqdm(total=job.images_total, initial=job.images_done, desc=f"job {job_id}", unit="img", file=sys.stderr,
               disable=not progress)  # ``initial``: images done before we came are not part of the rate
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if job.images_total is not None and bar.total != job.images_total:
                bar.total = job.images_total
            bar.set_postfix(failed=job.count(FAILED), refresh=False)
            bar.update(max(job.images_done - bar.n, 0))  # a delta, so tqdm's rate and ETA are real
            bar.refresh()
            if job.finished:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise IncompleteJob(f"job {job_id} not finished after {timeout:g}s")
            time.sleep(interval)
            job = get_job(store, job_id)
    finally:
        bar.close()


def get_job(store: Any, job_id: str, shards: bool = False) -> JobState:
    job = store.get_job(job_id, shards=shards)
    if job is None:
        raise ConfigError(f"unknown job {job_id!r}")
    return job


def check_complete(job: JobState) -> list[str]:
    """Human descriptions of every shard that is not done (empty when the job is complete)."""
    problems = []
    if job.submit_error:
        problems.append(f"submission failed: {job.submit_error}")
    elif not job.submitted:
        problems.append("submission not finished (the producer is still enqueuing, or stopped)")
    if job.cancelled:
        problems.append("the job was cancelled")
    total = job.shards_total if job.shards_total is not None else (max(job.shards, default=-1) + 1)
    for shard_id in range(total):
        state = job.shards.get(shard_id, {})
        if state.get("state") == DONE:
            continue
        why = state.get("reason") or state.get("state") or "missing"
        problems.append(f"shard-{shard_id:06d}: {state.get('state', 'missing')}"
                        + (f" ({why})" if state.get("state") == FAILED else ""))
    return problems


def shard_tables(job: JobState, output: OutputSpec, redis_rows: RedisRows | None = None, ahead: int = 8,
                 columns: list[str] | None = None) -> Generator[pa.Table, None, None]:
    """Each done shard's rows (only ``columns``, when given), in shard order; ``ahead`` shards are read on
    other threads meanwhile."""
    done = sorted(i for i, s in job.shards.items() if s.get("state") == DONE)
    if output.sink == "parquet":
        def read(shard_id: int) -> pa.Table:
            return read_shard(shard_uri(output.path or "", shard_id), columns)
    else:
        assert redis_rows is not None, "a Redis-sink job is read through a RedisRows"
        schema = redis_rows.schema(job.job_id)  # once per job, not per shard
        if schema is None and done:
            raise IncompleteJob(f"job {job.job_id}: no output schema in Redis (rows expired or never written)")

        def read(shard_id: int) -> pa.Table:
            rows = redis_rows.shard(job.job_id, f"shard-{shard_id:06d}", schema)
            return rows if columns is None else rows.select(columns)
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="collect-read")
    pending: deque[Future[pa.Table]] = deque()
    try:
        for shard_id in done:
            pending.append(pool.submit(read, shard_id))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # Also when the consumer stops early (a write error, Ctrl-C) and closes us: the queued reads are
        # dropped and the running ones joined here, not whenever the generator is collected, which can
        # be during interpreter shutdown, with reader threads still inside Arrow.
        pool.shutdown(wait=True, cancel_futures=True)


class _ParquetOut:
    def __init__(self, fh: Any, metadata: dict[str, Any] | None, record: dict[str, Any] | None = None) -> None:
        self.path, self.metadata, self.record = fh, metadata, record
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            schema = table.schema
            if self.metadata is not None:
                schema = with_job_metadata(schema.remove_metadata(), self.metadata)
            if self.record is not None:
                schema = with_job_record(schema, self.record)
            self.writer = pq.ParquetWriter(self.path, schema, compression="zstd")
        writer = self.writer
        writer.write_table(table.replace_schema_metadata(writer.schema.metadata))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _iso(value: Any) -> str:
    """Timestamps (``modified``) in JSON Lines: ISO 8601 with the UTC offset."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


class _TextOut:
    """CSV (list columns as JSON text) or JSON Lines."""

    def __init__(self, fh: Any, fmt: str) -> None:
        binary: Any = fh if isinstance(fh, io.BufferedIOBase) else io.BufferedWriter(fh, 1 << 20)
        self.fh = io.TextIOWrapper(binary, encoding="utf-8", newline="")
        self.csv = csv.writer(self.fh) if fmt == "csv" else None
        self.header = False

    def write(self, table: pa.Table) -> None:
        if self.csv is not None and not self.header:
            self.csv.writerow(table.column_names)
            self.header = True
        for row in table.to_pylist():
            if self.csv is not None:
                self.csv.writerow([json.dumps(v) if isinstance(v, list) else v for v in row.values()])
            else:
                self.fh.write(json.dumps(row, default=_iso) + "\n")

    def close(self) -> None:
        self.fh.flush()
        self.fh.detach().flush()  # the stream's owner publishes it


def write_tables(tables: Iterable[pa.Table], path: str, fmt: str, metadata: dict[str, Any] | None = None,
                 record: dict[str, Any] | None = None) -> int:
    """Stream tables into ``path``, published whole at the end (a local temporary file renamed, or an S3
    multipart upload completed: nothing staged on local disk); return the row count. Parquet keeps
    ``metadata`` (the job metadata) and ``record`` (the job's timings, ``workers.jobrecord``) in its schema."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    rows = 0
    with storage_for(path).open_stream(path) as target:
        out = _ParquetOut(target, metadata, record) if fmt == "parquet" else _TextOut(target, fmt)
        try:
            for table in tables:
                out.write(table)
                rows += table.num_rows
        finally:
            out.close()
    return rows


def collect(store: Any, job_id: str, path: str, fmt: str | None = None, *, wait: bool = False,
            allow_partial: bool = False, timeout: float | None = None, redis_rows: RedisRows | None = None,
            progress: bool = True) -> int:
    """Gather a job's rows into ``path``; return the row count. See the module docstring."""
    if wait:
        wait_for(store, job_id, timeout=timeout, progress=progress)
    job = get_job(store, job_id, shards=True)
    problems = check_complete(job)
    if problems and not allow_partial:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        if job.n_failed:
            hint = f"run them again with `batchinfer retry {job_id}`, or collect the rest with --allow-partial"
        elif job.cancelled or job.submit_error:
            hint = "collect what is done with --allow-partial"
        else:
            hint = "use --wait, or --allow-partial for what is done"
        raise IncompleteJob(f"job {job_id} is incomplete: {shown} ({hint})")
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    output = OutputSpec.from_dict(job.spec["output"])
    with closing(shard_tables(job, output, redis_rows)) as tables:  # its reader threads end in here
        first = next(tables, None)
        if first is None:
            raise IncompleteJob(f"job {job_id} has no completed shards")
        metadata = {k: v for k, v in read_job_metadata(first.schema).items() if k != "shard_id"} or None
        fmt = format_for(path, fmt)
        record = job_record(job) if fmt == "parquet" else None  # the job state read above: no extra round trip
        return write_tables(chain([first], tables), path, fmt, metadata, record)
