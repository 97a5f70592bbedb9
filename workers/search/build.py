"""Vectors streamed in chunks -> an index in a folder, within the plan's memory: flat or a trained IVF.

An exact (flat) index streams the vectors into ``vectors.f32`` as they come (nothing held in memory). A
compressed one takes two passes over the same chunks:

1. ``sample(chunk)``: a uniform sample of the vectors (reservoir sampling, so sorted input such as a folder
   of classes cannot bias it), which trains the k-means lists and the quantiser;
2. ``add(chunk)``: each vector's list and code go to a temporary file; meanwhile the exact neighbours of a
   few hundred sampled vectors are found by brute force over every chunk.

``finish()`` then sizes every inverted list exactly (FAISS grows its lists by doubling, up to twice the
codes' memory) and fills them from the file, and picks ``nprobe``: the fewest lists to visit for which
recall@10 against the exact neighbours reaches the target, measured on those sampled vectors.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from workers.search.plan import CHUNK_BYTES, Plan

log = logging.getLogger(__name__)

RECALL_TARGET = 0.965  # 0.95 wanted; the estimate on 256 sampled vectors has a standard error of about 0.006
RECALL_K = 10
CALIBRATION_QUERIES = 256
KMEANS_ITERATIONS = 16


def faiss_module() -> Any:
    """FAISS, imported on first use, with an install hint when it is missing."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("search indexes need faiss-cpu (pip install 'keras-batch-inference[index]' or "
                          "pip install faiss-cpu)") from exc
    return faiss


def no_lookup_table(index: Any) -> None:
    """An IVF-PQ index with the L2 metric precomputes a table of nlist x m x 256 floats (hundreds of MB)
    that only speeds search up; it is left out so the index stays within its plan."""
    if hasattr(index, "use_precomputed_table"):
        index.use_precomputed_table = -1
        index.precomputed_table.resize(0)


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes the inner product); zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


