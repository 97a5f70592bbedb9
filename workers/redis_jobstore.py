"""Job state in Redis: the state machine of ``workers.jobstate`` as Lua scripts (``workers.lua``).

Key layout in ``workers.keys``. A shard's URIs are kept with its state (``job:{job}:uris``, the
zlib-compressed JSON body of its ``ShardList`` per shard: the URI list, or with kept manifest columns an
object) so a shard can be re-enqueued without its original message.
"""

from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING, Any

from workers import keys, lua
from workers.contract import ShardList
from workers.jobstate import Begin, Holder, JobState
from workers.keys import Keys
from workers.redis_conn import RedisTLS, redis_client

if TYPE_CHECKING:
    from workers.settings import Settings


def _s(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _f(value: Any) -> float | None:
    return float(value) if value not in (None, b"", "") else None


def pack_shard_list(listed: ShardList) -> bytes:
    return zlib.compress(json.dumps(listed.body(), separators=(",", ":")).encode(), 6)


def unpack_shard_list(blob: bytes) -> ShardList:
    return ShardList.from_body(json.loads(zlib.decompress(blob)))


class RedisJobStore:
    """Job state in Redis; see ``workers.keys`` for the layout and ``workers.lua`` for the transitions."""

    def __init__(self, client: Any, retention: float = 7 * 24 * 3600, keys: Keys | None = None) -> None:
        self.client = client
        self.retention = int(retention)
        self.keys = keys or Keys()
        self._scripts = {name: client.register_script(getattr(lua, name)) for name in (
            "BEGIN", "HEARTBEAT", "FINISH", "FAIL", "RELEASE", "REAP", "RETRY", "CANCEL", "SUBMIT_DONE", "RESUME",
            "ADD_SHARD", "CREATE", "CLAIM_DUE", "DROP_CLAIMED")}

    @classmethod
    def from_url(cls, url: str, retention: float = 7 * 24 * 3600, socket_timeout: float | None = 30,
                 tls: RedisTLS | None = None, keys: Keys | None = None) -> RedisJobStore:
        client = redis_client(url, tls, socket_connect_timeout=5, socket_timeout=socket_timeout,
                              health_check_interval=30)
        return cls(client, retention, keys)

    @classmethod
    def from_settings(cls, settings: Settings, socket_timeout: float | None = 30) -> RedisJobStore:
        """The deployment's job state: its URL, TLS options, retention and namespace."""
        return cls.from_url(settings.state_url, settings.retention, socket_timeout, settings.redis_tls,
                            Keys(settings.namespace))

    def _transition(self, name: str, job_id: str, shard_id: int | str, *args: Any) -> Any:
        return self._scripts[name](keys=self.keys.transition(job_id), args=[job_id, shard_id, self.retention, *args])

    # -- the producer's side --
    def create_job(self, job_id: str, spec: dict[str, Any]) -> bool:
        return bool(self._scripts["CREATE"](keys=[self.keys.job(job_id), self.keys.jobs(), self.keys.active()],
                                            args=[job_id, json.dumps(spec), 0, spec.get("queue") or "batchinfer"]))

    def add_shard(self, job_id: str, shard_id: int, uris: list[str], keep_uris: bool = True,
                  columns: dict[str, list[Any]] | None = None) -> bool:
        """Record a pending shard; its URIs (and kept column values) too unless the job spools them
        (``workers.spool``)."""
        blob = pack_shard_list(ShardList(uris, columns or {})) if keep_uris else b""
        k = self.keys
        return bool(self._scripts["ADD_SHARD"](keys=[k.job(job_id), k.shards(job_id), k.uris(job_id)],
                                               args=[shard_id, len(uris), blob]))

    def finish_submit(self, job_id: str, shards: int, images: int) -> None:
        self._transition("SUBMIT_DONE", job_id, "", shards, images, "")

    def fail_submit(self, job_id: str, reason: str) -> None:
        self._transition("SUBMIT_DONE", job_id, "", "", "", reason or "failed")

    def resume_submit(self, job_id: str) -> None:
        self._transition("RESUME", job_id, "")

    # -- an attempt's side --
    def begin(self, job_id: str, shard_id: int, holder: Holder, lease_seconds: float, max_attempts: int,
              takeover: str | None = None) -> Begin:
        out = self._transition("BEGIN", job_id, shard_id, json.dumps(holder.lease()), lease_seconds, max_attempts,
                               takeover or "")
        action = _s(out[0])
        attempt = int(out[1]) if len(out) > 1 else 0
        runs = int(out[2]) if len(out) > 2 else 0
        lease = json.loads(out[3]) if len(out) > 3 and out[3] else None
        reason = _s(out[4]) if len(out) > 4 else None
        return Begin(action, attempt, runs, lease, reason)  # type: ignore[arg-type]

    def heartbeat(self, job_id: str, shard_id: int, token: str, lease_seconds: float) -> str:
        return _s(self._transition("HEARTBEAT", job_id, shard_id, token, lease_seconds))  # type: ignore[return-value]

    def finish(self, job_id: str, shard_id: int, token: str, result: dict[str, Any]) -> str:
        return _s(self._transition("FINISH", job_id, shard_id, token, json.dumps(result)))  # type: ignore[return-value]

    def fail(self, job_id: str, shard_id: int, token: str, reason: str, retry_in: float | None) -> str:
        at = "" if retry_in is None else repr(float(retry_in))
        return _s(self._transition("FAIL", job_id, shard_id, token, reason, at))  # type: ignore[return-value]

    def release(self, job_id: str, shard_id: int, token: str, reason: str) -> str:
        return _s(self._transition("RELEASE", job_id, shard_id, token, reason))  # type: ignore[return-value]

    def shard_list(self, job_id: str, shard_id: int) -> ShardList | None:
        """A shard's list (URIs, kept column values), from Redis or from the job's spool."""
        blob = self.client.hget(self.keys.uris(job_id), str(shard_id))
        if blob:
            return unpack_shard_list(blob)
        spool = self.spool(job_id)
        if spool is None:
            return None
        from workers.spool import read_shard_list, shard_ref

        try:
            return read_shard_list(shard_ref(spool, shard_id))
        except FileNotFoundError:
            return None

    def shard_uris(self, job_id: str, shard_id: int) -> list[str] | None:
        listed = self.shard_list(job_id, shard_id)
        return None if listed is None else listed.uris

    def spool(self, job_id: str) -> str | None:
        raw = self.client.hget(self.keys.job(job_id), "spec")
        return json.loads(raw).get("spool") if raw else None

    # -- recovery (run by every worker, see workers.recovery) --
    def server_time(self) -> float:
        sec, usec = self.client.time()
        return sec + usec / 1e6

    def expired_leases(self, limit: int = 100) -> list[tuple[str, int]]:
        now = self.server_time()
        return [keys.parse_member(m) for m in self.client.zrangebyscore(self.keys.leases(), "-inf", now, 0, limit)]

    def reap(self, job_id: str, shard_id: int, max_attempts: int) -> tuple[str, dict[str, Any] | None]:
        out = self._transition("REAP", job_id, shard_id, max_attempts)
        return _s(out[0]), (json.loads(out[1]) if len(out) > 1 else None)  # type: ignore[return-value]

    def claim_due(self, limit: int = 100, visibility: float = 60) -> list[tuple[str, int, str]]:
        out = self._scripts["CLAIM_DUE"](keys=[self.keys.delayed()], args=[limit, visibility])
        return [(*keys.parse_member(out[i]), _s(out[i + 1])) for i in range(0, len(out), 2)]  # type: ignore[misc]

    def drop_claimed(self, job_id: str, shard_id: int, score: str) -> None:
        self._scripts["DROP_CLAIMED"](keys=[self.keys.delayed()], args=[keys.member(job_id, shard_id), score])

    def schedule(self, job_id: str, shard_ids: list[int]) -> None:
        """Enqueue these shards (again) at the next recovery pass; duplicates are harmless."""
        if shard_ids:
            now = self.server_time()
            self.client.zadd(self.keys.delayed(), {keys.member(job_id, s): now for s in shard_ids})

    def active_jobs(self) -> list[str]:
        return sorted(str(_s(j)) for j in self.client.smembers(self.keys.active()))

    def pending_shards(self, job_id: str) -> list[int]:
        """Shards neither running nor finished (a scan of the job's shard records: recovery only)."""
        return [int(k) for k, v in self.client.hscan_iter(self.keys.shards(job_id), count=1000)
                if json.loads(v).get("state") == "pending"]

    def touch_worker(self, queue: str, worker: str, forget_after: float = 3600) -> None:
        """Mark ``worker`` alive on ``queue``, and forget workers unseen for ``forget_after`` seconds (the
        workers keep this index small, so readers never need to write)."""
        now = self.server_time()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(self.keys.queue_workers(queue), {worker: now})
        pipe.zremrangebyscore(self.keys.queue_workers(queue), "-inf", now - forget_after)
        pipe.execute()

    def forget_worker(self, queue: str, worker: str) -> None:
        self.client.zrem(self.keys.queue_workers(queue), worker)

    def live_workers(self, queue: str, within: float) -> list[str]:
        now = self.server_time()
        return [_s(w) for w in self.client.zrangebyscore(self.keys.queue_workers(queue), now - within, "+inf")]  # type: ignore[misc]

    def list_shards(self, job_id: str, state: str, limit: int = 50) -> list[dict[str, Any]]:
        """Up to ``limit`` shard records in ``state``: failed and running from their small indexes,
        pending and done by a cursor scan that stops once ``limit`` are found."""
        if state == "failed":
            ids = self.client.zrange(self.keys.failed(job_id), 0, limit - 1)
            records = self.client.hmget(self.keys.shards(job_id), ids) if ids else []
            return [{"shard": int(i), **json.loads(r)} for i, r in zip(ids, records) if r]
        if state == "running":
            leases = self.client.hgetall(self.keys.job_leases(job_id))
            return [{"shard": int(k), **json.loads(v)} for k, v in sorted(leases.items(), key=lambda kv: int(kv[0]))
                    ][:limit]
        out: list[dict[str, Any]] = []
        for k, v in self.client.hscan_iter(self.keys.shards(job_id), count=1000):
            record = json.loads(v)
            if record.get("state") == state:
                out.append({"shard": int(k), **record})
                if len(out) >= limit:
                    break
        return sorted(out, key=lambda r: r["shard"])

    # -- lifecycle commands --
    def retry(self, job_id: str, shard_ids: list[int] | None = None) -> list[int]:
        args = ["*"] if shard_ids is None else [str(s) for s in shard_ids]
        return [int(s) for s in self._transition("RETRY", job_id, "", *args)]

    def cancel(self, job_id: str) -> bool:
        return bool(self._transition("CANCEL", job_id, ""))

    def delete(self, job_id: str, rows: bool = False) -> int:
        """Remove the job's state (and with ``rows`` its Redis-sink rows); return the number of keys deleted."""
        names = list(self.keys.state_keys(job_id))
        if rows:
            names += [k for k in self.client.scan_iter(self.keys.job_pattern(job_id), count=1000)]
        deleted = 0
        for i in range(0, len(names), 500):
            deleted += self.client.delete(*names[i:i + 500])
        prefix = f"{job_id}/"
        for big in (self.keys.leases(), self.keys.delayed()):
            gone = [m for m, _ in self.client.zscan_iter(big, match=f"{prefix}*", count=1000)]
            if gone:
                self.client.zrem(big, *gone)
        self.client.zrem(self.keys.jobs(), job_id)
        self.client.srem(self.keys.active(), job_id)
        return deleted

    def recent_jobs(self, limit: int = 20) -> list[JobState]:
        """The newest jobs first (ids whose state has expired are skipped: ``prune_jobs`` drops them)."""
        out: list[JobState] = []
        for raw in self.client.zrevrange(self.keys.jobs(), 0, limit * 2):
            job = self.get_job(_s(raw))  # type: ignore[arg-type]
            if job is not None and len(out) < limit:
                out.append(job)
        return out

    def prune_jobs(self, limit: int = 200) -> int:
        """Drop the oldest ids whose state has expired from the jobs index (run by the workers' recovery, so
        that ``jobs`` and ``status`` only ever read); returns how many."""
        ids = self.client.zrange(self.keys.jobs(), 0, limit - 1)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self.keys.job(_s(job_id)))  # type: ignore[arg-type]
        gone = [job_id for job_id, alive in zip(ids, pipe.execute()) if not alive]
        if gone:
            self.client.zrem(self.keys.jobs(), *gone)
        return len(gone)

    # -- reading --
    def get_job(self, job_id: str, shards: bool = False) -> JobState | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.hgetall(self.keys.job_leases(job_id))
        pipe.zrange(self.keys.failed(job_id), 0, 19)
        pipe.time()
        if shards:
            pipe.hgetall(self.keys.shards(job_id))
        raw_meta, raw_leases, failed_ids, (sec, usec), *rest = pipe.execute()
        if not raw_meta:
            return None
        meta = {k.decode(): v.decode() for k, v in raw_meta.items()}
        running = sorted(({"shard": int(k), **json.loads(v)} for k, v in raw_leases.items()),
                         key=lambda r: r["shard"])
        failed = []
        if failed_ids:
            for shard_id, rec in zip(failed_ids, self.client.hmget(self.keys.shards(job_id), failed_ids)):
                failed.append({"shard": int(shard_id), **(json.loads(rec) if rec else {})})
        records = {int(k): json.loads(v) for k, v in rest[0].items()} if shards else {}

        def num(name: str) -> int:
            return int(float(meta.get(name) or 0))

        total, images = meta.get("shards_total"), meta.get("images_total")
        return JobState(
            job_id=job_id, spec=json.loads(meta["spec"]), created=float(meta["created"]),
            submitted=meta.get("submitted") == "1",
            shards_total=int(total) if total else None, images_total=int(images) if images else None,
            n_shards=num("n_shards"), n_done=num("n_done"), n_failed=num("n_failed"), n_running=num("n_running"),
            n_lost=num("n_lost"), images_done=num("images_done"), errors=num("errors_done"),
            first_started=_f(meta.get("first_started")), last_finished=_f(meta.get("last_finished")),
            cancelled=_f(meta.get("cancelled")), finished_at=_f(meta.get("finished")),
            submit_error=meta.get("submit_error"),
            last_lost=json.loads(meta["last_lost"]) if meta.get("last_lost") else None,
            running=running, failed=failed, shards=records, now=sec + usec / 1e6,
        )
