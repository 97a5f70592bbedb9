"""``batchinfer report``: read a job or an output once, in bounded memory, and write one self-contained page."""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import replace
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from producer.report.inputs import open_source
from producer.report.sample import Limits, Sampler, Summary, columns_of
from producer.report.timings import read_timings
from producer.words import plural
from workers.errors import BatchInferError, ConfigError, SourceError
from workers.storage import check_writable

INSTALL_HINT = "pip install 'keras-batch-inference[report]'"


class MissingExtra(BatchInferError):
    """The report's optional dependencies (Jinja2, matplotlib) are not installed."""


def require_extras() -> None:
    """``MissingExtra`` with the install command unless Jinja2 and matplotlib can be imported."""
    missing = [name for name in ("jinja2", "matplotlib") if not _importable(name)]
    if missing:
        raise MissingExtra(f"batchinfer report needs {' and '.join(missing)}: {INSTALL_HINT}")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def gather(source: Any, limits: Limits, progress: bool = False) -> Summary:
    """Every row of ``source`` through the sampler, a chunk at a time (only the columns the page uses)."""
    sampler = Sampler(limits)
    with tqdm(total=source.rows, desc="report", unit="row", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        try:
            for table in source.tables(columns_of(source.columns)):
                sampler.add(table)
                bar.update(table.num_rows)
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{source.name}: cannot read its rows: {exc}") from exc
    return sampler.finish()


def make_report(source: str, output: str, *, broker: str | None = None, limits: Limits = Limits(),
                progress: bool = False) -> dict[str, Any]:
    """Write the report of ``source`` (a job id or an output) to ``output``; return what it holds (rows,
    errors, bytes written, seconds)."""
    from producer.report import page

    require_extras()
    check_writable(output)  # before any row is read
    started = time.perf_counter()
    with open_source(source, broker) as src:
        summary = gather(src, limits, progress)
        html = page.render(page.context(src, summary, read_timings(src.record), limits))
    page.write(output, html)
    return {"rows": summary.rows, "errors": summary.errors, "bytes": len(html.encode("utf-8")),
            "seconds": time.perf_counter() - started, "timings": src.record is not None}


def report_command(args: Any) -> int:
    """The ``batchinfer report`` command (arguments from ``producer.cli``)."""
    samples = getattr(args, "samples", None)
    limits = Limits()
    if samples is not None:
        if not 1 <= samples <= 100:
            raise ConfigError("--samples must be between 1 and 100")
        limits = replace(limits, per_class=samples)
    info = make_report(args.source, args.output, broker=args.broker, limits=limits,
                       progress=not getattr(args, "quiet", False))
    timings = "" if info["timings"] else "; no timings recorded"
    print(f"wrote {args.output} ({info['bytes'] / 1e6:.1f} MB): {plural(info['rows'], 'row')}, "
          f"{plural(info['errors'], 'error')}{timings}, in {info['seconds']:.1f}s", file=sys.stderr)
    return 0