class IndexBuilder:
    """Build the index of ``plan`` in ``folder``: ``sample`` every chunk (compressed kinds only, see
    ``needs_sample``), then ``add`` every chunk in the same order, then ``finish()`` -> build parameters.

    Ids are the vectors' positions in the order added. ``metric`` is ``cosine`` (vectors normalised, inner
    product) or ``l2``."""

    def __init__(self, folder: str, plan: Plan, metric: str, seed: int = 0,
                 recall_target: float = RECALL_TARGET) -> None:
        self.folder, self.plan, self.metric = folder, plan, metric
        self.recall_target = recall_target
        self.rng = np.random.default_rng(seed)
        self.faiss = faiss_module()
        self.count = 0  # vectors added
        self.seen = 0  # vectors sampled
        self.sample_x = np.empty((plan.train_size, plan.dim), np.float32)
        self.sample_ids = np.empty(plan.train_size, np.int64)
        self.index: Any = None
        self.lists: list[np.ndarray] = []
        self.truth: Any = None
        self.queries = np.empty((0, plan.dim), np.float32)
        self.query_ids = np.empty(0, np.int64)
        self.seconds: dict[str, float] = {"train": 0.0, "add": 0.0, "fill": 0.0, "calibrate": 0.0}
        name = "vectors.f32" if plan.kind == "flat" else ".codes.tmp"
        self.out = open(os.path.join(folder, name), "wb")

    def __enter__(self) -> IndexBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.out.close()  # finish() closed it already, unless something failed

    @property
    def needs_sample(self) -> bool:
        return self.plan.kind != "flat"

    @property
    def faiss_metric(self) -> int:
        return self.faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else self.faiss.METRIC_L2

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.plan.dim:
            raise ValueError(f"vectors of shape {x.shape}, expected (n, {self.plan.dim})")
        return normalized(x) if self.metric == "cosine" else x

    def sample(self, x: np.ndarray) -> None:
        """Pass 1: keep each vector with probability train_size / vectors seen so far (algorithm R)."""
        size, n = self.plan.train_size, len(x)
        positions = np.arange(self.seen, self.seen + n)
        fill = max(0, min(n, size - self.seen))
        rows = list(range(fill))
        slots = list(range(self.seen, self.seen + fill))
        if fill < n:
            draws = self.rng.integers(0, positions[fill:] + 1)  # a slot in [0, position]
            taken = np.nonzero(draws < size)[0] + fill
            rows += taken.tolist()
            slots += draws[taken - fill].tolist()
        if rows:  # a slot drawn twice in one chunk keeps the later row, as sequential sampling would
            last = len(slots) - 1 - np.unique(np.array(slots)[::-1], return_index=True)[1]
            keep = np.array(rows)[last]
            self.sample_x[np.array(slots)[last]] = self._prepare(x[keep])
            self.sample_ids[np.array(slots)[last]] = positions[keep]
        self.seen += n

    def _train(self) -> None:
        started = time.perf_counter()
        n = min(self.seen, self.plan.train_size)
        x, ids = self.sample_x[:n], self.sample_ids[:n]
        index = self.faiss.index_factory(self.plan.dim, self.plan.factory, self.faiss_metric)
        ivf = self.faiss.extract_index_ivf(index)
        ivf.cp.niter = KMEANS_ITERATIONS
        ivf.cp.seed = int(self.rng.integers(1 << 30))
        if hasattr(index, "pq"):  # hundreds of sub-quantisers: 39 points per centroid train each well enough
            index.pq.cp.niter, index.pq.cp.max_points_per_centroid = KMEANS_ITERATIONS, 39
        index.train(x)
        no_lookup_table(index)
        pick = self.rng.choice(n, size=min(CALIBRATION_QUERIES, n), replace=False)
        self.queries, self.query_ids = x[pick].copy(), ids[pick].copy()
        self.truth = self.faiss.ResultHeap(len(pick), RECALL_K + 1, keep_max=self.metric == "cosine")
        del x, ids
        self.sample_x = np.empty((0, self.plan.dim), np.float32)  # the sample's memory goes before the codes come
        self.sample_ids = np.empty(0, np.int64)
        self.index = index
        self.seconds["train"] = time.perf_counter() - started

    def add(self, x: np.ndarray) -> None:
        """Pass 2: vectors in id order."""
        x = self._prepare(x)
        if self.plan.kind == "flat":
            self.out.write(x.tobytes())
            self.count += len(x)
            return
        if self.index is None:
            if not self.seen:
                raise RuntimeError("a compressed index samples every chunk before the first add")
            self._train()
        started = time.perf_counter()
        ivf = self.faiss.extract_index_ivf(self.index)
        lists = ivf.quantizer.assign(x, 1).ravel()
        codes = np.empty((len(x), ivf.code_size), np.uint8)
        sp = self.faiss.swig_ptr
        ivf.encode_vectors(len(x), sp(x), sp(lists), sp(codes), False)
        self.out.write(codes.tobytes())
        self.lists.append(lists.astype(np.int32))
        if len(self.queries):
            distances, found = self.faiss.knn(self.queries, x, min(RECALL_K + 1, len(x)), metric=self.faiss_metric)
            self.truth.add_result(distances, np.where(found >= 0, found + self.count, -1))
        self.count += len(x)
        self.seconds["add"] += time.perf_counter() - started

    def finish(self) -> dict[str, Any]:
        """Write the index file(s); return the build parameters (kind, lists, nprobe, recall, seconds)."""
        self.out.close()
        params: dict[str, Any] = {"kind": self.plan.kind, "count": self.count, "code_size": self.plan.code_size}
        if self.plan.kind == "flat":
            return {**params, "file": "vectors.f32", "recall_at_10": 1.0}
        if self.index is None:
            raise RuntimeError("no vectors were added")
        self._fill()
        nprobe, recall = self._calibrate()
        started = time.perf_counter()
        self.faiss.write_index(self.index, os.path.join(self.folder, "index.faiss"))
        self.seconds["write"] = time.perf_counter() - started
        return {**params, "file": "index.faiss", "factory": self.plan.factory, "nlist": self.plan.nlist,
                "pq_m": self.plan.m or None, "train_size": min(self.seen, self.plan.train_size), "nprobe": nprobe,
                "recall_at_10": recall, "recall_queries": len(self.queries), "recall_target": self.recall_target,
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}

    def _fill(self) -> None:
        """Inverted lists sized exactly, then filled from the codes file in order."""
        started = time.perf_counter()
        ivf = self.faiss.extract_index_ivf(self.index)
        lists = np.concatenate(self.lists) if self.lists else np.empty(0, np.int32)
        self.lists = []
        counts = np.bincount(lists, minlength=ivf.nlist)
        invlists = ivf.invlists
        for list_no in np.nonzero(counts)[0]:
            invlists.resize(int(list_no), int(counts[list_no]))
        filled = np.zeros(ivf.nlist, np.int64)
        code_size = ivf.code_size
        step = max(1, CHUNK_BYTES // code_size)  # codes read back at a time
        sp = self.faiss.swig_ptr
        path = os.path.join(self.folder, ".codes.tmp")
        with open(path, "rb") as fh:
            for start in range(0, self.count, step):
                stop = min(start + step, self.count)
                codes = np.fromfile(fh, np.uint8, (stop - start) * code_size).reshape(stop - start, code_size)
                chunk = lists[start:stop]
                order = np.argsort(chunk, kind="stable")
                ids = (order + start).astype(np.int64)
                codes = np.ascontiguousarray(codes[order])
                bounds = np.searchsorted(chunk[order], np.arange(ivf.nlist + 1))
                for list_no in np.nonzero(np.diff(bounds))[0]:
                    a, b = bounds[list_no], bounds[list_no + 1]
                    invlists.update_entries(int(list_no), int(filled[list_no]), int(b - a), sp(ids[a:b]),
                                            sp(codes[a:b]))
                    filled[list_no] += b - a
        os.unlink(path)
        ivf.ntotal = self.index.ntotal = self.count
        ivf.make_direct_map(True)  # id -> (list, offset): ``reconstruct`` for search by an indexed URI
        self.seconds["fill"] = time.perf_counter() - started

    def _calibrate(self) -> tuple[int, float]:
        """The smallest nprobe whose recall@10 on the sampled queries reaches the target (or the best one):
        nprobe grows by half until the target is met or recall stops growing, then is narrowed by bisection."""
        started = time.perf_counter()
        ivf = self.faiss.extract_index_ivf(self.index)
        if not len(self.queries):
            return ivf.nlist, 1.0
        self.truth.finalize()
        tried: dict[int, float] = {}

        def recall(nprobe: int) -> float:
            if nprobe not in tried:
                ivf.nprobe = nprobe
                _, found = self.index.search(self.queries, RECALL_K + 1)
                tried[nprobe] = recall_at(found, self.truth.I, self.query_ids, RECALL_K)
                log.info("nprobe %d: recall@%d %.4f", nprobe, RECALL_K, tried[nprobe])
            return tried[nprobe]

        low, high, previous = 0, 1, -1.0
        while recall(high) < self.recall_target and high < ivf.nlist:
            if high >= 64 and recall(high) - previous < 0.002:
                break  # more lists no longer help (a coarse quantiser: the codes limit recall)
            low, previous = high, recall(high)
            high = min(ivf.nlist, high * 2 if high < 4 else high + high // 2)
        if recall(high) >= self.recall_target:
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if recall(middle) >= self.recall_target else (middle, high)
            best = high
        else:
            best = max(tried, key=lambda n: (tried[n], -n))
        ivf.nprobe = best
        self.seconds["calibrate"] = time.perf_counter() - started
        return best, round(tried[best], 4)


def recall_at(found: np.ndarray, truth: np.ndarray, own: np.ndarray | None, k: int) -> float:
    """Mean share of each row's exact ``k`` nearest ids that ``found`` also has among its first ``k``.

    ``own``: each query's own id, left out of both lists (a query that is itself indexed finds itself)."""
    hits = 0.0
    for i in range(len(found)):
        skip = -1 if own is None else own[i]
        want = [t for t in truth[i] if t != skip and t >= 0][:k]
        got = [f for f in found[i] if f != skip and f >= 0][:k]
        hits += len(set(got).intersection(want)) / max(len(want), 1)
    return hits / max(len(found), 1)
