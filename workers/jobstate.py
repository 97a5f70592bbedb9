"""Job state: a job, its shards and the state machine every attempt of a shard goes through.

    pending ──begin──> running ──finish──> done      (final, except through ``retry``)
       ^                  │ ├──fail (retryable)──> pending, re-enqueued after a backoff
       │                  │ ├──fail (final) / attempts spent──> failed (dead letter)
       └──release / lease expired (reap)──┘

Every delivery of a shard ``begin``\\ s an attempt, and a process that dies mid-shard has used its attempt
too: once ``max_attempts`` are spent the shard is failed and set aside instead of being run again.
A running shard holds a lease (worker, pid, attempt, heartbeat); a stale lease is reaped by the live
workers. Transitions are atomic (Lua in ``workers.redis_jobstore``; a lock here) and the job's counters
change with them, so ``status`` reads a few fields instead of every shard.

``RedisJobStore`` is what the cluster uses; ``MemoryJobStore`` backs the embedded ``batchinfer run``
with the same interface and no server, and both pass ``tests/test_jobstore.py``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.contract import ShardList

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"

# What ``begin`` tells an attempt to do.
RUN = "run"          # the shard is yours: process it
SKIP_DONE = "done"   # already done (a duplicate delivery): acknowledge, do nothing
SKIP_RUNNING = "running"  # another live attempt holds the lease: do not run it twice
SKIP_FAILED = "failed"    # dead-lettered: only ``retry`` brings it back
CANCELLED = "cancelled"   # the job was cancelled
UNKNOWN = "unknown"       # no such job or shard (deleted, or expired after retention)
DEAD = "dead"             # this delivery found the attempts spent: the shard is now failed


@dataclass(frozen=True)
class Holder:
    """Who runs an attempt: Celery node name, host and pid, and a token unique to the attempt."""

    worker: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    delivery_tag: str | None = None

    def lease(self) -> dict[str, Any]:
        return {"token": self.token, "worker": self.worker, "host": self.host, "pid": self.pid,
                "delivery_tag": self.delivery_tag}


@dataclass(frozen=True)
class Begin:
    """The outcome of ``begin``: ``action`` (one of the constants above) and the attempt's numbers."""

    action: str
    attempt: int = 0
    runs: int = 0
    lease: dict[str, Any] | None = None  # the other holder's lease (SKIP_RUNNING)
    reason: str | None = None


@dataclass
class JobState:
    """A snapshot of one job, as ``status`` and ``collect`` see it.

    Counters come from the job record; ``running`` lists the leases (one per busy worker) and
    ``failed`` the first dead-lettered shards; ``shards`` (every shard record) only when asked for.
    """

    job_id: str
    spec: dict[str, Any]
    created: float
    submitted: bool
    shards_total: int | None
    images_total: int | None
    n_shards: int = 0
    n_done: int = 0
    n_failed: int = 0
    n_running: int = 0
    n_lost: int = 0
    images_done: int = 0
    errors: int = 0
    first_started: float | None = None
    last_finished: float | None = None
    cancelled: float | None = None
    finished_at: float | None = None
    submit_error: str | None = None
    last_lost: dict[str, Any] | None = None
    running: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)
    now: float | None = None  # the store's clock when read (lease ages are measured against it)

    def count(self, state: str) -> int:
        if state == DONE:
            return self.n_done
        if state == FAILED:
            return self.n_failed
        if state == RUNNING:
            return self.n_running
        total = self.shards_total if self.shards_total is not None else self.n_shards
        return max(total - self.n_done - self.n_failed - self.n_running, 0)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def queue(self) -> str:
        return str(self.spec.get("queue") or "batchinfer")

    def rate(self, now: float | None = None) -> float | None:
        """Images per second since the first shard started."""
        if not self.n_done or self.first_started is None:
            return None
        end = (self.last_finished or now or time.time()) if self.finished else (now or time.time())
        return self.images_done / max(end - self.first_started, 1e-6)


