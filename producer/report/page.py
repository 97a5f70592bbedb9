"""The page itself: what each section shows, put together from the summary, the timings, the plots and
the thumbnails, rendered by an autoescaping Jinja2 template (URIs, labels and error messages are
untrusted text) and written to a temporary name, then renamed into place."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np

from producer.report import plots
from producer.report.inputs import Source
from producer.report.projection import pca, spread
from producer.report.sample import Limits, Row, Summary
from producer.report.thumbs import thumbnails
from producer.report.timings import STAGE_NAMES, Timings, duration
from workers import __version__
from workers.storage import storage_for

TEMPLATE = "report.html.j2"
CLASS_ROWS = 50  # classes listed with their counts
POINT_THUMBS = 40  # thumbnails placed on the projection
META_KEYS = ("model", "model_path", "task", "weights", "weights_fingerprint", "input_size", "top_k", "pooling",
             "layers", "feature_columns", "preprocess", "precision", "decode", "keep_columns",
             "batchinfer_version")


def render(context: dict[str, Any]) -> str:
    import jinja2

    text = resources.files("producer.report").joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters["num"] = lambda v: f"{v:,}" if isinstance(v, int) else v
    env.filters["seconds"] = lambda v: f"{v:,.3f}" if v < 10 else f"{v:,.1f}"
    env.filters["name"] = lambda uri: os.path.basename(str(uri).rstrip("/")) or str(uri)
    return env.from_string(text).render(**context)


def write(path: str, html: str) -> None:
    """``html`` into ``path`` whole: a temporary name renamed (or an S3 upload completed) at the end."""
    with storage_for(path).open_atomic(path) as pending, open(pending.path, "w", encoding="utf-8") as fh:
        fh.write(html)


def context(source: Source, summary: Summary, timings: Timings | None, limits: Limits) -> dict[str, Any]:
    """Everything the template shows (the thumbnails read here, the plots drawn here)."""
    meta, record = source.metadata, source.record or {}
    classes = summary.classes.most_common()
    points, explained, marked = None, (0.0, 0.0), np.empty(0, dtype=np.int64)
    if summary.vectors is not None and len(summary.vectors):
        points, explained = pca(summary.vectors)
        marked = spread(points, POINT_THUMBS)
    wanted = [r.uri for name, _ in classes[: limits.classes] for r in summary.class_samples.get(name, [])]
    wanted += [r.uri for r in summary.least] + [summary.vector_rows[i].uri for i in marked.tolist()]
    thumbs = thumbnails(wanted)

    def tile(row: Row) -> dict[str, Any]:
        return {"row": row, "thumb": thumbs.get(row.uri)}

    ctx: dict[str, Any] = {
        "title": f"batchinfer report: {meta.get('job_id') or record.get('job_id') or source.name}",
        "job_id": meta.get("job_id") or record.get("job_id"),
        "source": source, "generated": _when(dt.datetime.now(dt.timezone.utc).timestamp()),
        "version": __version__, "notes": source.notes, "limits": limits,
        "model": meta.get("model") or "model not recorded", "task": meta.get("task") or _task(summary),
        "meta": _meta_rows(meta), "job": _job_rows(source, record),
        "cards": _cards(summary, record, timings),
        "timings": timings, "stage_names": STAGE_NAMES,
        "timeline_svg": plots.timeline(timings) if timings else None,
        "stages_svg": plots.stages(timings) if timings and timings.stages else None,
        "classes": _classes(summary, classes, limits, tile) if classes else None,
        "projection": None,
        "errors": sorted(summary.reasons.items(), key=lambda kv: (-kv[1], kv[0])),
        "error_rows": summary.error_rows, "not_listed": summary.errors - summary.listed, "n_errors": summary.errors,
        "failed_shards": record.get("failed_shards") or [], "n_failed_shards": record.get("failed") or 0,
    }
    if points is not None and summary.vectors is not None:
        svg, where = plots.projection(points, [r.label for r in summary.vector_rows], explained, marked)
        ctx["projection"] = {
            "svg": svg, "column": summary.feature_column, "dim": int(summary.vectors.shape[1]),
            "count": len(points), "explained": explained,
            "marks": [{"x": x, "y": y, **tile(summary.vector_rows[i])} for i, (x, y) in zip(marked.tolist(), where)],
        }
    return ctx


def _classes(summary: Summary, classes: list[tuple[str, int]], limits: Limits,
             tile: Callable[[Row], dict[str, Any]]) -> dict[str, Any]:
    """The classify sections: counts of the largest classes, a sample of each, the least confident, scores."""
    labelled = sum(count for _, count in classes)
    mean = sum(summary.score_sums.values()) / max(labelled, 1)
    return {
        "count": len(classes), "ok": labelled, "mean": mean, "top": classes[0][1],
        "table": [{"name": name, "count": count, "share": count / labelled,
                   "mean": summary.score_sums.get(name, 0.0) / count} for name, count in classes[:CLASS_ROWS]],
        "more": max(len(classes) - CLASS_ROWS, 0),
        "grids": [{"name": name, "count": count, "tiles": [tile(r) for r in summary.class_samples.get(name, [])]}
                  for name, count in classes[: limits.classes]],
        "least": [tile(r) for r in summary.least],
        "histogram_svg": plots.histogram(summary.histogram, mean) if summary.histogram is not None else None,
    }


def _task(summary: Summary) -> str:
    tasks = (["classify"] if summary.classes else []) + (["features"] if summary.feature_column else [])
    return ",".join(tasks) or "unknown task"


def _when(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _meta_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(key, _value(meta[key])) for key in META_KEYS if meta.get(key) not in (None, [], {}, "")]
    if "input_size" in meta and isinstance(meta["input_size"], list) and len(meta["input_size"]) == 2:
        rows = [(k, f"{meta['input_size'][0]} x {meta['input_size'][1]}" if k == "input_size" else v) for k, v in rows]
    return rows


def _job_rows(source: Source, record: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("source", f"{source.name} ({_describe(source)})")]
    if source.output:
        rows.append(("output", source.output))
    created = record.get("created")
    if created is not None:
        rows.append(("created", _when(created) or ""))
        if record.get("first_started") is not None:
            rows.append(("first shard started", _when(created + record["first_started"]) or ""))
        if record.get("finished") is not None:
            rows.append(("finished", _when(created + record["finished"]) or ""))
        else:
            rows.append(("finished", "not yet"))
    return rows


def _describe(source: Source) -> str:
    if source.kind == "job":
        return f"job state from Redis, rows from its {source.fmt} output"
    what = {"parquet": "Parquet", "csv": "CSV", "jsonl": "JSON Lines"}[source.fmt]
    return f"{what} {'file' if source.kind == 'file' else 'output folder'}"


def _cards(summary: Summary, record: dict[str, Any], timings: Timings | None) -> list[dict[str, str]]:
    rate = summary.errors / summary.rows if summary.rows else 0.0
    cards = [{"label": "images", "value": f"{summary.rows:,}", "sub": _of_total(summary.rows, record)},
             {"label": "ok", "value": f"{summary.ok:,}", "sub": f"{1 - rate:.1%}" if summary.rows else ""},
             {"label": "errors", "value": f"{summary.errors:,}", "sub": f"{rate:.2%}" if summary.rows else "",
              "warn": "1" if summary.errors else ""}]
    if record:
        total = record.get("shards_total")
        cards.append({"label": "shards done", "value": f"{record.get('done', 0):,}",
                      "sub": f"of {total:,}" if total is not None else "submission not finished"})
        cards.append({"label": "shards failed", "value": f"{record.get('failed', 0):,}",
                      "sub": f"{record.get('running', 0):,} running" if record.get("running") else "",
                      "warn": "1" if record.get("failed") else ""})
    if timings is not None and timings.rate is not None:
        cards.append({"label": "throughput", "value": f"{timings.rate:,.1f}/s",
                      "sub": f"images over {duration(timings.wall or 0)}"})
    if summary.bytes_read:
        cards.append({"label": "read", "value": _size(summary.bytes_read),
                      "sub": f"{_size(summary.bytes_read / max(summary.ok, 1))} per image"})
    return [{"warn": "", **card} for card in cards]


def _of_total(rows: int, record: dict[str, Any]) -> str:
    total = record.get("images_total")
    return f"of {total:,} submitted" if total is not None and total != rows else "rows"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"

