"""A job's timings read for people: wall time, throughput (job and per worker), where shard time went, and
whether the model was starved (waiting for decoded images) or busy (predicting).

It reads the compact record of ``workers.jobrecord``. A shard's time is ``wait`` (the model waiting for
decoded batches) + ``predict`` + ``write`` (+ a little bookkeeping); ``read_decode`` is time spent on the
I/O thread pool, which overlaps the other stages, so it is shown beside them, not stacked on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MODEL_STAGES = ("wait", "predict", "write", "carry")  # parts of a shard's own wall time
STAGE_NAMES = {"read_decode": "read + decode (I/O pool, overlaps)", "wait": "waiting for decoded images",
               "predict": "predict (model)", "write": "write (sink)", "carry": "copy unchanged rows",
               "other": "other (bookkeeping)"}


@dataclass
class WorkerLine:
    name: str
    shards: int
    images: int
    busy: float  # seconds of shards
    first: float | None
    last: float | None
    wait: float | None = None  # seconds its model waited for decoded images

    @property
    def wait_share(self) -> float | None:
        return self.wait / self.busy if self.wait is not None and self.busy > 0 else None

    @property
    def rate(self) -> float | None:
        return self.images / self.busy if self.busy > 0 else None


@dataclass
class Timings:
    """Everything the page says about time; ``record`` stays available for the plots."""

    record: dict[str, Any]
    wall: float | None  # first shard started -> last shard finished (or the job's end), seconds
    rate: float | None  # images per second over ``wall``
    workers: list[WorkerLine]
    stages: dict[str, float]  # total seconds per stage, "other" included
    shard_seconds: float
    verdict: str
    lines: list[tuple[str, str]] = field(default_factory=list)  # (what, value) for the table


def read_timings(record: dict[str, Any] | None) -> Timings | None:
    """``None`` when there is no record or no done shard with times."""
    if not record or not record.get("done"):
        return None
    w = record["workers"]
    first = record.get("first_started")
    if first is None:
        first = min((x for x in w["first"] if x is not None), default=None)
    last = max((x for x in w["last"] if x is not None), default=None)  # per worker: exact, never sampled
    wall = (last - first) if first is not None and last is not None and last > first else None
    images = int(record.get("images") or 0)
    rate = images / wall if wall else None
    waits = (w.get("stages") or {}).get("wait")
    workers = [WorkerLine(name or "(unnamed)", w["shards"][k], w["images"][k], float(w["seconds"][k] or 0),
                          w["first"][k], w["last"][k], float(waits[k]) if waits else None)
               for k, name in enumerate(w["name"])]
    workers.sort(key=lambda line: line.name)
    shard_seconds = float(record.get("seconds") or 0)
    stages = {k: float(v or 0) for k, v in (record.get("stages") or {}).items()}
    accounted = sum(v for k, v in stages.items() if k in MODEL_STAGES)
    if stages and shard_seconds > accounted:
        stages["other"] = shard_seconds - accounted
    timings = Timings(record, wall, rate, workers, stages, shard_seconds, verdict(stages, shard_seconds))
    timings.lines = _lines(timings, images, record)
    return timings


def verdict(stages: dict[str, float], shard_seconds: float) -> str:
    """One sentence an operator can act on: starved model, busy model, slow sink, or balanced."""
    if not stages or shard_seconds <= 0:
        return "No stage timings were recorded for this job's shards."
    share = {k: v / shard_seconds for k, v in stages.items()}
    wait, predict, write = share.get("wait", 0.0), share.get("predict", 0.0), share.get("write", 0.0)
    pct = f"wait {wait:.0%}, predict {predict:.0%}, write {write:.0%} of shard time"
    if share.get("carry", 0.0) > 0.5:
        return f"Mostly unchanged rows copied from the previous output ({share['carry']:.0%} of shard time)."
    if wait >= 0.5:
        return (f"The model was starved: it waited for decoded images most of the time ({pct}). Reading and "
                "decoding is the bottleneck: more CPU cores or BATCHINFER_IO_THREADS, --decode fast (or gpu), "
                "or faster storage.")
    if predict >= 0.5:
        return (f"The model was busy: predicting took most of the time ({pct}). The model is the bottleneck: "
                "more workers or GPUs, a larger --batch-size, or a lower --precision.")
    if write >= 0.3:
        return f"Writing the output took a large share ({pct}): the sink or its storage is slow."
    return f"No single stage dominates ({pct})."


def _lines(t: Timings, images: int, record: dict[str, Any]) -> list[tuple[str, str]]:
    lines = []
    if t.wall is not None:
        lines.append(("wall time (first start to last finish)", duration(t.wall)))
    if t.rate is not None:
        lines.append(("throughput", f"{t.rate:,.1f} images/s"))
    if t.shard_seconds:
        lines.append(("shard time, all workers", duration(t.shard_seconds)))
        lines.append(("per shard, mean", duration(t.shard_seconds / max(int(record["done"]), 1))))
    if record.get("finished") is not None and record.get("first_started") is not None:
        lines.append(("created to finished", duration(float(record["finished"]))))
    if record["shards"].get("sampled"):
        lines.append(("shards plotted", f"{len(record['shards']['id']):,} of {int(record['done']):,} "
                                        "(evenly spaced in finish order; totals are exact)"))
    return lines


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 120:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
