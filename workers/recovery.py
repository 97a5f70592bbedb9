"""Recovery, run by every worker in the background: no extra process to deploy.

Every ``heartbeat_seconds`` each worker's main process (a thread started by ``RecoveryStep``):
1. marks itself alive on its queue (``status`` says when a job's queue has no live consumer), and now and
   then drops expired jobs from the jobs index (so the readers of the state never write);
2. reaps expired leases: a shard whose worker stopped heartbeating is requeued (or dead-lettered once
   its attempts are spent), and the dead worker's copy in the broker's unacked set is dropped so it
   cannot come back hours later;
3. enqueues due shards (retries after their backoff, reaped and handed-back shards) from the state
   store, with the URIs recorded at submit time: the broker's messages are a hint, the state is the truth;
4. finds shards whose message was lost (a Redis restart that lost its last second of writes, a worker
   killed between taking a message and starting it): a job that has pending shards, nothing running,
   an empty queue and no progress for a whole lease period gets its pending shards enqueued again.
Duplicate messages are harmless: ``begin`` runs a shard only when no live attempt holds it.
After losing the state store, reaping waits one lease period, so attempts that kept running while
Redis was away can renew their leases first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from workers.contract import TASK_NAME, ModelSpec, OutputSpec, ShardTask
from workers.settings import Settings
from workers.spool import STATE, shard_ref

log = logging.getLogger(__name__)

PRUNE_EVERY = 300  # seconds between two looks for expired ids in the jobs index


class Recovery:
    """One worker's recovery loop; ``run_once`` is one pass (tests call it directly)."""

    def __init__(self, store: Any, settings: Settings, worker: str, publish: Callable[[ShardTask], None],
                 broker: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.settings, self.worker, self.publish = store, settings, worker, publish
        self.broker = broker  # the broker's Redis client, when the broker is Redis
        self.clock = clock
        self.healthy_since: float | None = None
        self._idle: dict[str, tuple[tuple[Any, ...], float]] = {}  # job -> (counters, since)
        self._pruned: float | None = None

    def run_once(self) -> dict[str, int]:
        """One pass; returns what it did (reaped, published, resent)."""
        now = self.clock()
        self.store.touch_worker(self.settings.queue, self.worker)
        if self._pruned is None or now - self._pruned >= PRUNE_EVERY:
            self.store.prune_jobs()
            self._pruned = now
        if self.healthy_since is None:
            self.healthy_since = now
        done = {"reaped": 0, "published": 0, "resent": 0}
        if now - self.healthy_since >= self.settings.lease_seconds:
            done["reaped"] = self.reap()
            done["resent"] = self.resend_lost(now)
        done["published"] = self.publish_due()
        return done

    def reap(self) -> int:
        count = 0
        for job_id, shard_id in self.store.expired_leases():
            state, lease = self.store.reap(job_id, shard_id, self.settings.max_attempts)
            if state in ("alive", "gone"):
                continue
            count += 1
            log.warning("job %s shard %s: worker %s lost (no heartbeat); shard is now %s", job_id, shard_id,
                        (lease or {}).get("worker"), state)
            self._drop_unacked((lease or {}).get("delivery_tag"))
        return count

    def publish_due(self, limit: int = 200) -> int:
        count = 0
        specs: dict[str, dict[str, Any] | None] = {}
        for job_id, shard_id, claimed in self.store.claim_due(limit, visibility=self.settings.lease_seconds):
            if job_id not in specs:
                job = self.store.get_job(job_id)
                specs[job_id] = job.spec if job is not None and not job.cancelled else None
            spec = specs[job_id]
            task = task_for(self.store, job_id, shard_id, spec) if spec is not None else None
            if task is not None:
                self.publish(task)
                count += 1
            self.store.drop_claimed(job_id, shard_id, claimed)
        return count

    def resend_lost(self, now: float) -> int:
        """Re-enqueue the pending shards of jobs that look stalled (see the module docstring, step 4)."""
        if self.broker is None:
            return 0
        resent = 0
        queue_empty = self.broker.llen(self.settings.broker_prefix + self.settings.queue) == 0
        for job_id in self.store.active_jobs():
            job = self.store.get_job(job_id)
            if job is None or job.cancelled or not (job.submitted or job.submit_error):
                self._idle.pop(job_id, None)
                continue
            counters = (job.n_done, job.n_failed, job.n_running, job.n_lost)
            stalled = queue_empty and job.n_running == 0 and job.count("pending") > 0
            if not stalled:
                self._idle.pop(job_id, None)
                continue
            seen, since = self._idle.get(job_id, (counters, now))
            if seen != counters:
                since = now
            self._idle[job_id] = (counters, since)
            if now - since >= self.settings.lease_seconds:
                pending = self.store.pending_shards(job_id)
                log.warning("job %s: %d pending shards have no message in the queue; enqueuing them again",
                            job_id, len(pending))
                self.store.schedule(job_id, pending)
                self._idle.pop(job_id, None)
                resent += len(pending)
        return resent

    def _drop_unacked(self, delivery_tag: str | None) -> None:
        """Remove a dead worker's message from kombu's unacked set (Redis broker), best effort."""
        if self.broker is None or not delivery_tag:
            return
        try:
            prefix = self.settings.broker_prefix  # kombu's global_keyprefix
            pipe = self.broker.pipeline()
            pipe.hdel(f"{prefix}unacked", delivery_tag)
            pipe.zrem(f"{prefix}unacked_index", delivery_tag)
            pipe.execute()
        except Exception as exc:  # the reaped shard is requeued anyway; a stale copy is skipped if it returns
            log.info("could not drop the unacked message %s: %s", delivery_tag, exc)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; errors (Redis restarting) are logged and retried."""
        failing = False
        while not stop.is_set():
            try:
                self.run_once()
                if failing:
                    log.info("recovery: state store reachable again")
                failing = False
            except Exception as exc:
                self.healthy_since = None
                if not failing:
                    log.warning("recovery: %s; retrying every %ss", exc, self.settings.heartbeat_seconds)
                failing = True
            stop.wait(self.settings.heartbeat_seconds)


def task_for(store: Any, job_id: str, shard_id: int, spec: dict[str, Any]) -> ShardTask | None:
    """A shard's task rebuilt from the job state: a pointer to its spooled URIs, or the URIs themselves."""
    model, output = ModelSpec.from_dict(spec["model"]), OutputSpec.from_dict(spec["output"])
    ref = shard_ref(spec["spool"], shard_id) if spec.get("spool") else STATE
    return ShardTask(job_id, shard_id, [], model, output, uris_ref=ref)


def celery_publisher(app: Any, queue: str) -> Callable[[ShardTask], None]:
    def publish(task: ShardTask) -> None:
        app.send_task(TASK_NAME, kwargs={"task": task.to_dict()}, queue=queue, argsrepr="()",
                      kwargsrepr=f"{task.job_id}/{task.name}",
                      retry=True, retry_policy={"max_retries": 3, "interval_start": 0.5})
    return publish


def broker_client(url: str, tls: Any = None) -> Any:
    """A Redis client for the broker's own keys, or None when the broker is not Redis."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    from workers.redis_conn import redis_client

    return redis_client(url, tls, socket_connect_timeout=5, socket_timeout=30)


def recovery_step() -> Any:
    """The Celery worker bootstep that runs ``Recovery`` in a thread of the worker's main process."""
    from celery import bootsteps

    class RecoveryStep(bootsteps.StartStopStep):
        requires = {"celery.worker.components:Pool"}

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.thread: threading.Thread | None = None
            self.stop_event = threading.Event()
            self.recovery: Recovery | None = None

        def start(self, parent: Any) -> None:
            from workers.redis_jobstore import RedisJobStore

            settings = Settings.from_env()
            store = RedisJobStore.from_settings(settings)
            self.recovery = Recovery(store, settings, parent.hostname, celery_publisher(parent.app, settings.queue),
                                     broker_client(settings.broker_url, settings.redis_tls))
            self.thread = threading.Thread(target=self.recovery.run, args=(self.stop_event,), daemon=True,
                                           name="batchinfer-recovery")
            self.thread.start()

        def stop(self, parent: Any) -> None:
            self.stop_event.set()
            if self.thread is not None:
                self.thread.join(timeout=5)
            if self.recovery is not None:
                try:
                    self.recovery.store.forget_worker(self.recovery.settings.queue, self.recovery.worker)
                except Exception as exc:  # Redis already gone: the entry ages out
                    log.info("could not deregister %s: %s", parent.hostname, exc)

    return RecoveryStep
