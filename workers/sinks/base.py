"""The sink interface: ``write(batch)``, ``close()``, ``abort()`` and a context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pyarrow as pa


class Sink:
    """Base class; subclasses implement ``write``, ``close`` and ``abort``."""

    def write(self, batch: pa.RecordBatch) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Commit every row written so far as this shard's complete output."""
        raise NotImplementedError

    def abort(self) -> None:
        """Discard uncommitted rows; the shard's previous output (if any) stays as it was."""

    @classmethod
    def check(cls, output: Any) -> None:
        """``ConfigError`` if this sink cannot write to ``output`` (an ``OutputSpec``). Asked by the
        producer before a job starts and by each worker at the start of a shard, before the model."""

    @classmethod
    def committed(cls, task: Any, settings: Any) -> dict[str, int] | None:
        """``{"images", "errors"}`` of this job's rows for ``task``'s shard if they are committed, else None.

        A new attempt of a shard asks this instead of redoing work an earlier attempt committed but could
        not record; it is also where the sink clears what killed attempts left behind.
        """
        return None

    @classmethod
    def on_job_complete(cls, job: Any) -> None:
        """Called once by the worker whose attempt finished the job (``job`` has every shard record):
        where a sink commits job-level artefacts such as a completion marker."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
