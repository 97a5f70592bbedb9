"""Carry shards of an incremental run: rows of unchanged images copied from the previous output.

No model is built: the rows are read from the previous output's files, put in the shard's order and
written through the job's sink like any shard, with the new job's id in the metadata.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa

from workers.contract import ShardTask
from workers.errors import ShardError
from workers.pipeline import ShardResult
from workers.schema import METADATA_KEY, read_job_metadata
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


def carry_shard(task: ShardTask, carry: dict[str, Any], settings: Any) -> ShardResult:
    """Write the carried rows as this shard's output; the counts come from the rows themselves."""
    start = time.perf_counter()
    table = carried_rows(task.uris, carry)
    meta = {**read_job_metadata(table.schema), "job_id": task.job_id, "reused_from": carry["files"][0]}
    schema = table.schema.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    with open_sink(task, schema, settings) as sink:
        for batch in table.replace_schema_metadata(schema.metadata).to_batches():
            sink.write(batch)
    errors = table.num_rows - table.column("error").null_count
    return ShardResult(task.job_id, task.shard_id, table.num_rows, errors,
                       {"carry": time.perf_counter() - start, "total": time.perf_counter() - start})