class JobStore(Protocol):
    """What the producer, the workers and the collector need from job state (see the module docstring)."""

    def create_job(self, job_id: str, spec: dict[str, Any]) -> bool: ...
    def add_shard(self, job_id: str, shard_id: int, uris: list[str], keep_uris: bool = True,
                  columns: dict[str, list[Any]] | None = None) -> bool: ...
    def finish_submit(self, job_id: str, shards: int, images: int) -> None: ...
    def fail_submit(self, job_id: str, reason: str) -> None: ...
    def begin(self, job_id: str, shard_id: int, holder: Holder, lease_seconds: float, max_attempts: int,
              takeover: str | None = None) -> Begin: ...
    def heartbeat(self, job_id: str, shard_id: int, token: str, lease_seconds: float) -> str: ...
    def finish(self, job_id: str, shard_id: int, token: str, result: dict[str, Any]) -> str: ...
    def fail(self, job_id: str, shard_id: int, token: str, reason: str, retry_in: float | None) -> str: ...
    def release(self, job_id: str, shard_id: int, token: str, reason: str) -> str: ...
    def get_job(self, job_id: str, shards: bool = False) -> JobState | None: ...
    def shard_list(self, job_id: str, shard_id: int) -> ShardList | None: ...
    def shard_uris(self, job_id: str, shard_id: int) -> list[str] | None: ...


def lost_reason(lease: dict[str, Any], why: str) -> str:
    return f"worker {lease.get('worker')} (pid {lease.get('pid')}) {why} during attempt {lease.get('attempt')}"


