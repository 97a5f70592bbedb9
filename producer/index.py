"""``batchinfer index``: a features job's output becomes a search index, streamed within ``--max-memory``.

The output (one Parquet file, or a folder or ``s3://`` prefix of shard files) is read a chunk of rows at a
time, only the columns needed: the feature column, ``error``, ``uri`` and the output's own extra columns
(kept manifest columns, or any column a features output does not have by itself), which go into the index
beside each URI. Rows with an error are skipped and counted. The job metadata says which model made the
vectors; the index keeps it, so ``batchinfer search`` embeds queries with that same model. Files on S3 are
downloaded once to a local temporary folder (so a compressed index reads them twice from disk, not from
the network; ``$TMPDIR`` needs room for them). Nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from producer.incremental import previous_files
from workers.errors import ConfigError, SourceError
from workers.schema import feature_column_names, output_schema, read_job_metadata
from workers.search.plan import DEFAULT_BUDGET, choose, chunk_rows, format_size
from workers.storage import is_remote, storage_for

SAME_MODEL = ("model", "model_path", "weights", "weights_fingerprint", "task", "layers", "pooling", "input_size",
              "preprocess", "precision")


@dataclass
class Features:
    """A features output, checked: its local files, feature column and dimension, extra columns, metadata."""

    path: str
    files: list[str]
    column: str
    dim: int
    extra: list[pa.Field]
    metadata: dict[str, Any]
    row_count: int  # in the files' footers, error rows included
    skipped: int = 0

    def vectors(self) -> Iterator[np.ndarray]:
        """Chunks of the vectors of the rows without an error, in file and row order."""
        for vectors, _ in self._chunks([]):
            yield vectors

    def rows(self) -> Iterator[tuple[np.ndarray, pa.Table]]:
        """The same chunks with their rows' ``uri`` and extra columns; counts the rows skipped."""
        self.skipped = 0
        yield from self._chunks(["uri"] + [f.name for f in self.extra])

    def _chunks(self, id_columns: list[str]) -> Iterator[tuple[np.ndarray, pa.Table]]:
        columns = [self.column, "error", *id_columns]
        for name in self.files:
            source = pq.ParquetFile(name, pre_buffer=False)  # pre-buffered ranges stay cached to the file's end
            check_same_job(self, source.schema_arrow, name)
            for batch in source.iter_batches(batch_size=chunk_rows(self.dim), columns=columns, use_threads=False):
                ok = pc.and_(batch.column("error").is_null(), batch.column(self.column).is_valid())
                kept = batch.filter(ok)
                self.skipped += batch.num_rows - kept.num_rows
                if kept.num_rows:
                    flat = kept.column(self.column).flatten().to_numpy(zero_copy_only=False)
                    yield flat.reshape(-1, self.dim).astype(np.float32, copy=False), \
                        pa.Table.from_batches([kept.select(id_columns)])


def check_same_job(features: Features, schema: pa.Schema, name: str) -> None:
    field_ = schema.field(features.column) if features.column in schema.names else None
    if field_ is None or not pa.types.is_fixed_size_list(field_.type) or field_.type.list_size != features.dim:
        raise ConfigError(f"{name} has no {features.column} column of dimension {features.dim} like the first file "
                          "of the output")
    meta = read_job_metadata(schema)
    differ = [k for k in SAME_MODEL if meta.get(k) != features.metadata.get(k)]
    if differ:
        raise ConfigError(f"{name} was made with other model options ({', '.join(differ)}) than the first file "
                          "of the output; index one job's output at a time")


def open_features(path: str, column: str | None, workdir: str) -> Features:
    """Check that ``path`` is a features job's output with ``column`` (a multi-layer job must name one);
    S3 files are downloaded into ``workdir``."""
    uris = previous_files(path, "features")
    files = [_local_copy(u, workdir, i) for i, u in enumerate(uris)]
    try:
        schema = pq.read_schema(files[0])
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read Parquet: {exc}") from exc
    meta = read_job_metadata(schema)
    columns = feature_column_names(schema)
    if not meta or "features" not in str(meta.get("task", "")).split(",") or not columns or "uri" not in schema.names:
        raise ConfigError(f"{path} is not the output of a features job (batchinfer run/submit --task features): "
                          "it needs feature columns and the job metadata")
    if column is None:
        if len(columns) > 1:
            raise ConfigError(f"{path} has several feature columns; choose one with --column: {', '.join(columns)}")
        column = columns[0]
    elif column not in columns and f"features_{column}" in columns:
        column = f"features_{column}"  # the layer's name
    if column not in columns:
        raise ConfigError(f"--column {column}: no such feature column in {path}; its feature columns: "
                          f"{', '.join(columns)}")
    task = ",".join(t for t in ("classify", "features") if t in meta["task"].split(","))
    standard = set(output_schema(task, feature_columns={c: schema.field(c).type.list_size for c in columns}).names)
    extra = [f for f in schema if f.name not in standard]
    features = Features(path, files, column, schema.field(column).type.list_size, extra, meta, rows)
    check_same_job(features, schema, files[0])
    return features


