"""A job's shard timings in a compact form that outputs carry, so ``batchinfer report`` has them after the job.

The collected file keeps it in its Parquet key-value metadata (``workers.schema.JOB_RECORD_KEY``, next to the
job metadata) and a Parquet job's ``_manifest.json`` under ``"job"``; ``report`` also builds it straight from
the job state. Per-shard values are arrays, times are seconds since the job was created, rounded to the
millisecond: about 60 bytes a shard. Totals (images, stage seconds, per worker) are always exact; above
``MAX_SHARDS`` done shards the per-shard arrays hold an evenly spaced sample of them (in finish order) and
say so with ``"sampled": true``.

    {"version": 1, "job_id", "created" (epoch s), "finished" (s, null while running), "first_started",
     "submitted", "cancelled", "shards_total", "images_total", "done", "failed", "running",
     "images", "errors", "seconds", "stages": {stage: s},
     "workers": {"name": [...], "shards", "images", "seconds", "first", "last", "stages": {stage: [...]}},
     "shards": {"sampled", "id", "images", "errors", "started", "finished", "seconds", "worker",
                "stages": {stage: [...]}},
     "failed_shards": [{"id", "reason"}]}
"""

from __future__ import annotations

from typing import Any

from workers.jobstate import DONE, FAILED, JobState

VERSION = 1
MAX_SHARDS = 5000
MAX_FAILED = 100
# the pipeline's stages (``workers.pipeline``) in the order a shard runs them; a carry shard has ``carry``
STAGES = ("read_decode", "wait", "predict", "write", "carry")


def _num(value: Any, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def job_record(job: JobState) -> dict[str, Any]:
    """The compact record of ``job`` (read with ``shards=True``); see the module docstring."""
    t0 = job.created

    def rel(value: Any) -> float | None:
        return None if value is None else round(float(value) - t0, 3)

    done = sorted(((i, r) for i, r in job.shards.items() if r.get("state") == DONE),
                  key=lambda item: (item[1].get("finished") or 0, item[0]))
    names = sorted({str(r.get("worker") or "") for _, r in done})
    index = {name: k for k, name in enumerate(names)}
    stages = [s for s in STAGES if any(s in (r.get("stages") or {}) for _, r in done)]
    stages += sorted({s for _, r in done for s in (r.get("stages") or {})} - set(stages))
    workers: dict[str, Any] = {"name": names, "shards": [0] * len(names), "images": [0] * len(names),
                                     "seconds": [0.0] * len(names), "first": [None] * len(names),
                                     "last": [None] * len(names)}
    per_worker = {s: [0.0] * len(names) for s in stages}
    totals = dict.fromkeys(stages, 0.0)
    seconds = 0.0
    for _, rec in done:
        k = index[str(rec.get("worker") or "")]
        workers["shards"][k] += 1
        workers["images"][k] += int(rec.get("images") or 0)
        workers["seconds"][k] += float(rec.get("seconds") or 0)
        started, finished = rel(rec.get("started")), rel(rec.get("finished"))
        if started is not None:
            workers["first"][k] = started if workers["first"][k] is None else min(workers["first"][k], started)
        if finished is not None:
            workers["last"][k] = finished if workers["last"][k] is None else max(workers["last"][k], finished)
        seconds += float(rec.get("seconds") or 0)
        for stage, value in (rec.get("stages") or {}).items():
            totals[stage] += float(value or 0)
            per_worker[stage][k] += float(value or 0)
    workers["seconds"] = [round(s, 3) for s in workers["seconds"]]
    workers["stages"] = {s: [round(v, 3) for v in values] for s, values in per_worker.items()}

    step = max(1, -(-len(done) // MAX_SHARDS))  # ceil: at most MAX_SHARDS per-shard entries
    kept = done[::step]
    shards: dict[str, Any] = {
        "sampled": step > 1,
        "id": [i for i, _ in kept],
        "images": [int(r.get("images") or 0) for _, r in kept],
        "errors": [int(r.get("errors") or 0) for _, r in kept],
        "started": [rel(r.get("started")) for _, r in kept],
        "finished": [rel(r.get("finished")) for _, r in kept],
        "seconds": [_num(r.get("seconds")) for _, r in kept],
        "worker": [index[str(r.get("worker") or "")] for _, r in kept],
        "stages": {s: [_num((r.get("stages") or {}).get(s)) for _, r in kept] for s in stages},
    }
    failed = sorted((i, r) for i, r in job.shards.items() if r.get("state") == FAILED)
    starts = [r["started"] for _, r in done if r.get("started") is not None]
    return {
        "version": VERSION,
        "job_id": job.job_id,
        "created": round(t0, 3),
        "finished": rel(job.finished_at),
        "first_started": rel(job.first_started if job.first_started is not None else min(starts, default=None)),
        "submitted": bool(job.submitted),
        "cancelled": bool(job.cancelled),
        "shards_total": job.shards_total,
        "images_total": job.images_total,
        "done": len(done),
        "failed": len(failed),
        "running": int(job.n_running),
        "images": sum(int(r.get("images") or 0) for _, r in done),
        "errors": sum(int(r.get("errors") or 0) for _, r in done),
        "seconds": round(seconds, 3),
        "stages": {s: round(v, 3) for s, v in totals.items()},
        "workers": workers,
        "shards": shards,
        "failed_shards": [{"id": i, "reason": str(r.get("reason") or "")[:500]} for i, r in failed[:MAX_FAILED]],
    }
