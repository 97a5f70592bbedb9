"""A search index loaded for search: nearest neighbours of query vectors, a URI's stored vector, the model.

``SearchIndex`` reads the folder ``workers.search.folder`` describes (local, or an ``s3://`` prefix), builds
small ones in memory from vectors (``SearchIndex.build``; ``batchinfer index`` streams large ones through
``workers.search.build``) and saves them whole. Scores: ``cosine`` is the cosine similarity (higher is
nearer), ``l2`` the Euclidean distance (lower is nearer). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.contract import ModelSpec
from workers.errors import ConfigError
from workers.search.build import IndexBuilder, faiss_module, no_lookup_table, normalized
from workers.search.folder import (
    IDS,
    INDEX_VERSION,
    INFO,
    join,
    local_path,
    make_info,
    publish,
    read_local,
    staging,
    write_info,
)
from workers.search.plan import METRICS, choose
from workers.storage import is_remote, storage_for


@dataclass(frozen=True)
class Hit:
    """One neighbour: its URI, score (cosine similarity, or L2 distance), id and kept columns."""

    uri: str
    score: float
    id: int
    extra: dict[str, Any] = field(default_factory=dict)


class SearchIndex:
    """A loaded index: ``search(queries, k)``, ``vector(uri)``, and what made it (``spec``, ``fingerprint``).

        index = SearchIndex.load("photos.index")
        hits = index.search(np.stack([index.vector("/data/photos/cat.jpg")]), k=10)[0]
        print([(h.uri, round(h.score, 3)) for h in hits])
    """

    def __init__(self, info: dict[str, Any], ids: pa.Table, vectors: np.ndarray | None = None,
                 index: Any = None) -> None:
        if (vectors is None) == (index is None):
            raise ValueError("an index has either its vectors (flat) or a FAISS index")
        self.info, self.ids = info, ids
        self.vectors, self.index = vectors, index
        self._uris = ids.column("uri")
        if index is not None:
            faiss_module().extract_index_ivf(index).nprobe = int(info["params"]["nprobe"])
            no_lookup_table(index)

    @property
    def kind(self) -> str:
        """``flat``, ``ivf-sq8`` or ``ivf-pq`` (see ``workers.search.plan``)."""
        return str(self.info["kind"])

    @property
    def metric(self) -> str:
        """``cosine`` (scores are similarities, higher is nearer) or ``l2`` (distances, lower is nearer)."""
        return str(self.info["metric"])

    @property
    def column(self) -> str:
        """The features output's column the vectors came from."""
        return str(self.info["column"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    @property
    def count(self) -> int:
        return int(self.info["count"])

    @property
    def fingerprint(self) -> str | None:
        """The job's ``weights_fingerprint``: a query embedded by another model file is refused."""
        return self.info.get("weights_fingerprint")

    @property
    def extra_columns(self) -> list[str]:
        return [n for n in self.ids.column_names if n != "uri"]

    @property
    def spec(self) -> ModelSpec:
        """The model spec of the job that made the vectors (the same model embeds queries); ``ConfigError``
        for an index built from bare vectors (``SearchIndex.build`` without one), which only URIs can query."""
        data = self.info.get("model_spec")
        if not data:
            raise ConfigError("this index records no model, so it cannot embed images; query it by indexed URIs")
        return ModelSpec.from_dict(data)

    @classmethod
    def build(cls, chunks: Iterable[np.ndarray], *, metric: str = "cosine", max_memory: int | None = None,
              uris: Sequence[str] | None = None, extra: pa.Table | None = None, kind: str | None = None,
              info: dict[str, Any] | None = None) -> SearchIndex:
        """An index of the vectors in ``chunks`` (arrays of rows; iterated twice for a compressed index, so a
        list, or an object whose ``__iter__`` starts again), in memory. ``uris``: one per vector (default
        the ids as text); ``extra``: kept columns, one row per vector; ``info``: more of ``index.json``
        (``column``, ``model_spec``, ``weights_fingerprint``)."""
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
        if iter(chunks) is chunks:
            raise TypeError("chunks must be iterable twice (a list, not a generator)")
        count, dim = 0, 0
        for chunk in chunks:
            count, dim = count + len(chunk), chunk.shape[1]
        plan = choose(count, dim, max_memory, kind)
        with tempfile.TemporaryDirectory(prefix="batchinfer-index-") as folder:
            with IndexBuilder(folder, plan, metric) as builder:
                if builder.needs_sample:
                    for chunk in chunks:
                        builder.sample(chunk)
                for chunk in chunks:
                    builder.add(chunk)
                params = builder.finish()
            table = pa.table({"uri": pa.array(list(uris) if uris is not None else [str(i) for i in range(count)],
                                              pa.string())})
            if extra is not None:
                for name in extra.column_names:
                    table = table.append_column(name, extra.column(name))
            pq.write_table(table, os.path.join(folder, IDS))
            write_info(folder, make_info(plan.kind, metric, dim, builder.count, params, **(info or {})))
            return cls.load(folder, mmap=False)

    @classmethod
    def load(cls, path: str, mmap: bool = True) -> SearchIndex:
        """Open an index folder (local or ``s3://``); a local flat index's vectors are memory-mapped
        unless ``mmap`` is False."""
        local = not is_remote(path)
        folder = local_path(path)
        read = (lambda name: read_local(os.path.join(folder, name))) if local else \
            (lambda name: storage_for(path).read(join(path, name)))
        try:
            info = json.loads(read(INFO))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path} is not a search index (no {INFO}); make one with `batchinfer index`") from exc
        if int(info.get("version", 0)) > INDEX_VERSION:
            raise ConfigError(f"{path} was made by a newer batchinfer (index version {info['version']})")
        ids = pq.read_table(os.path.join(folder, IDS)) if local else pq.read_table(pa.BufferReader(read(IDS)))
        params = info["params"]
        if info["kind"] == "flat":
            shape = (int(info["count"]), int(info["dim"]))
            name = os.path.join(folder, params["file"])
            if local and mmap and shape[0]:
                vectors: np.ndarray = np.memmap(name, np.float32, "r", shape=shape)
            elif local:
                vectors = np.fromfile(name, np.float32).reshape(shape)
            else:
                vectors = np.frombuffer(read(params["file"]), np.float32).reshape(shape)
            return cls(info, ids, vectors=vectors)
        faiss = faiss_module()
        if local:
            index = faiss.read_index(os.path.join(folder, params["file"]))
        else:
            index = faiss.deserialize_index(np.frombuffer(read(params["file"]), np.uint8))
        return cls(info, ids, index=index)

    def save(self, path: str) -> None:
        """Write the index to ``path`` (a folder, local or ``s3://``), atomically (see the module docstring)."""
        with staging(path) as folder:
            if self.vectors is not None:
                np.ascontiguousarray(self.vectors, np.float32).tofile(os.path.join(folder, "vectors.f32"))
            else:
                faiss_module().write_index(self.index, os.path.join(folder, "index.faiss"))
            pq.write_table(self.ids, os.path.join(folder, IDS))
            write_info(folder, self.info)
            publish(folder, path)

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The ``k`` nearest indexed vectors of each query row (n x dim), nearest first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries of dimension {queries.shape[1]} for an index of dimension {self.dim}")
        if k < 1:
            raise ValueError("k must be at least 1")
        if self.metric == "cosine":
            queries = normalized(queries)
        faiss = faiss_module()
        k = min(k, self.count)
        if not k:
            return [[] for _ in queries]
        if self.vectors is not None:
            metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
            scores, found = faiss.knn(queries, self.vectors, k, metric=metric)
        else:
            scores, found = self.index.search(queries, k)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0))
        wanted = np.unique(found[found >= 0])
        rows = dict(zip(wanted.tolist(), self.ids.take(pa.array(wanted)).to_pylist()))
        hits = []
        for row_scores, row_ids in zip(scores, found):
            out = []
            for score, i in zip(row_scores.tolist(), row_ids.tolist()):
                if i >= 0:
                    values = dict(rows[i])
                    out.append(Hit(values.pop("uri"), float(score), int(i), values))
            hits.append(out)
        return hits

    def check_model(self, predictor: Any) -> None:
        """``ConfigError`` unless ``predictor`` (a built ``Predictor``) is the model that made the vectors: it
        makes the index's feature column, with the weights whose fingerprint the index recorded."""
        if self.column not in predictor.feature_columns:
            raise ConfigError(f"the model makes no {self.column!r} features")
        if self.fingerprint and predictor.fingerprint != self.fingerprint:
            raise ConfigError(f"the model's weights are not those that made the index ({predictor.fingerprint} "
                              f"here, {self.fingerprint} in the index): its model or weights file changed")

    def id_of(self, uri: str) -> int | None:
        """The id of an indexed URI (exact text), or None."""
        found = pc.index(self._uris, pa.scalar(uri, pa.string())).as_py()
        return None if found is None or found < 0 else int(found)

    def vector(self, uri: str) -> np.ndarray | None:
        """The stored vector of an indexed URI (normalised for cosine; the decoded code for a compressed
        kind, which is an approximation), or None when ``uri`` is not indexed."""
        i = self.id_of(uri)
        if i is None:
            return None
        if self.vectors is not None:
            return np.array(self.vectors[i], np.float32)
        return np.asarray(self.index.reconstruct(i), np.float32)
