"""Streaming URIs into fixed-size shards without holding more than one shard in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice


def shards(uris: Iterable[str], size: int) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(shard_id, uris)`` with ids 0, 1, 2, ... and at most ``size`` URIs each."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    it = iter(uris)
    shard_id = 0
    while chunk := list(islice(it, size)):
        yield shard_id, chunk
        shard_id += 1
