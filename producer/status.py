"""``batchinfer status``: done/total shards and images, failures, images/s and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from workers.jobstate import DONE, FAILED, PENDING, RUNNING, JobState


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def summary(job: JobState, now: float | None = None) -> str:
    """The multi-line human summary that ``status`` prints."""
    now = now or time.time()
    total = job.shards_total if job.shards_total is not None else len(job.shards)
    if job.submit_error:
        state = "submission failed"
    elif job.finished:
        state = "finished with failures" if job.count(FAILED) else "done"
    else:
        state = "running" if job.submitted else "submitting"
    images_total = job.images_total if job.images_total is not None else sum(
        s.get("images_in", 0) for s in job.shards.values())
    lines = [
        f"job      {job.job_id} ({state})",
        f"model    {job.spec['model']['name']} {job.spec['model']['task']} weights={job.spec['model']['weights']}",
        f"shards   {job.count(DONE)}/{total} done, {job.count(RUNNING)} running, "
        f"{job.count(PENDING)} pending, {job.count(FAILED)} failed",
        f"images   {job.images_done}/{images_total} done, {job.errors} error rows",
    ]
    rate = job.rate(now)
    if rate:
        remaining = max(images_total - job.images_done, 0)
        eta = "-" if job.finished else _duration(remaining / rate)
        lines.append(f"speed    {rate:.1f} images/s, ETA {eta}")
    if job.submit_error:
        lines.append(f"submit   failed: {job.submit_error}")
    failed = sorted((i, s) for i, s in job.shards.items() if s.get("state") == FAILED)
    for shard_id, info in failed[:20]:
        lines.append(f"failed   shard-{shard_id:06d}: {info.get('reason', 'unknown reason')}")
    if len(failed) > 20:
        lines.append(f"failed   ... and {len(failed) - 20} more")
    return "\n".join(lines)


def print_status(job: JobState, out: TextIO = sys.stdout) -> None:
    print(summary(job), file=out)
