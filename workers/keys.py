"""The Redis key layout, in one place (documented in the README). ``{ns}`` is the deployment's namespace
(``BATCHINFER_NAMESPACE``, default ``batchinfer``): every key of a deployment starts with it, so one ACL key
pattern (``~{ns}:*``) confines a Redis user to its own deployment (``infra/redis/users.acl``). With a namespace
set, the broker's keys (queues, unacked messages, bindings) move under ``{ns}:broker:`` as well.

    {ns}:jobs                               sorted set: job ids by creation time
    {ns}:active                             set: jobs not finished yet (what the recovery loop looks at)
    {ns}:leases                             sorted set: "{job}/{shard}" of running shards -> lease deadline
    {ns}:delayed                            sorted set: "{job}/{shard}" to (re-)enqueue -> when
    {ns}:queue:{queue}:workers              sorted set: worker node names consuming the queue -> last seen
    {ns}:job:{job}                          hash: spec (JSON), created, submitted, shards_total, images_total,
                                            counters (n_done, n_failed, n_running, images_done, errors_done,
                                            n_lost), cancelled, finished
    {ns}:job:{job}:shards                   hash: shard id -> JSON state (pending/running/done/failed, attempts, ...)
    {ns}:job:{job}:leases                   hash: shard id -> JSON lease (worker, pid, attempt, heartbeat, ...)
    {ns}:job:{job}:failed                   sorted set: dead-lettered shard ids -> when they failed
    {ns}:job:{job}:uris                     hash: shard id -> the shard's URIs (zlib-compressed JSON list)
    {ns}:job:{job}:rows:{shard}             list: the image keys a shard wrote (Redis sink), in input order
    {ns}:job:{job}:schema                   string: the output's Arrow schema, IPC-serialised (Redis sink)
    {ns}:job:{job}:committed                hash: shard -> JSON {images, errors} of committed rows (Redis sink)
    {ns}:job:{job}:img:{uri}                hash: one image's row (Redis sink)
    {ns}:job:{job}:staging:{shard}:{attempt}:{n}   hash: a row not yet committed (expires in a day)
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "batchinfer"


@dataclass(frozen=True)
class Keys:
    """The key names of one deployment (``prefix``: its namespace)."""

    prefix: str = DEFAULT_NAMESPACE

    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def active(self) -> str:
        return f"{self.prefix}:active"

    def leases(self) -> str:
        return f"{self.prefix}:leases"

    def delayed(self) -> str:
        return f"{self.prefix}:delayed"

    def queue_workers(self, queue: str) -> str:
        return f"{self.prefix}:queue:{queue}:workers"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def shards(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:shards"

    def job_leases(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:leases"

    def failed(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:failed"

    def uris(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:uris"

    def state_keys(self, job_id: str) -> list[str]:
        """The keys of a job's state (not its Redis-sink rows): what retention expires and ``delete`` removes."""
        return [self.job(job_id), self.shards(job_id), self.job_leases(job_id), self.failed(job_id),
                self.uris(job_id)]

    def transition(self, job_id: str) -> list[str]:
        """KEYS[1..8] of a state transition (``workers.lua``): job, shards, job leases, failed, leases, delayed,
        active, URIs."""
        return [self.job(job_id), self.shards(job_id), self.job_leases(job_id), self.failed(job_id),
                self.leases(), self.delayed(), self.active(), self.uris(job_id)]

    def job_pattern(self, job_id: str) -> str:
        """Every key of one job, state and Redis-sink rows (for ``delete --rows``)."""
        return f"{self.prefix}:job:{job_id}:*"

    def shard_rows(self, job_id: str, shard: str) -> str:
        return f"{self.prefix}:job:{job_id}:rows:{shard}"

    def committed(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:committed"

    def image(self, job_id: str, uri: str) -> str:
        return f"{self.prefix}:job:{job_id}:img:{uri}"

    def staging(self, job_id: str, shard: str, attempt: str) -> str:
        return f"{self.prefix}:job:{job_id}:staging:{shard}:{attempt}"

    def schema(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:schema"


def member(job_id: str, shard_id: int) -> str:
    """A shard's name in the global sorted sets (job ids cannot contain ``/``)."""
    return f"{job_id}/{shard_id}"


def parse_member(value: str | bytes) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    job_id, _, shard = text.rpartition("/")
    return job_id, int(shard)
