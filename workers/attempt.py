"""One delivery of a shard: begin an attempt, hold its lease, process it, record how it ended.

``run_attempt`` is what the Celery task (and the embedded ``batchinfer run``) calls; it never lets a
shard's failure escape as an exception, it returns an ``Outcome`` the caller maps to its own world
(Celery: SUCCESS / RETRY / FAILURE). The state machine lives in ``workers.jobstate``.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from workers.carry import carry_shard
from workers.confine import check_carry, check_task
from workers.contract import ShardTask
from workers.errors import ConfigError, ShardError, ShardStopped
from workers.jobstate import DEAD, RUN, SKIP_RUNNING, Holder
from workers.lease import LOST, Lease, pid_alive
from workers.pipeline import ShardResult, process_shard
from workers.settings import Settings
from workers.sinks import sink_class
from workers.spool import STATE, read_shard_list
from workers.storage import is_remote

log = logging.getLogger(__name__)

DONE, SKIPPED, RETRYING, FAILED, HANDED_BACK, STOPPED = (
    "done", "skipped", "retrying", "failed", "handed back", "stopped")


@dataclass
class Outcome:
    """How an attempt ended: ``state`` (one of the constants above), a human ``detail`` and what it made."""

    state: str
    detail: str = ""
    result: ShardResult | None = None
    retry_in: float | None = None
    error: BaseException | None = None
    attempt: int = 0

    def summary(self, task: ShardTask) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": task.job_id, "shard_id": task.shard_id, "outcome": self.state,
                               "attempt": self.attempt}
        if self.detail:
            out["detail"] = self.detail
        if self.result is not None:
            out.update(images=self.result.images, errors=self.result.errors)
        return out


def _dead_on_this_host(lease: dict[str, Any] | None) -> bool:
    """A lease held by a process of this machine that no longer exists (a pool child killed a moment ago)."""
    return bool(lease) and lease.get("host") == socket.gethostname() and not pid_alive(int(lease.get("pid", 0)))  # type: ignore[union-attr]


def _retrying(call: Callable[[], Any], what: str, patience: float) -> Any:
    """``call()``, retried with backoff while the state store is unreachable (a Redis restart)."""
    deadline = time.monotonic() + patience
    delay = 0.5
    while True:
        try:
            return call()
        except Exception as exc:
            if not _is_connection_error(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: state store unreachable (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a base dependency
        return False
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError))


def committed_output(task: ShardTask, settings: Settings) -> dict[str, int] | None:
    """Counts of this shard's rows if a previous attempt already committed them, else None."""
    try:
        return sink_class(task.output.sink).committed(task, settings)
    except Exception as exc:  # cannot tell: redo the shard (its commit replaces, never duplicates)
        log.info("job %s %s: cannot check for committed output (%s)", task.job_id, task.name, exc)
        return None


def _check_output(task: ShardTask) -> None:
    """The output location, checked before the model loads, so a shard that cannot be written fails with
    one clear reason. The producer checked it too: on a worker, a local folder that cannot be written is
    this machine's trouble (a mount not there yet, a full or read-only disk), retried with backoff like
    any transient failure; what the store itself refuses (no such bucket, access denied) fails at once."""
    try:
        sink_class(task.output.sink).check(task.output)
    except ConfigError as exc:
        if task.output.path and not is_remote(task.output.path):
            raise ShardError(str(exc)) from exc
        raise


