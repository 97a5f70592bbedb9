"""The Redis key layout, in one place (documented in the README).

    batchinfer:jobs                         sorted set: job ids by creation time
    batchinfer:job:{job}                    hash: spec (JSON), created, submitted, shards_total, images_total
    batchinfer:job:{job}:shards             hash: shard id -> JSON state (pending/running/done/failed, counts)
    batchinfer:job:{job}:rows:{shard}       list: the image keys a shard wrote (Redis sink), in input order
    batchinfer:job:{job}:schema             string: the output's Arrow schema, IPC-serialised (Redis sink)
    batchinfer:job:{job}:img:{uri}          hash: one image's row (Redis sink)
    batchinfer:job:{job}:staging:{shard}:{attempt}:{n}   hash: a row not yet committed (expires in a day)
"""

PREFIX = "batchinfer"


def jobs() -> str:
    return f"{PREFIX}:jobs"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def shards(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:shards"


def shard_rows(job_id: str, shard: str) -> str:
    return f"{PREFIX}:job:{job_id}:rows:{shard}"


def image(job_id: str, uri: str) -> str:
    return f"{PREFIX}:job:{job_id}:img:{uri}"


def staging(job_id: str, shard: str, attempt: str) -> str:
    return f"{PREFIX}:job:{job_id}:staging:{shard}:{attempt}"


def schema(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:schema"
