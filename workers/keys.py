"""The Redis key layout, in one place (documented in the README).

    batchinfer:jobs                         sorted set: job ids by creation time
    batchinfer:active                       set: jobs not finished yet (what the recovery loop looks at)
    batchinfer:leases                       sorted set: "{job}/{shard}" of running shards -> lease deadline
    batchinfer:delayed                      sorted set: "{job}/{shard}" to (re-)enqueue -> when
    batchinfer:queue:{queue}:workers        sorted set: worker node names consuming the queue -> last seen
    batchinfer:job:{job}                    hash: spec (JSON), created, submitted, shards_total, images_total,
                                            counters (n_done, n_failed, n_running, images_done, errors_done,
                                            n_lost), cancelled, finished
    batchinfer:job:{job}:shards             hash: shard id -> JSON state (pending/running/done/failed, attempts, ...)
    batchinfer:job:{job}:leases             hash: shard id -> JSON lease (worker, pid, attempt, heartbeat, ...)
    batchinfer:job:{job}:failed             sorted set: dead-lettered shard ids -> when they failed
    batchinfer:job:{job}:uris               hash: shard id -> the shard's URIs (zlib-compressed JSON list)
    batchinfer:job:{job}:rows:{shard}       list: the image keys a shard wrote (Redis sink), in input order
    batchinfer:job:{job}:schema             string: the output's Arrow schema, IPC-serialised (Redis sink)
    batchinfer:job:{job}:committed          hash: shard -> JSON {images, errors} of committed rows (Redis sink)
    batchinfer:job:{job}:img:{uri}          hash: one image's row (Redis sink)
    batchinfer:job:{job}:staging:{shard}:{attempt}:{n}   hash: a row not yet committed (expires in a day)
"""

PREFIX = "batchinfer"


def jobs() -> str:
    return f"{PREFIX}:jobs"


def active() -> str:
    return f"{PREFIX}:active"


def leases() -> str:
    return f"{PREFIX}:leases"


def delayed() -> str:
    return f"{PREFIX}:delayed"


def queue_workers(queue: str) -> str:
    return f"{PREFIX}:queue:{queue}:workers"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def shards(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:shards"


def job_leases(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:leases"


def failed(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:failed"


def uris(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:uris"


def state_keys(job_id: str) -> list[str]:
    """The keys of a job's state (not its Redis-sink rows): what retention expires and ``delete`` removes."""
    return [job(job_id), shards(job_id), job_leases(job_id), failed(job_id), uris(job_id)]


def job_pattern(job_id: str) -> str:
    """Every key of one job, state and Redis-sink rows (for ``delete --rows``)."""
    return f"{PREFIX}:job:{job_id}:*"


def member(job_id: str, shard_id: int) -> str:
    """A shard's name in the global sorted sets (job ids cannot contain ``/``)."""
    return f"{job_id}/{shard_id}"


def parse_member(value: str | bytes) -> tuple[str, int]:
    text = value.decode() if isinstance(value, bytes) else value
    job_id, _, shard = text.rpartition("/")
    return job_id, int(shard)


def shard_rows(job_id: str, shard: str) -> str:
    return f"{PREFIX}:job:{job_id}:rows:{shard}"


def committed(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:committed"


def image(job_id: str, uri: str) -> str:
    return f"{PREFIX}:job:{job_id}:img:{uri}"


def staging(job_id: str, shard: str, attempt: str) -> str:
    return f"{PREFIX}:job:{job_id}:staging:{shard}:{attempt}"


def schema(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:schema"