def run_attempt(task: ShardTask, store: Any, get_predictor: Callable[[Any], Any], settings: Settings,
                holder: Holder, on_batch: Callable[[int], None] | None = None, meter: Any = None) -> Outcome:
    """Run one delivery of ``task`` under the job's state machine; see the module docstring. ``meter``
    (``workers.pipeline.Meter``) is told each batch's stage seconds."""
    where = f"job {task.job_id} {task.name}"
    patience = 2 * settings.lease_seconds

    def begin(takeover: str | None = None) -> Any:
        return _retrying(lambda: store.begin(task.job_id, task.shard_id, holder, settings.lease_seconds,
                                             settings.max_attempts, takeover), where, patience)

    start = begin()
    if start.action == SKIP_RUNNING and _dead_on_this_host(start.lease):
        log.warning("%s: its last attempt's process (pid %s) is gone; taking over", where, start.lease.get("pid"))
        start = begin(takeover=start.lease.get("token"))
    if start.action == DEAD:
        log.error("%s: %s", where, start.reason)
        return Outcome(FAILED, start.reason or "attempts exhausted", attempt=start.attempt)
    if start.action != RUN:
        log.info("%s: not run (%s)", where, start.action)
        return Outcome(SKIPPED, start.action)

    token = holder.token
    with Lease(store, task.job_id, task.shard_id, token, settings.lease_seconds, settings.heartbeat_seconds) as lease:
        try:
            check_task(task, settings.allowed_roots, settings.spool)  # before anything is read or written
            _check_output(task)
            carry = None
            if task.uris_ref and not task.uris:  # the message carries a pointer to the URIs
                listed = (store.shard_list(task.job_id, task.shard_id) if task.uris_ref == STATE
                          else read_shard_list(task.uris_ref))
                if listed is None:
                    raise ConfigError(f"the URIs of {where} are gone (job state expired or deleted?)")
                task = replace(task, uris=listed.uris, columns=listed.columns)
                carry = listed.carry
                if carry is not None:
                    check_carry(carry["files"], settings.allowed_roots)
            counts = committed_output(task, settings) if start.runs > 1 else None
            if counts is not None:
                log.info("%s: output already committed by an earlier attempt; marking it done", where)
                ended = _retrying(lambda: store.finish(task.job_id, task.shard_id, token,
                                                       {**counts, "recovered": True}), where, patience)
                _maybe_complete_job(ended, task, store, settings)
                return Outcome(DONE, "output already committed", attempt=start.attempt)
            if carry is not None:  # an incremental run's unchanged images: copy their previous rows
                result = carry_shard(task, carry, settings)
            else:
                predictor = get_predictor(task.model)
                result = process_shard(task, predictor, settings, should_stop=lease.should_stop, on_batch=on_batch,
                                       meter=meter)
        except ShardStopped as stop:
            why = stop.reason
            if why == LOST:
                return Outcome(STOPPED, why, attempt=start.attempt)
            _retrying(lambda: store.release(task.job_id, task.shard_id, token, why), where, patience)
            log.warning("%s: handed back (%s)", where, why)
            return Outcome(HANDED_BACK, why, attempt=start.attempt)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            final = isinstance(exc, ConfigError) or start.attempt >= settings.max_attempts
            retry_in = None if final else settings.backoff(start.attempt)
            _retrying(lambda: store.fail(task.job_id, task.shard_id, token, reason, retry_in), where, patience)
            if final:
                log.error("%s failed for good after attempt %d: %s", where, start.attempt, reason)
                return Outcome(FAILED, reason, error=exc, attempt=start.attempt)
            log.warning("%s: attempt %d failed (%s); retrying in %.0fs", where, start.attempt, reason, retry_in)
            return Outcome(RETRYING, reason, retry_in=retry_in, error=exc, attempt=start.attempt)
        record = {"images": result.images, "errors": result.errors, "seconds": round(result.timings["total"], 3),
                  # where the shard's time went (the report's stage breakdown; read_decode overlaps the others)
                  "stages": {k: round(v, 3) for k, v in result.timings.items() if k != "total"}}
        ended = _retrying(lambda: store.finish(task.job_id, task.shard_id, token, record), where, patience)
    _maybe_complete_job(ended, task, store, settings)
    return Outcome(DONE, result=result, attempt=start.attempt)


def _maybe_complete_job(ended: str, task: ShardTask, store: Any, settings: Settings) -> None:
    """This attempt finished the job: let the sink commit its job-level files (``_SUCCESS``, manifest)."""
    if ended != "finished":
        return
    try:
        job = store.get_job(task.job_id, shards=True)
        if job is not None:
            if job.spec["output"].get("path"):  # the job state names its output too
                settings.allowed_roots.check(job.spec["output"]["path"], "output")
            sink_class(task.output.sink).on_job_complete(job)
            log.info("job %s finished", task.job_id)
    except Exception as exc:  # the rows are committed; only the marker is missing
        log.error("job %s: cannot write its completion files: %s", task.job_id, exc)


def run_shard(task: ShardTask, store: Any, get_predictor: Callable[[Any], Any],
              settings: Settings | None = None, on_batch: Callable[[int], None] | None = None) -> ShardResult:
    """One attempt with no retries, for the embedded ``batchinfer run``: a failure raises its own error."""
    from dataclasses import replace

    settings = replace(settings or Settings.from_env(), max_attempts=1)
    store.add_shard(task.job_id, task.shard_id, task.uris)  # no-op when the producer recorded it
    outcome = run_attempt(task, store, get_predictor, settings, Holder(worker="embedded"), on_batch)
    if outcome.error is not None:
        raise outcome.error
    if outcome.result is None:
        raise ShardStopped(outcome.detail or outcome.state)
    return outcome.result
