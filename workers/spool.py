"""Shard URI lists kept in the job's storage, so task messages carry a pointer instead of the URIs.

A job whose output is a folder or an S3 prefix spools each shard's URIs to
``<output>/_batchinfer/<job>/shard-NNNNNN.uris.gz`` (gzip JSON; the ``_`` prefix hides it from
Parquet dataset readers); ``BATCHINFER_SPOOL`` (a folder or ``s3://`` prefix) names another place,
and is what makes Redis-sink jobs spool. Without a spool the URIs stay in Redis with the job state
(zlib-compressed) and the message's pointer is ``STATE``. Either way the broker holds about 1.6 KB
per shard whatever the shard's size, and a shard can be re-enqueued (recovery, ``retry``) without its
original message.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from workers.contract import OutputSpec, shard_name
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


def encode(uris: list[str], carry: dict[str, Any] | None = None) -> bytes:
    body: Any = uris if carry is None else {"uris": uris, **carry}
    return gzip.compress(json.dumps(body, separators=(",", ":")).encode(), compresslevel=5, mtime=0)


def write_uris(ref: str, uris: list[str], carry: dict[str, Any] | None = None) -> None:
    """Write a shard's list whole (temporary name, then rename / one PUT). A carry shard of an
    incremental run (``producer.incremental``) also lists where each image's previous row is."""
    with storage_for(ref).open_atomic(ref) as target, open(target.path, "wb") as fh:
        fh.write(encode(uris, carry))


def read_shard_list(ref: str) -> tuple[list[str], dict[str, Any] | None]:
    """A shard's URIs, and its carry list if it is a carry shard."""
    body = json.loads(gzip.decompress(storage_for(ref).read(ref)))
    if isinstance(body, dict):
        return [str(u) for u in body.pop("uris")], body
    return [str(u) for u in body], None


def read_uris(ref: str) -> list[str]:
    return read_shard_list(ref)[0]
