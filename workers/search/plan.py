"""Which index fits a memory budget: sizes, the kinds in order of preference, and their parameters (no FAISS).

The kinds, best recall first, each smaller than the one before:

    flat      the vectors themselves, 4·d bytes each: exact search
    ivf-sq8   an inverted file (k-means lists) of 8-bit scalar-quantised residuals, d bytes each
    ivf-pq    the same lists of product-quantised residuals, m bytes each (m divides d, at most d/4; the
              largest m that fits)

(4-bit scalar quantisation, d/2 bytes, is not offered: on the benchmark's vectors it reached a lower recall
than product quantisation at d/4 bytes. See the README's "Search" section for the measurements.)

``choose`` takes the first that fits the budget both while it is built (the training sample, the codes,
one chunk of input, the process itself) and when it is loaded for search. Every compressed index also
holds 16 bytes per vector (its id in a list and the direct map that turns an id back into a vector).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from workers.errors import ConfigError

MiB, GiB = 1 << 20, 1 << 30
DEFAULT_BUDGET = 2 * GiB  # no --max-memory: exact while it fits (about 350,000 x 1280), compressed beyond
PROCESS_BYTES = 320 * MiB  # Python, numpy, Arrow, FAISS, Arrow's read buffers: 230-300 MiB measured reading 5 GB
CHUNK_BYTES = 8 * MiB  # float32 vectors read and encoded at a time
PER_VECTOR = 16  # an IVF list's id (int64) and the direct map's entry (int64)
KMEANS_POINTS = 64  # training vectors per list (FAISS warns below 39)
MIN_LISTS = 16
PQ_TRAIN = 256 * 39  # product quantisers: 256 centroids per sub-quantiser, 39 points each

KINDS = ("flat", "ivf-sq8", "ivf-pq")
METRICS = ("cosine", "l2")  # cosine: normalised vectors, inner product; l2: Euclidean distance


def format_size(n: float) -> str:
    """``1.5 GiB``, ``300.0 MiB``, ``12 B``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Plan:
    """One index for ``count`` vectors of ``dim``: its kind and FAISS parameters, and what it takes.

    ``index_bytes``: the index loaded for search; ``build_bytes``: the peak while it is built, the process
    included; ``train_size``: vectors sampled to train it (0 for flat); ``code_size``: bytes per vector."""

    kind: str
    count: int
    dim: int
    code_size: int
    nlist: int = 0
    m: int = 0
    train_size: int = 0
    index_bytes: int = 0
    build_bytes: int = 0

    @property
    def factory(self) -> str:
        """The ``faiss.index_factory`` string (compressed kinds)."""
        codes = {"ivf-sq8": "SQ8", "ivf-pq": f"PQ{self.m}x8np"}[self.kind]  # np: no polysemous training (slow, unused)
        return f"IVF{self.nlist},{codes}"

    @property
    def needs(self) -> int:
        """The budget this index needs: the larger of its build's peak and the search process's memory."""
        return max(self.index_bytes + PROCESS_BYTES, self.build_bytes)

    @property
    def label(self) -> str:
        return f"ivf-pq{self.m}" if self.kind == "ivf-pq" else self.kind


def chunk_rows(dim: int) -> int:
    """Rows read and added at a time: ``CHUNK_BYTES`` of float32 vectors."""
    return max(256, CHUNK_BYTES // (4 * dim))


def nlist_for(count: int) -> int:
    """Inverted lists: the power of two nearest √count, at least 16, with enough points to train each."""
    nlist = 2 ** round(math.log2(max(count, 1)) / 2)
    return max(MIN_LISTS, min(nlist, count // KMEANS_POINTS))


def _chunk_bytes(count: int, dim: int) -> int:
    """A chunk in hand: Arrow's column and the float32 copy."""
    return 2 * min(count, chunk_rows(dim)) * dim * 4


def _flat(count: int, dim: int) -> Plan:
    size = count * dim * 4
    return Plan("flat", count, dim, dim * 4, index_bytes=size, build_bytes=PROCESS_BYTES + _chunk_bytes(count, dim))


def _compressed(kind: str, count: int, dim: int, code_size: int, m: int = 0) -> Plan | None:
    nlist = nlist_for(count)
    train = min(count, max(KMEANS_POINTS * nlist, PQ_TRAIN if kind == "ivf-pq" else 0))
    if count < KMEANS_POINTS * MIN_LISTS or train < (PQ_TRAIN if kind == "ivf-pq" else 0):
        return None  # too few vectors to train lists (and quantisers): only an exact index makes sense
    fixed = nlist * dim * 4 + (256 * dim * 4 if kind == "ivf-pq" else 2 * dim * 4)
    index = count * (code_size + PER_VECTOR) + fixed
    training = 2 * train * dim * 4 + 2 * fixed  # the sample and its residuals; centroids and k-means' copy
    filling = index + count * 4 + _chunk_bytes(count, dim)  # the codes, each vector's list number, a chunk
    return Plan(kind, count, dim, code_size, nlist, m, train, index, PROCESS_BYTES + max(training, filling))


def candidates(count: int, dim: int) -> list[Plan]:
    """Every kind for ``count`` vectors of ``dim``, largest (most exact) first."""
    plans: list[Plan | None] = [_flat(count, dim), _compressed("ivf-sq8", count, dim, dim)]
    plans += [_compressed("ivf-pq", count, dim, m, m) for m in range(dim // 4, 3, -1) if dim % m == 0]
    return [p for p in plans if p is not None]


def choose(count: int, dim: int, budget: int | None = None, kind: str | None = None) -> Plan:
    """The most exact index of ``count`` x ``dim`` vectors whose build and search fit ``budget`` bytes
    (``DEFAULT_BUDGET`` when None); ``kind`` forces one (``KINDS``)."""
    limit = DEFAULT_BUDGET if budget is None else budget
    plans = candidates(count, dim)
    if kind is not None:
        plans = [p for p in plans if p.kind == kind]
        if not plans:
            raise ConfigError(f"a {kind} index needs at least {KMEANS_POINTS * MIN_LISTS} vectors to train on")
    for plan in plans:
        if plan.needs <= limit:
            return plan
    smallest = min(plans, key=lambda p: p.needs)
    raise ConfigError(f"{count} vectors of dimension {dim} need at least {format_size(smallest.needs)} "
                      f"({'an' if smallest.label.startswith('i') else 'a'} {smallest.label} index); --max-memory is "
                      f"{format_size(limit)}")
