"""Duplicate URIs across sources: the first occurrence is kept, later ones are skipped and counted.

Only a job with more than one source is checked (``producer.shards.ShardStream``): one folder or S3
prefix cannot list a file twice, and a single manifest is taken as written. With several sources every
URI is checked, so a file in two manifests, or in a folder and a manifest, becomes one row; with
``--keep-columns`` the values of its first occurrence go with it. Local paths (and ``file://`` URIs) are
compared as normalised absolute paths, other URIs as written.

Memory: 8 bytes per URI seen (a 64-bit blake2b digest, in sorted numpy runs merged as they grow; at most
16 bytes at a merge's peak): 800 MB for 10^8 URIs, where a Python set of the same digests takes 70 bytes
per URI. Time: about 1 µs per URI (digest and lookup), a quarter of what submitting it costs. The price
of digests: two different URIs share one with probability about n²/2^65 (3 in 10,000 for a job of 10^8
URIs), and then the later one is skipped as if it were a duplicate.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from itertools import compress, islice

import numpy as np

from producer.sources import Entry

BATCH = 1024  # entries digested and looked up at once (the stream is read this far ahead)


def dedupe_key(uri: str) -> str:
    """What two URIs must share to be the same file (normalising only paths that need it: it is per URI)."""
    if uri.startswith("file://"):
        uri = uri[7:]
    elif "://" in uri:
        return uri
    if not uri.startswith(os.sep):
        return os.path.abspath(uri)
    return os.path.normpath(uri) if "/." in uri or "//" in uri else uri


def digests(uris: Iterable[str]) -> np.ndarray:
    """64-bit digests of the URIs' keys (``surrogatepass``: file names that are not UTF-8 hash too)."""
    blake2b, key = hashlib.blake2b, dedupe_key
    raw = b"".join([blake2b(key(u).encode("utf-8", "surrogatepass"), digest_size=8).digest() for u in uris])
    return np.frombuffer(raw, dtype=np.uint64)


class SeenDigests:
    """A set of 64-bit digests as sorted arrays ("runs"); a new run is merged into the previous one while
    that is not larger, so there are at most log2(n) runs and each lookup is a binary search in each."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def add_new(self, batch: np.ndarray) -> np.ndarray:
        """Which of ``batch`` were not seen before (nor earlier in ``batch``), as a mask; remembers them."""
        distinct, first = np.unique(batch, return_index=True)  # sorted: lookups walk each run once
        new = np.ones(len(distinct), dtype=bool)
        for run in self.runs:
            at = np.minimum(np.searchsorted(run, distinct), len(run) - 1)
            new &= run[at] != distinct
        fresh = np.zeros(len(batch), dtype=bool)
        fresh[first[new]] = True
        if new.any():
            self.runs.append(distinct[new])
            while len(self.runs) > 1 and len(self.runs[-2]) <= len(self.runs[-1]):
                last = self.runs.pop()
                merged = np.concatenate((self.runs[-1], last))
                merged.sort()  # in place: at most twice the set's size at the peak
                self.runs[-1] = merged
        return fresh


def duplicates_line(n: int) -> str:
    """What ``submit`` and ``run`` print on stderr when they skipped duplicates."""
    return f"skipped {n} duplicate URIs (listed by more than one source; each is processed once, the first kept)"


class Dedupe:
    """Filters a stream of ``Entry`` down to first occurrences; ``skipped`` counts the others."""

    def __init__(self) -> None:
        self.seen = SeenDigests()
        self.skipped = 0

    def filter(self, entries: Iterable[Entry]) -> Iterator[Entry]:
        """First occurrences, in order. Entries are checked in batches that double up to ``BATCH``, so the
        first shard goes out (and a broken source shows) as soon as without the check."""
        it = iter(entries)
        size = 1
        while batch := list(islice(it, size)):
            fresh = self.seen.add_new(digests(e.uri for e in batch))
            self.skipped += len(batch) - int(fresh.sum())
            yield from compress(batch, fresh.tolist())
            size = min(2 * size, BATCH)
