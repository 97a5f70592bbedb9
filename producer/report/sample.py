"""What a report shows of the rows, gathered a chunk at a time in bounded memory, whatever the row count.

Counters for every row (rows, errors by reason, classes, bytes read); seeded bottom-k samples (each row
gets a random key, the k smallest keys are kept: a uniform sample without replacement, the same for the
same input) of each class's rows and of the feature vectors for the projection; the least confident rows
in a bounded heap; scores in a fixed-bin histogram; error rows listed up to ``Limits.errors_listed``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Limits:
    """How much a report shows: ``per_class`` thumbnails for each of the ``classes`` largest classes, the
    ``least`` least confident rows, ``points`` vectors in the projection, ``errors_listed`` error rows."""

    per_class: int = 8
    classes: int = 16
    least: int = 24
    points: int = 2000
    errors_listed: int = 10_000
    bins: int = 40


@dataclass
class Row:
    """One sampled row: its URI and what the page says about it."""

    uri: str
    label: str | None = None
    score: float | None = None
    runner_up: str | None = None
    runner_up_score: float | None = None


@dataclass
class Summary:
    rows: int = 0
    errors: int = 0
    bytes_read: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    error_rows: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # reason -> (uri, error), listed
    listed: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    score_sums: dict[str, float] = field(default_factory=dict)
    class_samples: dict[str, list[Row]] = field(default_factory=dict)
    least: list[Row] = field(default_factory=list)
    histogram: np.ndarray | None = None
    feature_column: str | None = None
    vectors: np.ndarray | None = None  # the projection's sample
    vector_rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return self.rows - self.errors


# what differs from one image to the next in the same failure: URIs, paths, quoted names
_PATHISH = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"]+?(?=[:,;.)]*(?:\s|$))"
                      r"|(?<![\w.])(?:[A-Za-z]:)?[\\/][^\s'\"():,;]+"
                      r"|'[^']*'"
                      r'|"[^"]*"')
_EXCEPTION = re.compile(r"[A-Z]\w*(?:Error|Exception|Warning)")


def reason_of(error: str) -> str:
    """The group an error message belongs to: URIs, paths and quoted names masked, up to the first ``": "``
    (``truncated image: ...`` and ``decompression bomb: ...`` group whatever their details), or the second
    when the first is followed by an exception's name (``cannot decode image: OSError``)."""
    masked = _PATHISH.sub("…", error)
    parts = masked.split(": ")
    head = parts[0].strip()
    if len(parts) > 2 and _EXCEPTION.fullmatch(parts[1].strip()):
        head = f"{head}: {parts[1].strip()}"
    text = head if len(head) >= 4 else masked.strip()
    return " ".join(text.split())[:160] or "(empty message)"


CLASSIFY_COLUMNS = ("uri", "label", "score", "top_k_labels", "top_k_scores")


def columns_of(schema_names: list[str]) -> list[str]:
    """The columns a report reads: never ``top_k_indices``, ``width`` or ``modified``; one feature column."""
    wanted = [c for c in ("uri", "error", "label", "score", "top_k_labels", "top_k_scores", "size_bytes")
              if c in schema_names]
    column = feature_column(schema_names)
    return wanted + ([column] if column else [])


def feature_column(names: list[str]) -> str | None:
    """``features``, else the first ``features_<layer>`` column (a several-layer job)."""
    if "features" in names:
        return "features"
    return next((n for n in names if n.startswith("features_")), None)


