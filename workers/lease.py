"""A running attempt's lease, kept alive by a heartbeat thread, and the reasons an attempt stops early.

The pipeline asks ``should_stop()`` between batches. It answers when the job was cancelled, when this
worker is shutting down (SIGTERM: the flag below, set in the Celery main process and shared with the
pool's children through memory inherited at fork) or when the lease was lost to another attempt
(this process was presumed dead, e.g. Redis was unreachable for longer than the lease).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

LOST, CANCELLED, SHUTDOWN = "lost its lease", "job cancelled", "worker shutting down"

# One byte of shared memory, created when this module is first imported (in the Celery main process,
# before the pool forks), so a stop requested there is seen by every pool child at its next batch.
_STOPPING = multiprocessing.RawValue("b", 0)


def request_stop() -> None:
    """Ask every running attempt of this worker to hand its shard back at the next batch."""
    _STOPPING.value = 1


def stopping() -> bool:
    return bool(_STOPPING.value)


class Lease:
    """Renews ``token``'s lease on a shard every ``heartbeat`` seconds while the ``with`` block runs."""

    def __init__(self, store: Any, job_id: str, shard_id: int, token: str, lease_seconds: float,
                 heartbeat: float) -> None:
        self.store, self.job_id, self.shard_id, self.token = store, job_id, shard_id, token
        self.lease_seconds, self.heartbeat = lease_seconds, heartbeat
        self.reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}-{shard_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def should_stop(self) -> str | None:
        """Why the attempt must stop now, or None to go on."""
        if stopping():
            return SHUTDOWN
        return self.reason

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._done.wait(self.heartbeat):
            try:
                answer = self.store.heartbeat(self.job_id, self.shard_id, self.token, self.lease_seconds)
            except Exception as exc:  # Redis restarting: keep working, keep trying; the lease may run out
                failing_since = failing_since or time.monotonic()
                log.warning("job %s shard %s: cannot renew the lease (%s); retrying", self.job_id, self.shard_id,
                            exc)
                continue
            if failing_since is not None:
                log.info("job %s shard %s: lease renewed after %.0fs", self.job_id, self.shard_id,
                         time.monotonic() - failing_since)
                failing_since = None
            if answer == "lost":
                self.reason = LOST
                log.warning("job %s shard %s: lease taken over by another attempt; stopping", self.job_id,
                            self.shard_id)
                return
            if answer == "cancelled":
                self.reason = CANCELLED
                return


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists (a lease holder, a pool process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
