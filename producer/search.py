"""``batchinfer search``: the nearest indexed images of query images, or of images already in the index.

A query that is an indexed URI (exactly as the index has it, or a local path that is one) uses its stored
vector: no model, no TensorFlow. Any other query is read (a local path, ``s3://`` or http(s)), then decoded
and embedded by the index's own model (the job's model spec, features only), built once for all of them;
a model whose weights' fingerprint differs from the index's is refused, as a query embedded by another model
is meaningless. A query that cannot be read or decoded is a one-line error and nothing is printed (exit 1).
The neighbours go to stdout as a table, or with ``--output`` into Parquet, CSV or JSON Lines rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from workers.errors import ConfigError, SourceError
from workers.search.index import Hit, SearchIndex
from workers.storage import storage_for

EMBED_BATCH = 16  # images per model call for queries


@dataclass
class Query:
    """One query as typed, how its vector was found (``indexed`` or ``embedded``) and its neighbours."""

    text: str
    source: str
    vector: np.ndarray
    hits: list[Hit]


def indexed_vector(index: SearchIndex, query: str) -> np.ndarray | None:
    """The stored vector of a query that is an indexed URI: as given, or a local path's absolute form."""
    vector = index.vector(query)
    if vector is None and "://" not in query:
        vector = index.vector(os.path.abspath(query))
    return vector


def _read(uri: str) -> bytes:
    try:
        return storage_for(uri).read(uri)
    except FileNotFoundError as exc:
        raise SourceError(f"query {uri}: no such file") from exc
    except OSError as exc:
        raise SourceError(f"query {uri}: cannot read it ({exc.strerror or exc})") from exc


def embed(index: SearchIndex, uris: Sequence[str]) -> np.ndarray:
    """The vectors of images that are not in the index, by the index's model (see the module docstring)."""
    spec = index.spec
    data = [_read(u) for u in uris]  # an unreadable query fails before the model is built
    from workers import decode as decoders
    from workers.feed import from_bytes
    from workers.infer import predict_loaded, schema_for
    from workers.models.loader import build_predictor

    spec = dataclasses.replace(spec, task="features", batch_size=min(EMBED_BATCH, len(uris)))
    predictor = build_predictor(spec)
    index.check_model(predictor)
    decode = decoders.DECODERS.get(spec.decode, decoders.DECODERS["fast"])  # gpu: its per-image fallback
    loaded = [from_bytes(u, d, decode, predictor.input_hw) for u, d in zip(uris, data)]
    for item in loaded:
        if item.error:
            raise SourceError(f"query {item.uri}: {item.error}")
    rows = predict_loaded(predictor, schema_for(spec, predictor), loaded)
    column = rows.column(rows.schema.get_field_index(index.column))
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(uris), index.dim).astype(np.float32)


def search(index: SearchIndex, queries: Sequence[str], k: int = 10, embed_all: bool = False) -> list[Query]:
    """Each query's ``k`` nearest neighbours, in the order given."""
    vectors: dict[int, np.ndarray] = {}
    sources: dict[int, str] = {}
    todo: list[int] = []
    for i, query in enumerate(queries):
        vector = None if embed_all else indexed_vector(index, query)
        if vector is None:
            todo.append(i)
        else:
            vectors[i], sources[i] = vector, "indexed"
    if todo:
        for i, vector in zip(todo, embed(index, [queries[i] for i in todo])):
            vectors[i], sources[i] = vector, "embedded"
    matrix = np.stack([vectors[i] for i in range(len(queries))])
    hits = index.search(matrix, k)
    return [Query(q, sources[i], vectors[i], hits[i]) for i, q in enumerate(queries)]


def score_name(metric: str) -> str:
    return "similarity" if metric == "cosine" else "distance"


def results_table(results: list[Query], index: SearchIndex) -> pa.Table:
    """One row per neighbour: query, rank, uri, score and the index's kept columns."""
    rows: list[dict[str, Any]] = []
    for result in results:
        rows += [{"query": result.text, "rank": r + 1, "uri": h.uri, "score": h.score, **h.extra}
                 for r, h in enumerate(result.hits)]
    extra = [index.ids.schema.field(name) for name in index.extra_columns]
    schema = pa.schema([pa.field("query", pa.string()), pa.field("rank", pa.int32()), pa.field("uri", pa.string()),
                        pa.field("score", pa.float32()), *extra])
    return pa.Table.from_pylist(rows, schema=schema)


def text(results: list[Query], metric: str) -> str:
    """The neighbours as a readable table: query, rank, score, uri."""
    header = ("query", "rank", score_name(metric), "uri")
    lines = [(r.text, str(rank + 1), f"{h.score:.4f}", h.uri) for r in results for rank, h in enumerate(r.hits)]
    widths = [max(len(row[c]) for row in [header, *lines]) for c in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in [header, *lines])


def run(index_path: str, queries: Sequence[str], k: int, output: str | None, fmt: str | None,
        embed_all: bool = False) -> str:
    """``batchinfer search``: print the table or write ``output``; return the line for stderr."""
    from producer.collect import format_for, write_tables
    from workers.storage import check_writable

    if k < 1:
        raise ConfigError("--k must be at least 1")
    file_format = None
    if output:
        file_format = format_for(output, fmt)
        check_writable(output)
    elif fmt:
        raise ConfigError("--format applies to --output")
    index = SearchIndex.load(index_path)
    results = search(index, queries, k, embed_all)
    if output and file_format:
        meta = {"index": index_path, "metric": index.metric, "score": score_name(index.metric)}
        write_tables([results_table(results, index)], output, file_format, meta)
    else:
        print(text(results, index.metric))
    embedded = sum(r.source == "embedded" for r in results)
    where = f"written to {output}; " if output else ""
    order = "higher is nearer" if index.metric == "cosine" else "lower is nearer"
    return (f"{len(results)} queries ({len(results) - embedded} by their indexed vector, {embedded} embedded); "
            f"{where}scores are {'cosine similarities' if index.metric == 'cosine' else 'L2 distances'} ({order})")