class Sampler:
    """Feed it tables with ``add``; ``summary`` holds the result. Deterministic for a given ``seed``."""

    def __init__(self, limits: Limits = Limits(), seed: int = 0) -> None:
        self.limits = limits
        self.summary = Summary(histogram=np.zeros(limits.bins, dtype=np.int64))
        self._class_rng = np.random.default_rng([seed, 1])
        self._point_rng = np.random.default_rng([seed, 2])
        self._class_keys: dict[str, list[tuple[float, Row]]] = {}
        self._least: list[tuple[float, int, Row]] = []
        self._point_keys = np.empty(0)
        self._points: list[np.ndarray] = []

    def add(self, table: pa.Table) -> None:
        """Count and sample one chunk of rows. Only the few rows sampled are copied: a features column
        (megabytes a chunk) is never filtered whole."""
        s = self.summary
        n = table.num_rows
        if not n:
            return
        start = s.rows
        s.rows += n
        names = table.column_names
        failed = _mask(table.column("error").is_valid()) if "error" in names else np.zeros(n, dtype=bool)
        if failed.any():
            self._errors(table.select(["uri", "error"]).filter(pa.array(failed)))
        if "size_bytes" in names:
            s.bytes_read += int(pc.sum(table.column("size_bytes")).as_py() or 0)
        if "label" in names and "score" in names:
            labelled = ~failed & _mask(table.column("label").is_valid())
            columns = [c for c in CLASSIFY_COLUMNS if c in names]
            self._classify(table.select(columns).filter(pa.array(labelled)), start)
        column = feature_column(names)
        if column is not None:
            s.feature_column = column
            valid = ~failed & _mask(table.column(column).is_valid())
            self._features(table.select([c for c in ("uri", "label", column) if c in names]), column,
                           np.flatnonzero(valid))

    # -- errors ---------------------------------------------------------------------------------------
    def _errors(self, rows: pa.Table) -> None:
        s = self.summary
        s.errors += rows.num_rows
        if not rows.num_rows:
            return
        for uri, error in zip(rows.column("uri").to_pylist(), rows.column("error").to_pylist()):
            reason = reason_of(error)
            s.reasons[reason] += 1
            if s.listed < self.limits.errors_listed:
                s.error_rows.setdefault(reason, []).append((uri, error))
                s.listed += 1

    # -- classify -------------------------------------------------------------------------------------
    def _classify(self, rows: pa.Table, start: int) -> None:
        n = rows.num_rows
        if not n:
            return
        s, limits = self.summary, self.limits
        encoded = pc.dictionary_encode(rows.column("label")).combine_chunks()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        names = encoded.dictionary.to_pylist()
        scores = rows.column("score").to_numpy().astype(np.float64)
        scores = np.nan_to_num(scores, nan=0.0)
        for name, count, total in zip(names, np.bincount(codes, minlength=len(names)),
                                      np.bincount(codes, weights=scores, minlength=len(names))):
            s.classes[name] += int(count)
            s.score_sums[name] = s.score_sums.get(name, 0.0) + float(total)
        s.histogram += np.histogram(np.clip(scores, 0.0, 1.0), bins=limits.bins, range=(0.0, 1.0))[0]

        keys = self._class_rng.random(n)  # bottom-k per class: the per_class smallest keys of each label
        order = np.lexsort((keys, codes))
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        picked = order[rank < limits.per_class]
        for i, row in zip(picked.tolist(), self._rows(rows, picked)):
            bucket = self._class_keys.setdefault(names[codes[i]], [])
            bucket.append((float(keys[i]), row))
            if len(bucket) > 2 * limits.per_class:
                bucket.sort(key=lambda kr: kr[0])
                del bucket[limits.per_class:]

        k = min(limits.least, n)  # the least confident: the smallest scores, ties in row order
        low = np.argpartition(scores, k - 1)[:k] if k < n else np.arange(n)
        for i, row in zip(low.tolist(), self._rows(rows, low)):
            self._least.append((float(scores[i]), start + i, row))
        self._least.sort(key=lambda item: (item[0], item[1]))
        del self._least[limits.least:]

    def _rows(self, rows: pa.Table, index: np.ndarray) -> list[Row]:
        """``Row``s of the rows at ``index`` (Python objects for these few rows only)."""
        taken = rows.take(pa.array(index, pa.int64()))
        labels = _lists(taken, "top_k_labels")
        scores = _lists(taken, "top_k_scores")
        out = []
        for j, (uri, label, score) in enumerate(zip(taken.column("uri").to_pylist(),
                                                    taken.column("label").to_pylist(),
                                                    taken.column("score").to_pylist())):
            second = labels[j][1] if labels[j] and len(labels[j]) > 1 else None
            second_score = scores[j][1] if scores[j] and len(scores[j]) > 1 else None
            out.append(Row(uri, label, score, second, second_score))
        return out

    # -- features -------------------------------------------------------------------------------------
    def _features(self, rows: pa.Table, column: str, valid: np.ndarray) -> None:
        """Bottom-k of the rows at ``valid``: only rows whose key beats the current k-th are taken."""
        if not len(valid):
            return
        limit = self.limits.points
        keys = self._point_rng.random(len(valid))
        threshold = np.sort(self._point_keys)[limit - 1] if len(self._point_keys) >= limit else 1.0
        chosen = np.flatnonzero(keys < threshold)
        if not len(chosen):
            return
        taken = rows.take(pa.array(valid[chosen], pa.int64()))
        vectors = _vectors(taken.column(column))
        if vectors is None or (self._points and vectors.shape[1] != self._points[0].shape[1]):
            return  # vectors of mixed lengths (a hand-edited text output): not this projection's
        has_label = "label" in taken.column_names
        labels = taken.column("label").to_pylist() if has_label else [None] * len(chosen)
        new_rows = [Row(uri, label) for uri, label in zip(taken.column("uri").to_pylist(), labels)]
        all_keys = np.concatenate([self._point_keys, keys[chosen]])
        all_rows = self.summary.vector_rows + new_rows
        stacked = np.concatenate(self._points + [vectors]) if self._points else vectors
        keep = np.argsort(all_keys, kind="stable")[:limit]
        self._point_keys = all_keys[keep]
        self._points = [stacked[keep]]
        self.summary.vector_rows = [all_rows[i] for i in keep.tolist()]

    def finish(self) -> Summary:
        """The summary, with the samples in their final order (largest classes first, keys ascending)."""
        s = self.summary
        for name, bucket in self._class_keys.items():
            bucket.sort(key=lambda kr: kr[0])
            s.class_samples[name] = [row for _, row in bucket[: self.limits.per_class]]
        s.least = [row for _, _, row in self._least]
        if self._points:
            s.vectors = self._points[0]
        return s


def _mask(values: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(values.to_numpy(), dtype=bool)


def _lists(table: pa.Table, name: str) -> list[Any]:
    """A top-k column as Python lists (JSON text in CSV output)."""
    if name not in table.column_names:
        return [None] * table.num_rows
    values = table.column(name).to_pylist()
    return [json.loads(v) if isinstance(v, str) else v for v in values]


def _vectors(column: pa.ChunkedArray) -> np.ndarray | None:
    """The rows' vectors as one float32 matrix: fixed-size lists straight from Arrow, other lists (JSON
    Lines) and JSON text (CSV) through Python."""
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
        return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    values = [json.loads(v) if isinstance(v, str) else v for v in arr.to_pylist()]
    if not values or len({len(v) for v in values}) != 1:
        return None
    return np.asarray(values, dtype=np.float32)