class MemoryJobStore:
    """In-process job state for the embedded mode: the same transitions, guarded by a lock."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobState] = {}
        self.leases: dict[tuple[str, int], dict[str, Any]] = {}
        self.delayed: dict[tuple[str, int], float] = {}
        self.lock = threading.RLock()

    def create_job(self, job_id: str, spec: dict[str, Any]) -> bool:
        with self.lock:
            if job_id in self.jobs:
                return False
            self.jobs[job_id] = JobState(job_id, spec, time.time(), False, None, None)
            return True

    def add_shard(self, job_id: str, shard_id: int, uris: list[str], keep_uris: bool = True,
                  columns: dict[str, list[Any]] | None = None) -> bool:
        with self.lock:
            job = self.jobs[job_id]
            if shard_id in job.shards:
                return False
            job.shards[shard_id] = {"state": PENDING, "images_in": len(uris), "attempts": 0, "runs": 0}
            job.n_shards += 1  # the URIs are not kept: nothing re-enqueues a shard in one process
            return True

    def finish_submit(self, job_id: str, shards: int, images: int) -> None:
        with self.lock:
            job = self.jobs[job_id]
            job.submitted, job.shards_total, job.images_total, job.submit_error = True, shards, images, None
            self._maybe_finish(job)

    def fail_submit(self, job_id: str, reason: str) -> None:
        with self.lock:
            self.jobs[job_id].submit_error = reason
            self._maybe_finish(self.jobs[job_id])

    def begin(self, job_id: str, shard_id: int, holder: Holder, lease_seconds: float, max_attempts: int,
              takeover: str | None = None) -> Begin:
        with self.lock:
            job = self.jobs.get(job_id)
            rec = job.shards.get(shard_id) if job else None
            if job is None or rec is None:
                return Begin(UNKNOWN)
            if job.cancelled:
                return Begin(CANCELLED)
            if rec["state"] in (DONE, FAILED):
                return Begin(rec["state"])
            now = time.time()
            if rec["state"] == RUNNING:
                lease = self.leases[(job_id, shard_id)]
                if lease["deadline"] > now and lease["token"] != takeover:
                    return Begin(SKIP_RUNNING, lease=dict(lease))
                self._drop_lease(job, shard_id)
                rec["reason"] = lost_reason(lease, "died")
                rec["lost"] = rec.get("lost", 0) + 1
                job.n_lost += 1
            self.delayed.pop((job_id, shard_id), None)
            if rec["attempts"] >= max_attempts:  # this delivery finds the attempts spent
                reason = f"gave up after {max_attempts} attempts: {rec.get('reason') or 'unknown'}"
                self._to_failed(job, shard_id, rec, reason)
                self._maybe_finish(job)
                return Begin(DEAD, rec["attempts"], rec["runs"], reason=reason)
            rec["attempts"] += 1
            rec.update(state=RUNNING, runs=rec["runs"] + 1, started=now, worker=holder.worker)
            self.leases[(job_id, shard_id)] = {**holder.lease(), "attempt": rec["attempts"], "started": now,
                                               "heartbeat": now, "deadline": now + lease_seconds}
            job.n_running += 1
            job.first_started = job.first_started or now
            return Begin(RUN, rec["attempts"], rec["runs"])

    def heartbeat(self, job_id: str, shard_id: int, token: str, lease_seconds: float) -> str:
        with self.lock:
            lease = self.leases.get((job_id, shard_id))
            if lease is None or lease["token"] != token:
                return "lost"
            now = time.time()
            lease.update(heartbeat=now, deadline=now + lease_seconds)
            return CANCELLED if self.jobs[job_id].cancelled else "ok"

    def finish(self, job_id: str, shard_id: int, token: str, result: dict[str, Any]) -> str:
        with self.lock:
            job = self.jobs.get(job_id)
            rec = job.shards.get(shard_id) if job else None
            if job is None or rec is None:
                return UNKNOWN
            if rec["state"] == DONE:
                return DONE
            self._leave(job, shard_id, rec)
            now = time.time()
            rec.pop("reason", None)
            rec.update(state=DONE, finished=now, **result)
            job.n_done += 1
            job.images_done += int(result.get("images", 0))
            job.errors += int(result.get("errors", 0))
            job.last_finished = now
            return "finished" if self._maybe_finish(job) else "ok"

    def fail(self, job_id: str, shard_id: int, token: str, reason: str, retry_in: float | None) -> str:
        with self.lock:
            job, rec = self._held(job_id, shard_id, token)
            if job is None:
                return "lost"
            self._drop_lease(job, shard_id)
            rec["reason"] = reason
            if retry_in is None and not job.cancelled:
                self._to_failed(job, shard_id, rec, reason)
            else:
                rec["state"] = PENDING
                if not job.cancelled:
                    rec["retry_at"] = time.time() + (retry_in or 0)
                    self.delayed[(job_id, shard_id)] = rec["retry_at"]
            self._maybe_finish(job)
            return rec["state"]

    def release(self, job_id: str, shard_id: int, token: str, reason: str) -> str:
        with self.lock:
            job, rec = self._held(job_id, shard_id, token)
            if job is None:
                return "lost"
            self._drop_lease(job, shard_id)
            rec.update(state=PENDING, attempts=rec["attempts"] - 1, reason=reason)
            if not job.cancelled:
                self.delayed[(job_id, shard_id)] = time.time()
            self._maybe_finish(job)
            return PENDING

    def cancel(self, job_id: str) -> None:
        with self.lock:
            job = self.jobs[job_id]
            job.cancelled = job.cancelled or time.time()
            self._maybe_finish(job)

    def get_job(self, job_id: str, shards: bool = False) -> JobState | None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            job.running = [{"shard": s, **lease} for (j, s), lease in sorted(self.leases.items()) if j == job_id]
            job.failed = [{"shard": i, **rec} for i, rec in sorted(job.shards.items()) if rec["state"] == FAILED]
            return job

    def shard_list(self, job_id: str, shard_id: int) -> ShardList | None:
        return None

    def shard_uris(self, job_id: str, shard_id: int) -> list[str] | None:
        return None

    # -- helpers (called with the lock held) --
    def _held(self, job_id: str, shard_id: int, token: str) -> tuple[Any, Any]:
        lease = self.leases.get((job_id, shard_id))
        if lease is None or lease["token"] != token:
            return None, None
        job = self.jobs[job_id]
        return job, job.shards[shard_id]

    def _drop_lease(self, job: JobState, shard_id: int) -> None:
        if self.leases.pop((job.job_id, shard_id), None) is not None:
            job.n_running -= 1

    def _leave(self, job: JobState, shard_id: int, rec: dict[str, Any]) -> None:
        """Undo the counters of the state ``rec`` is leaving."""
        if rec["state"] == RUNNING:
            self._drop_lease(job, shard_id)
        elif rec["state"] == FAILED:
            job.n_failed -= 1
        self.delayed.pop((job.job_id, shard_id), None)

    def _to_failed(self, job: JobState, shard_id: int, rec: dict[str, Any], reason: str) -> None:
        rec.update(state=FAILED, reason=reason, failed_at=time.time())
        job.n_failed += 1

    def _maybe_finish(self, job: JobState) -> bool:
        """Mark the job finished if nothing is left to run; True when this call did it."""
        if job.finished_at is not None or job.n_running:
            return False
        complete = (job.submitted or job.submit_error) and job.n_done + job.n_failed >= job.n_shards
        if complete or job.cancelled:
            job.finished_at = time.time()
            return True
        return False

