"""The report's plots as inline SVG (matplotlib ``Figure`` objects, no pyplot state, no GUI backend).

Sizes stay bounded whatever the job: per-shard bars are merged into busy intervals per worker when there
are many, time series are binned, and the projection draws a fixed-size sample.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from producer.report.timings import MODEL_STAGES, STAGE_NAMES, Timings

COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
          "#bab0ac")
STAGE_COLORS = {"wait": "#e15759", "predict": "#4e79a7", "write": "#f28e2b", "carry": "#76b7b2",
                "other": "#bab0ac", "read_decode": "#59a14f"}
MAX_BARS = 600  # per-shard bars drawn one by one up to this many; above it, busy intervals per worker
TIME_BINS = 60
RC: dict[Any, Any] = {"svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9, "axes.spines.top": False,
      "axes.spines.right": False, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.titlelocation": "left"}


def figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def to_svg(fig: Any, name: str) -> str:
    """``fig`` as an ``<svg>`` element to inline (no XML prologue; ids salted by ``name`` so that several
    plots on one page never share one)."""
    import matplotlib

    out = io.StringIO()
    params: dict[Any, Any] = {**RC, "svg.hashsalt": name}
    with matplotlib.rc_context(params):
        fig.savefig(out, format="svg", metadata={"Date": None, "Creator": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def text(value: Any, limit: int = 40) -> str:
    """A label for matplotlib: ``$`` escaped (no mathtext from a class or worker name), long ones cut."""
    value = str(value)
    value = value if len(value) <= limit else value[: limit - 1] + "…"
    return value.replace("$", r"\$")


def _unit(seconds: float) -> tuple[float, str]:
    if seconds > 3 * 3600:
        return 3600.0, "hours"
    if seconds > 600:
        return 60.0, "minutes"
    return 1.0, "seconds"


def _array(values: list[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def timeline(t: Timings) -> str:
    """Images done over time, and each worker's shards as bars from start to finish."""
    shards = t.record["shards"]
    start, finish = _array(shards["started"]), _array(shards["finished"])
    images = np.array(shards["images"], dtype=np.float64)
    origin = _origin(t.record)
    span = (np.nanmax(finish) - origin) if np.isfinite(finish).any() else 0.0
    scale, unit = _unit(span)
    names = [w.name for w in sorted(t.workers, key=lambda w: w.name)]
    lanes = {name: k for k, name in enumerate(names)}
    all_names = t.record["workers"]["name"]
    lane_of = [lanes.get(all_names[i] or "(unnamed)", 0) for i in shards["worker"]]
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = figure(10, 2.6 + 0.22 * min(len(names), 40))
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1.3, max(1.0, 0.3 * min(len(names), 40))])
        order = np.argsort(np.nan_to_num(finish, nan=np.inf), kind="stable")
        done = np.cumsum(images[order])
        if shards.get("sampled") and done.size and done[-1] > 0:
            done = done * (float(t.record["images"]) / done[-1])  # a sample of the shards: scaled to the total
        xs = np.r_[0.0, (finish[order] - origin) / scale]
        top.step(xs, np.r_[0.0, done], where="post", color=COLORS[0], linewidth=1.4)
        top.fill_between(xs, np.r_[0.0, done], step="post", color=COLORS[0], alpha=0.15)
        top.set_ylabel("images done")
        _counts(top.yaxis)
        top.set_ylim(bottom=0)
        top.set_title("Shard completions")
        for k in range(len(names)):
            mine = [i for i, lane in enumerate(lane_of) if lane == k and np.isfinite(start[i] + finish[i])]
            spans = _intervals([(start[i] - origin, finish[i] - origin) for i in mine], span,
                               merge=len(start) > MAX_BARS)
            bottom.broken_barh([(a / scale, (b - a) / scale) for a, b in spans], (k - 0.4, 0.8),
                               facecolors=COLORS[k % len(COLORS)], edgecolor="white", linewidth=0.3)
        bottom.set_yticks(range(len(names)))
        if len(names) <= 40:
            bottom.set_yticklabels([text(n, 28) for n in names])
        else:
            bottom.set_yticklabels([])
            bottom.set_ylabel(f"{len(names)} workers")
        bottom.set_ylim(len(names) - 0.5, -0.5)
        bottom.set_xlabel(f"{unit} since the first shard started")
        bottom.set_xlim(left=0)
        return to_svg(fig, "timeline")


def _origin(record: dict[str, Any]) -> float:
    """Time zero of the plots: the first shard's start (seconds since the job was created)."""
    if record.get("first_started") is not None:
        return float(record["first_started"])
    starts = [s for s in record["shards"]["started"] if s is not None]
    return float(min(starts)) if starts else 0.0


