"""Shard URI lists kept in the job's storage, so task messages carry a pointer instead of the URIs.

A job whose output is a folder or an S3 prefix spools each shard's URIs to
``<output>/_batchinfer/<job>/shard-NNNNNN.uris.gz`` (gzip JSON; the ``_`` prefix hides it from
Parquet dataset readers); ``BATCHINFER_SPOOL`` (a folder or ``s3://`` prefix) names another place,
and is what makes Redis-sink jobs spool. Without a spool the URIs stay in Redis with the job state
(zlib-compressed) and the message's pointer is ``STATE``. Either way the broker holds about 1.6 KB
per shard whatever the shard's size, and a shard can be re-enqueued (recovery, ``retry``) without its
original message. A list is a ``workers.contract.ShardList``: kept manifest columns and carry rows are
written with the URIs, in the same file.
"""

from __future__ import annotations

import gzip
import json

from workers.contract import OutputSpec, ShardList, shard_name
from workers.storage import storage_for

FOLDER = "_batchinfer"
STATE = "state:"  # the pointer of a shard whose URIs are kept in the job state (Redis)


def spool_for(job_id: str, output: OutputSpec, configured: str | None = None) -> str | None:
    """Where a job's shard lists go, or None (keep them in Redis)."""
    base = configured or (output.path if output.sink == "parquet" and output.path else None)
    if not base:
        return None
    return f"{base.rstrip('/')}/{FOLDER}/{job_id}" if not configured else f"{base.rstrip('/')}/{job_id}"


def shard_ref(spool: str, shard_id: int) -> str:
    return f"{spool}/{shard_name(shard_id)}.uris.gz"


def encode(listed: ShardList) -> bytes:
    return gzip.compress(json.dumps(listed.body(), separators=(",", ":")).encode(), compresslevel=5, mtime=0)


def write_shard_list(ref: str, listed: ShardList) -> None:
    """Write a shard's list whole (temporary name, then rename / one PUT)."""
    with storage_for(ref).open_atomic(ref) as target, open(target.path, "wb") as fh:
        fh.write(encode(listed))


def read_shard_list(ref: str) -> ShardList:
    """A shard's list, in either body form (``ShardList.from_body``)."""
    return ShardList.from_body(json.loads(gzip.decompress(storage_for(ref).read(ref))))


def read_uris(ref: str) -> list[str]:
    return read_shard_list(ref).uris
