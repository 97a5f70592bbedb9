"""Carry shards of an incremental run: rows of unchanged images copied from the previous output.

No model is built: the rows are read from the previous output's files, put in the shard's order and
written through the job's sink like any shard, with the new job's id in the metadata. Kept manifest
columns are not copied: a carried row takes this job's values (its shard list has them), so a carried
row and a processed one have the same columns, and an edited manifest shows in the new output.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from workers.contract import ShardTask
from workers.errors import ShardError
from workers.pipeline import ShardResult, check_kept, kept_metadata
from workers.schema import METADATA_KEY, arrow_type, read_job_metadata
from workers.sinks import open_sink
from workers.sinks.parquet import read_shard


def carried_rows(uris: list[str], carry: dict[str, Any]) -> pa.Table:
    """The previous rows named by ``carry`` (``files`` and ``[file, row]`` pairs), in ``uris`` order."""
    files, rows = carry["files"], carry["rows"]
    order: list[int] = []
    pieces = []
    for file_no, uri in enumerate(files):
        positions = [p for p, (f, _) in enumerate(rows) if f == file_no]
        table = read_shard(uri)
        pieces.append(table.take(pa.array([rows[p][1] for p in positions], pa.int64())))
        order += positions
    table = pa.concat_tables(pieces).take(pa.array(np.argsort(np.array(order)), pa.int64()))
    if table.column("uri").to_pylist() != uris:
        raise ShardError("the previous output changed while this job ran: a carried row is not its image's")
    return table


def with_current_columns(table: pa.Table, previous_meta: dict[str, Any], task: ShardTask) -> pa.Table:
    """The previous rows without the previous job's kept columns, and with this job's appended."""
    previous = [name for name, _ in previous_meta.get("keep_columns") or ()]
    table = table.drop_columns([name for name in previous if name in table.column_names])
    for name, type_name in task.output.keep_columns:
        field = pa.field(name, arrow_type(type_name))
        table = table.append_column(field, pa.array(task.columns[name], field.type))
    return table


def carry_shard(task: ShardTask, carry: dict[str, Any], settings: Any) -> ShardResult:
    """Write the carried rows as this shard's output; the counts come from the rows themselves."""
    start = time.perf_counter()
    check_kept(task)
    rows = carried_rows(task.uris, carry)
    previous_meta = read_job_metadata(rows.schema)
    table = with_current_columns(rows, previous_meta, task)
    meta = {k: v for k, v in previous_meta.items() if k != "keep_columns"}
    meta.update(job_id=task.job_id, reused_from=carry["files"][0], **kept_metadata(task))
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    with open_sink(task, schema, settings) as sink:
        for batch in table.replace_schema_metadata(schema.metadata).to_batches():
            sink.write(batch)
    errors = table.num_rows - table.column("error").null_count
    return ShardResult(task.job_id, task.shard_id, table.num_rows, errors,
                       {"carry": time.perf_counter() - start, "total": time.perf_counter() - start})