def _intervals(spans: list[tuple[float, float]], total: float, merge: bool) -> list[tuple[float, float]]:
    """``spans`` sorted; with ``merge``, back-to-back ones (gaps under 1/1000 of ``total``) become one."""
    spans = sorted(spans)
    if not merge:
        return spans
    out: list[list[float]] = []
    gap = total / 1000
    for a, b in spans:
        if out and a - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def stages(t: Timings) -> str:
    """Total seconds per stage (shard time stacked; the overlapping I/O pool beside it) and, over the job,
    the share of shard time each stage took."""
    import matplotlib

    present = [s for s in (*MODEL_STAGES, "other") if t.stages.get(s)]
    shards = t.record["shards"]
    over_time = len(shards["id"]) >= 3 and bool(shards["stages"])
    scale, unit = _unit(max(t.shard_seconds, t.stages.get("read_decode", 0.0)))
    with matplotlib.rc_context(RC):
        fig = figure(10, 2.9)
        axes = fig.subplots(1, 2, width_ratios=[1, 1.2]) if over_time else [fig.subplots(1, 1)]
        left = axes[0]
        x = 0.0
        for stage in present:
            value = t.stages[stage] / scale
            left.barh(1, value, left=x, color=STAGE_COLORS[stage], label=STAGE_NAMES[stage], height=0.6)
            x += value
        if t.stages.get("read_decode"):
            left.barh(0, t.stages["read_decode"] / scale, color=STAGE_COLORS["read_decode"], height=0.6,
                      label=STAGE_NAMES["read_decode"])
        left.set_yticks([0, 1], ["I/O pool", "shards"])
        left.set_xlabel(f"{unit}, all shards together")
        left.set_title("Where the time went")
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False, fontsize=8)
        if over_time:
            _stage_shares(axes[1], t, present)
        return to_svg(fig, "stages")


def _stage_shares(ax: Any, t: Timings, present: list[str]) -> None:
    shards = t.record["shards"]
    finish = _array(shards["finished"])
    seconds = np.nan_to_num(_array(shards["seconds"]))
    ok = np.isfinite(finish) & (seconds > 0)
    if not ok.any():
        return
    origin = _origin(t.record)
    scale, unit = _unit(float(np.nanmax(finish) - origin))
    when = (finish[ok] - origin) / scale
    bins = np.linspace(0, when.max() if when.max() > 0 else 1.0, min(TIME_BINS, int(ok.sum())) + 1)
    which = np.clip(np.digitize(when, bins) - 1, 0, len(bins) - 2)
    total = np.bincount(which, weights=seconds[ok], minlength=len(bins) - 1)
    used = total > 0
    parts = []
    accounted = np.zeros_like(total)
    for stage in present:
        if stage == "other":
            part = total - accounted
        else:
            part = np.bincount(which, weights=np.nan_to_num(_array(shards["stages"].get(stage, [])))[ok]
                               if stage in shards["stages"] else np.zeros(ok.sum()), minlength=len(bins) - 1)
            accounted += part
        parts.append(np.clip(part[used], 0, None) / total[used])
    centres = ((bins[:-1] + bins[1:]) / 2)[used]
    ax.stackplot(centres, *parts, colors=[STAGE_COLORS[s] for s in present], alpha=0.9)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(_percent())
    ax.set_xlabel(f"{unit} since the first shard started (shard finish)")
    ax.set_title("Share of shard time, over the job")


def _counts(axis: Any) -> None:
    """Whole numbers with thousands separators on an axis of counts."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def histogram(counts: np.ndarray, mean: float | None) -> str:
    """The top-1 scores in fixed bins from 0 to 1."""
    import matplotlib

    edges = np.linspace(0, 1, len(counts) + 1)
    with matplotlib.rc_context(RC):
        fig = figure(10, 2.4)
        ax = fig.subplots()
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=COLORS[0], edgecolor="white",
               linewidth=0.4)
        if mean is not None:
            ax.axvline(mean, color=COLORS[3], linewidth=1.2, label=f"mean {mean:.3f}")
            ax.legend(frameon=False)
        ax.set_xlim(0, 1)
        ax.set_xlabel("top-1 score")
        ax.set_ylabel("images")
        _counts(ax.yaxis)
        return to_svg(fig, "scores")


def projection(points: np.ndarray, labels: list[str | None], explained: tuple[float, float],
               marked: np.ndarray) -> tuple[str, list[tuple[float, float]]]:
    """A scatter of 2-D ``points`` coloured by label (the 9 most common; the rest grey) and where
    the ``marked`` points lie on the rendered figure, in percent from its left and top (for thumbnails)."""
    import matplotlib

    common = [name for name, _ in _most_common(labels, 9)]
    with matplotlib.rc_context(RC):
        fig = figure(10, 6.2)
        ax = fig.subplots()
        colour = {name: COLORS[k] for k, name in enumerate(common)}
        rest = np.array([label not in colour for label in labels], dtype=bool)
        if rest.any():
            ax.scatter(points[rest, 0], points[rest, 1], s=6, color="#c8c8c8", linewidths=0,
                       label="other classes" if common else None)
        for name in common:
            mask = np.array([label == name for label in labels], dtype=bool)
            ax.scatter(points[mask, 0], points[mask, 1], s=8, color=colour[name], linewidths=0, label=text(name))
        if common:
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, markerscale=2, fontsize=8)
        ax.set_xlabel(f"component 1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"component 2 ({explained[1]:.0%} of variance)")
        ax.set_title("Feature vectors, projected (PCA of a sample)")
        ax.margins(0.06)
        fig.draw_without_rendering()
        fig.set_layout_engine("none")  # freeze the layout: the positions below must hold in the SVG
        pixels = ax.transData.transform(points[marked]) if len(marked) else np.empty((0, 2))
        width, height = fig.bbox.width, fig.bbox.height
        where = [(100 * float(x) / width, 100 * (1 - float(y) / height)) for x, y in pixels]
        return to_svg(fig, "projection"), where


def _most_common(labels: list[str | None], n: int) -> list[tuple[str, int]]:
    from collections import Counter

    return Counter(label for label in labels if label is not None).most_common(n)
