"""Sinks: where a shard's rows go. One module per sink, chosen by name through a small registry.

A sink is built as ``Sink(task, schema, settings)`` and used as a context manager:
``write(batch)`` for each Arrow record batch, ``close()`` to commit. Leaving the ``with`` block with
an exception calls ``abort()`` instead, so a crash never leaves half-written output. Committing is
idempotent per shard: re-running a shard replaces its rows, never duplicates them.
"""

from __future__ import annotations

from typing import Any

from workers.plugins import load

SINKS = {
    "parquet": "workers.sinks.parquet:ParquetSink",
    "redis": "workers.sinks.redis:RedisSink",
}


def sink_class(name: str) -> Any:
    return load(SINKS, name, "sink")


def open_sink(task: Any, schema: Any, settings: Any) -> Any:
    """Build the sink named by ``task.output.sink``."""
    return sink_class(task.output.sink)(task, schema, settings)
