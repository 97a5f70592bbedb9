"""``batchinfer status`` and ``batchinfer jobs``: what a job is doing, read from its counters and leases.

Reading a job costs a few small reads whatever its size: the counters, one lease per running shard and
the first dead-lettered shards.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from producer.words import plural
from workers.jobstate import DONE, FAILED, PENDING, RUNNING, JobState

SHOWN = 20


def _duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def state_of(job: JobState) -> str:
    if job.cancelled:
        return "cancelled" if job.finished else "cancelling"
    if job.submit_error and not job.submitted:
        return "submission failed"
    if job.finished:
        return "finished with failures" if job.n_failed else "done"
    return "running" if job.submitted else "submitting"


def summary(job: JobState, now: float | None = None, live_workers: list[str] | None = None) -> str:
    """The multi-line human summary that ``status`` prints. ``live_workers``: consumers of the job's queue."""
    now = job.now or now or time.time()
    total = job.shards_total if job.shards_total is not None else job.n_shards
    images_total = job.images_total if job.images_total is not None else None
    model = job.spec.get("model", {})
    shards_line = (f"shards   {job.count(DONE)}/{total} done, {job.count(RUNNING)} running, "
                   f"{job.count(PENDING)} pending, {job.count(FAILED)} failed")
    if job.n_lost:
        shards_line += f"; {job.n_lost} requeued from lost workers"
    lines = [
        f"job      {job.job_id} ({state_of(job)})",
        f"model    {model.get('name')} {model.get('task')} weights={model.get('weights')}",
        shards_line,
        f"images   {job.images_done}/{images_total if images_total is not None else '?'} done, "
        f"{plural(job.errors, 'error row')}",
    ]
    rate = job.rate(now)
    idle = not job.finished and not job.cancelled and live_workers is not None and not live_workers
    if idle:
        lines.append(f"workers  none alive on queue '{job.queue}': nothing will progress until one starts "
                     "(celery -A workers worker); no ETA")
    elif rate:
        remaining = max((images_total or 0) - job.images_done, 0)
        eta = "-" if job.finished or job.cancelled else _duration(remaining / rate)
        lines.append(f"speed    {rate:.1f} images/s, ETA {eta}")
    if live_workers and not job.finished:
        lines.append(f"workers  {len(live_workers)} alive on queue '{job.queue}'")
    for lease in job.running[:SHOWN]:
        age = now - float(lease.get("heartbeat") or now)
        lines.append(f"running  shard-{lease['shard']:06d} on {lease.get('worker')} (pid {lease.get('pid')}), "
                     f"attempt {lease.get('attempt')}, heartbeat {_duration(age)} ago")
    if len(job.running) > SHOWN:
        lines.append(f"running  ... and {len(job.running) - SHOWN} more")
    if job.last_lost and not job.finished:
        lost = job.last_lost
        lines.append(f"lost     shard-{int(lost['shard']):06d}: worker {lost.get('worker')} stopped heartbeating "
                     f"{_duration(now - float(lost['at']))} ago; requeued")
    if job.submit_error:
        lines.append(f"submit   failed: {job.submit_error}")
        if not job.submitted:
            lines.append(f"submit   resume it with: batchinfer submit --resume {job.job_id}")
    for info in job.failed[:SHOWN]:
        lines.append(f"failed   shard-{info['shard']:06d} ({info.get('attempts', '?')} attempts): "
                     f"{info.get('reason', 'unknown reason')}")
    if job.n_failed > len(job.failed[:SHOWN]):
        lines.append(f"failed   ... and {job.n_failed - len(job.failed[:SHOWN])} more")
    if job.n_failed:
        lines.append(f"retry    batchinfer retry {job.job_id}   (runs the failed shards again)")
    return "\n".join(lines)


def print_status(job: JobState, out: TextIO = sys.stdout, live_workers: list[str] | None = None) -> None:
    print(summary(job, live_workers=live_workers), file=out)


def shard_lines(records: list[dict], state: str) -> str:
    """``status --shards STATE``: one line per shard."""
    lines = [f"{state} shards ({len(records)} shown):"]
    for r in records:
        detail = {"failed": f"{r.get('attempts', '?')} attempts: {r.get('reason')}",
                  "running": f"on {r.get('worker')} (pid {r.get('pid')}), attempt {r.get('attempt')}",
                  "done": f"{r.get('images')} images, {r.get('errors')} errors, {r.get('seconds')}s",
                  "pending": f"{r.get('images_in')} images" + (f", last: {r['reason']}" if r.get("reason") else "")}
        lines.append(f"  shard-{r['shard']:06d}  {detail[state]}")
    return "\n".join(lines)


def jobs_table(jobs: list[JobState]) -> str:
    """``batchinfer jobs``: one line per job, newest first."""
    header = f"{'JOB':<28} {'STATE':<24} {'SHARDS':>15} {'IMAGES':>21} {'FAILED':>6}  CREATED"
    lines = [header]
    for job in jobs:
        total = job.shards_total if job.shards_total is not None else job.n_shards
        images = job.images_total if job.images_total is not None else "?"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created))
        lines.append(f"{job.job_id:<28} {state_of(job):<24} {f'{job.n_done}/{total}':>15} "
                     f"{f'{job.images_done}/{images}':>21} {job.n_failed:>6}  {created}")
    return "\n".join(lines)