def _local_copy(uri: str, workdir: str, number: int) -> str:
    if not is_remote(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    local = os.path.join(workdir, f"{number:06d}.parquet")
    with storage_for(uri).open_read(uri) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    return local


def build_index(features_path: str, output: str, *, column: str | None = None, metric: str = "cosine",
                max_memory: int | None = None, kind: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Build and publish the index of a features output; return its ``index.json`` content plus
    ``peak_rss_bytes`` and ``seconds``."""
    from workers.search.build import IndexBuilder
    from workers.search.folder import IDS, check_output, make_info, publish, spec_from_metadata, staging, write_info

    started = time.perf_counter()
    check_output(output)
    with tempfile.TemporaryDirectory(prefix="batchinfer-features-") as workdir, staging(output) as folder:
        features = open_features(features_path, column, workdir)
        plan = choose(features.row_count, features.dim, max_memory, kind)
        ids_schema = pa.schema([pa.field("uri", pa.string()), *features.extra])
        with IndexBuilder(folder, plan, metric) as builder, \
                pq.ParquetWriter(os.path.join(folder, IDS), ids_schema, compression="zstd") as ids:
            if builder.needs_sample:
                for vectors in _bar(features.vectors(), features, progress, "sample"):
                    builder.sample(vectors)
            for vectors, table in _bar(features.rows(), features, progress, "index"):
                builder.add(vectors)
                ids.write_table(table.cast(ids_schema))
            if not builder.count:
                raise SourceError(f"{features_path}: nothing to index, every row has an error ({features.skipped})")
            params = builder.finish()
        meta = {k: v for k, v in features.metadata.items() if k != "shard_id"}
        info = make_info(plan.kind, metric, features.dim, builder.count, params, column=features.column,
                         model_spec=spec_from_metadata(meta), weights_fingerprint=meta.get("weights_fingerprint"),
                         skipped_errors=features.skipped, source=features_path, files=len(features.files),
                         job_metadata=meta, memory={"budget": max_memory, "index_bytes": plan.index_bytes,
                                                    "build_bytes": plan.build_bytes})
        write_info(folder, info)
        publish(folder, output)
    return {**info, "peak_rss_bytes": peak_memory(), "seconds": time.perf_counter() - started}


def peak_memory() -> int:
    """This process's peak resident memory: ``VmHWM`` on Linux (``ru_maxrss`` also counts what the parent
    process held when it started this one), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _bar(chunks: Iterator[Any], features: Features, progress: bool, desc: str) -> Iterator[Any]:
    """``chunks`` (vectors, or vectors and ids) with a progress bar of the rows read, on stderr."""
    with tqdm(total=features.row_count, desc=desc, unit="row", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(len(chunk[0] if isinstance(chunk, tuple) else chunk))


def summary(info: dict[str, Any], output: str) -> str:
    """The paragraph ``batchinfer index`` prints."""
    params, memory = info["params"], info["memory"]
    what = "exact search" if info["kind"] == "flat" else (
        f"{params['nlist']} lists, nprobe {params['nprobe']}, recall@10 {params['recall_at_10']:.3f} against exact "
        f"search on {params['recall_queries']} sampled vectors")
    budget = format_size(memory["budget"]) if memory["budget"] else "default " + format_size(DEFAULT_BUDGET)
    text = (f"indexed {info['count']} vectors of {info['column']} (dimension {info['dim']}, {info['metric']}) from "
            f"{info['files']} file(s); skipped {info['skipped_errors']} error rows; {info['kind']} index ({what}); "
            f"{format_size(memory['index_bytes'])} to search, budget {budget}, peak memory of this process "
            f"{format_size(info['peak_rss_bytes'])}; built in {info['seconds']:.1f}s -> {output}")
    if params.get("recall_at_10", 1.0) < params.get("recall_target", 0.0):
        text += (f". Warning: recall@10 is below {params['recall_target']}: a larger --max-memory allows a more "
                 "exact index")
    return text
