"""Job state: the job spec, its shards and each shard's progress.

``RedisJobStore`` is what the cluster uses (keys in ``workers.keys``); ``MemoryJobStore`` backs the
embedded ``batchinfer run`` with the same interface and no server. A shard's completion is recorded
last, after its output is committed, so "done" always means the rows exist.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from workers import keys

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class JobState:
    """A snapshot of one job, as ``status`` and ``collect`` see it."""

    job_id: str
    spec: dict[str, Any]
    created: float
    submitted: bool
    shards_total: int | None
    images_total: int | None
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)
    submit_error: str | None = None

    def count(self, state: str) -> int:
        return sum(1 for s in self.shards.values() if s.get("state") == state)

    @property
    def images_done(self) -> int:
        return sum(s.get("images", 0) for s in self.shards.values() if s.get("state") == DONE)

    @property
    def errors(self) -> int:
        return sum(s.get("errors", 0) for s in self.shards.values() if s.get("state") == DONE)

    @property
    def finished(self) -> bool:
        if self.submit_error:  # nothing more will be enqueued; what was enqueued is all there is
            return all(s.get("state") in (DONE, FAILED) for s in self.shards.values())
        total = self.shards_total
        return self.submitted and total is not None and self.count(DONE) + self.count(FAILED) >= total

    def rate(self, now: float | None = None) -> float | None:
        """Images per second over the shards done so far."""
        done = [s for s in self.shards.values() if s.get("state") == DONE]
        if not done:
            return None
        start = min(s.get("started", self.created) for s in done)
        end = max(s.get("finished", 0.0) for s in done) if self.finished else (now or time.time())
        return self.images_done / max(end - start, 1e-6)


def _shard_record(state: str, **extra: Any) -> dict[str, Any]:
    return {"state": state, "updated": time.time(), **extra}


class MemoryJobStore:
    """In-process job state for the embedded mode."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobState] = {}

    def create_job(self, job_id: str, spec: dict[str, Any]) -> None:
        self.jobs[job_id] = JobState(job_id, spec, time.time(), False, None, None)

    def add_shard(self, job_id: str, shard_id: int, images: int) -> None:
        self.jobs[job_id].shards[shard_id] = _shard_record(PENDING, images_in=images)

    def finish_submit(self, job_id: str, shards: int, images: int) -> None:
        job = self.jobs[job_id]
        job.submitted, job.shards_total, job.images_total = True, shards, images

    def fail_submit(self, job_id: str, reason: str) -> None:
        self.jobs[job_id].submit_error = reason

    def update_shard(self, job_id: str, shard_id: int, state: str, **extra: Any) -> None:
        old = self.jobs[job_id].shards.get(shard_id, {})
        self.jobs[job_id].shards[shard_id] = {**old, **_shard_record(state, **extra)}

    def get_job(self, job_id: str) -> JobState | None:
        return self.jobs.get(job_id)


class RedisJobStore:
    """Job state in Redis; see ``workers.keys`` for the layout."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> RedisJobStore:
        import redis

        return cls(redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30))

    def create_job(self, job_id: str, spec: dict[str, Any]) -> None:
        now = time.time()
        pipe = self.client.pipeline()
        pipe.hset(keys.job(job_id), mapping={"spec": json.dumps(spec), "created": now, "submitted": 0})
        pipe.zadd(keys.jobs(), {job_id: now})
        pipe.execute()

    def add_shard(self, job_id: str, shard_id: int, images: int) -> None:
        record = json.dumps(_shard_record(PENDING, images_in=images))
        self.client.hset(keys.shards(job_id), str(shard_id), record)

    def finish_submit(self, job_id: str, shards: int, images: int) -> None:
        self.client.hset(
            keys.job(job_id), mapping={"submitted": 1, "shards_total": shards, "images_total": images}
        )

    def fail_submit(self, job_id: str, reason: str) -> None:
        self.client.hset(keys.job(job_id), "submit_error", reason)

    def update_shard(self, job_id: str, shard_id: int, state: str, **extra: Any) -> None:
        key, name = keys.shards(job_id), str(shard_id)
        old = self.client.hget(key, name)
        record = {**(json.loads(old) if old else {}), **_shard_record(state, **extra)}
        self.client.hset(key, name, json.dumps(record))

    def get_job(self, job_id: str) -> JobState | None:
        meta = self.client.hgetall(keys.job(job_id))
        if not meta:
            return None
        meta = {k.decode(): v.decode() for k, v in meta.items()}
        raw = self.client.hgetall(keys.shards(job_id))
        shards = {int(k): json.loads(v) for k, v in raw.items()}
        total = meta.get("shards_total")
        images = meta.get("images_total")
        return JobState(
            job_id=job_id,
            spec=json.loads(meta["spec"]),
            created=float(meta["created"]),
            submitted=meta.get("submitted") == "1",
            shards_total=int(total) if total is not None else None,
            images_total=int(images) if images is not None else None,
            shards=shards,
            submit_error=meta.get("submit_error"),
        )


def worker_name() -> str:
    return socket.gethostname()
