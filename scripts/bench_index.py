"""Search index benchmark: recall@10 of the compressed index against exact search, build time and memory.

    .venv/bin/python scripts/bench_index.py                                   # 1,000,000 x 1280, --max-memory 2G
    .venv/bin/python scripts/bench_index.py --count 100000 --kind flat,ivf-sq8,ivf-pq

Synthetic vectors that look like pooled CNN features (a post-ReLU, average-pooled layer such as
MobileNetV2's 1280 channels), not isotropic noise, which no approximate index can search well and no
photo collection resembles:

* clustered: 1,000 clusters of Zipf-like sizes (the largest about 150 times the smallest), each a Gaussian
  around a centre in a 32-dimensional latent space (low intrinsic dimension), with a spread of 0.5 to 1.2
  times the centres' own, so neighbouring clusters overlap as classes of photos do;
* the latent vector goes through a fixed random 32 -> 1280 linear map with per-channel biases, a ReLU and
  per-channel gains (log-normal), plus 1280-dimensional noise at 10 % of the signal before the ReLU:
  non-negative, about a third of the channels exactly zero, a few channels carrying most of the energy.

The script prints these properties (zeros, the principal components that hold 90 % of the variance, the
share of each vector's energy in its largest channels) so the table can say what was generated.

Vectors are made chunk by chunk from (seed, chunk number), so each pass makes the same data without keeping
it. With ``--via-cli`` (the default) the vectors are written as a features job's Parquet output (uri,
error, features; job metadata as ``batchinfer run --task features`` writes it) and ``batchinfer index
--max-memory`` runs in a subprocess: its wall time and peak RSS (the whole process) are the ones reported.
Recall is then measured on 1,000 new vectors of the same distribution: the index's top 10 against the
exact top 10 (brute force over every chunk). Results are one JSON line per index and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 10_000
LATENT, CLUSTERS = 32, 1000
GENERATOR = 2  # in the cached files' names: a change to ``Synthetic`` makes new ones


class Synthetic:
    """Pooled-CNN-like vectors, re-made identically on every pass (see the module docstring)."""

    def __init__(self, count: int, dim: int = 1280, seed: int = 0, chunk: int = CHUNK) -> None:
        self.count, self.dim, self.seed, self.chunk = count, dim, seed, chunk
        rng = np.random.default_rng([seed, 0])
        self.centres = rng.normal(0, 1, (CLUSTERS, LATENT)).astype(np.float32)
        self.spread = rng.uniform(0.5, 1.2, CLUSTERS).astype(np.float32)
        weights = 1.0 / (np.arange(CLUSTERS) + 5.0) ** 0.8
        self.weights = rng.permutation(weights / weights.sum())
        self.mix = (rng.normal(0, 1, (LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.bias = rng.normal(0.5, 0.3, dim).astype(np.float32)
        self.gain = rng.lognormal(0, 0.6, dim).astype(np.float32)

    def rows(self, number: int, n: int) -> np.ndarray:
        """``n`` vectors of chunk ``number`` (chunks of one stream never repeat)."""
        rng = np.random.default_rng([self.seed, 1, number])
        cluster = rng.choice(CLUSTERS, size=n, p=self.weights)
        z = self.centres[cluster] + rng.normal(0, 1, (n, LATENT)).astype(np.float32) * self.spread[cluster, None]
        h = z @ self.mix + self.bias + 0.1 * rng.normal(0, 1, (n, self.dim)).astype(np.float32)
        return (np.maximum(h, 0) * self.gain).astype(np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        for number, start in enumerate(range(0, self.count, self.chunk)):
            yield self.rows(number, min(self.chunk, self.count - start))

    def queries(self, n: int) -> np.ndarray:
        """New vectors of the same distribution (a chunk number no pass uses)."""
        return self.rows(10**9, n)


def describe(data: Synthetic, n: int = 20_000) -> dict[str, float]:
    x = data.rows(0, n)
    centred = x - x.mean(0)
    var = np.linalg.svd(centred[:5000], compute_uv=False) ** 2
    share = np.cumsum(var) / var.sum()
    energy = np.sort(x**2, axis=1)[:, ::-1]
    return {"zeros": float((x == 0).mean()), "components_90pct": int(np.searchsorted(share, 0.9) + 1),
            "top_64_channels_energy": float((energy[:, :64].sum(1) / energy.sum(1)).mean())}


def exact(data: Synthetic, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """The exact top ``k`` ids of each query, by brute force over every chunk."""
    import faiss

    from workers.search.build import normalized

    cosine = metric == "cosine"
    q = normalized(queries) if cosine else queries
    heap = faiss.ResultHeap(len(q), k, keep_max=cosine)
    start = 0
    for chunk in data:
        x = normalized(chunk) if cosine else chunk
        d, i = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2)
        heap.add_result(d, i + start)
        start += len(chunk)
    heap.finalize()
    return heap.I


def write_features(data: Synthetic, path: Path) -> None:
    """The vectors as a features job's output (what ``batchinfer run --task features`` or ``collect`` writes:
    a row group per shard of 256 images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.schema import output_schema, with_job_metadata

    meta = {"job_id": "bench", "model": "MobileNetV2", "model_path": None, "weights": "imagenet",
            "weights_fingerprint": "synthetic", "task": "features", "layers": [], "pooling": "avg",
            "input_size": [224, 224], "decode": "fast", "precision": "float32", "preprocess": "tf",
            "top_k": None, "feature_columns": {"features": data.dim}, "feature_shapes": {"features": [data.dim]}}
    schema = with_job_metadata(output_schema("features", feature_dim=data.dim), meta)
    start = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for chunk in data:
            n = len(chunk)
            columns = {"uri": pa.array([f"s3://photos/{i:08d}.jpg" for i in range(start, start + n)]),
                       "features": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), data.dim)}
            arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in schema]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=256)  # a shard each
            start += n


def run_cli(features: Path, out: Path, args: argparse.Namespace, kind: str | None) -> dict[str, float]:
    """``batchinfer index`` in a subprocess: its wall seconds and peak RSS (its ``VmHWM``, read until it exits;
    ``ru_maxrss`` would count this process's memory too, which the child starts with)."""
    cmd = [sys.executable, "-m", "producer.cli", "index", str(features), "--output", str(out), "-q",
           "--metric", args.metric, "--max-memory", args.max_memory, *(["--kind", kind] if kind else [])]
    peak = 0
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=err, cwd=ROOT)
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):
                pass
            time.sleep(0.02)
        seconds = time.perf_counter() - started
        err.seek(0)
        text = err.read().decode(errors="replace").strip()
    if proc.returncode:
        raise SystemExit(text)
    print(text, file=sys.stderr)
    return {"build_seconds": round(seconds, 1), "peak_rss_bytes": peak}


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def alternative(spec: str, data: Synthetic, queries: np.ndarray, truth: np.ndarray, metric: str) -> dict:
    """A FAISS index the command does not offer, for comparison: ``"FACTORY [PARAMS]"`` (``"IVF256,SQ4
    nprobe=256"``, ``"HNSW32,SQ8 efSearch=128"``), built in this process as the command would: trained on
    the first 65,536 vectors (the chunks are independent draws), then added a chunk at a time. Memory is
    this process's resident memory above what it held before, sampled every 20 ms."""
    import threading

    import faiss

    from workers.search.build import normalized, recall_at

    factory, _, params = spec.partition(" ")
    cosine = metric == "cosine"
    prepare = normalized if cosine else np.ascontiguousarray
    index = faiss.index_factory(data.dim, factory, faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2)
    before, peak, done = _rss(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    started = time.perf_counter()
    sample = []
    for chunk in data:
        sample.append(prepare(chunk))
        if sum(map(len, sample)) >= 65_536:
            break
    index.train(np.concatenate(sample))
    del sample
    for chunk in data:
        index.add(prepare(chunk))
    build = time.perf_counter() - started
    done.set()
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]  # SWIG overloads
    q = prepare(queries)
    started = time.perf_counter()
    _, found = index.search(q, 10)
    batch_ms = (time.perf_counter() - started) * 1000 / len(q)
    recall = round(recall_at(found, truth, None, 10), 4)
    return {"count": data.count, "dim": data.dim, "faiss": spec, "recall_at_10": recall,
            "build_seconds": round(build, 1), "peak_rss_added_bytes": peak[0] - before,
            "index_bytes": len(faiss.serialize_index(index)), "query_ms_batch": round(batch_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--max-memory", default="2G")
    parser.add_argument("--metric", default="cosine", choices=("cosine", "l2"))
    parser.add_argument("--kind", default="", help="comma-separated kinds to force (default: the one chosen)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--folder", help="where the features file and indexes go (default: a temporary folder)")
    parser.add_argument("--faiss", action="append", default=[], metavar="'FACTORY [PARAMS]'",
                        help="also an index the command does not offer, built in this process (all vectors in "
                        "memory), e.g. 'IVF256,SQ4 nprobe=256' or 'HNSW32,SQ8 efSearch=128'; repeatable")
    args = parser.parse_args()

    from workers.search.build import recall_at
    from workers.search.index import SearchIndex

    data = Synthetic(args.count, args.dim)
    print(json.dumps({"generated": describe(data)}), file=sys.stderr)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-index-"))
    folder.mkdir(parents=True, exist_ok=True)
    features = folder / f"features-{args.count}x{args.dim}-g{GENERATOR}.parquet"
    if not features.exists():
        started = time.perf_counter()
        write_features(data, features)
        print(f"wrote {features} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    queries = data.queries(args.queries)
    cached = folder / f"exact-{args.count}x{args.dim}-g{GENERATOR}-{args.metric}-{args.queries}.npz"
    if not cached.exists():  # the exact neighbours, kept for the next run on the same folder
        started = time.perf_counter()
        truth = exact(data, queries, 10, args.metric)
        np.savez(cached, truth=truth, seconds=time.perf_counter() - started)
    saved = np.load(cached)
    truth, exact_seconds = saved["truth"], float(saved["seconds"])
    rows = []
    for spec in args.faiss:
        print(json.dumps(alternative(spec, data, queries, truth, args.metric)), flush=True)
    kinds: list[str | None] = list(args.kind.split(",")) if args.kind else [] if args.faiss else [None]
    for kind in kinds:  # None: the kind the command chooses
        out = folder / f"index-{kind or 'auto'}-{args.max_memory}"
        measured = run_cli(features, out, args, kind)
        index = SearchIndex.load(str(out))
        index.search(queries[:10], 10)  # warm: the first search pages the index in
        started = time.perf_counter()
        hits = index.search(queries, 10)
        batch_ms = (time.perf_counter() - started) * 1000 / len(queries)
        started = time.perf_counter()
        for q in queries[:50]:
            index.search(q[None], 10)
        single_ms = (time.perf_counter() - started) * 1000 / 50
        found = np.array([[h.id for h in row] + [-1] * (10 - len(row)) for row in hits])
        size = sum(f.stat().st_size for f in out.iterdir())
        row = {"count": args.count, "dim": args.dim, "max_memory": args.max_memory, "kind": index.kind,
               "params": {k: index.info["params"].get(k) for k in ("nlist", "pq_m", "nprobe", "recall_at_10")},
               "recall_at_10": round(recall_at(found, truth, None, 10), 4), **measured,
               "index_bytes_on_disk": size, "query_ms_batch": round(batch_ms, 2),
               "query_ms_single": round(single_ms, 2), "exact_ms_batch": round(exact_seconds * 1000 / len(queries), 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| kind | nlist | nprobe | recall@10 | build (s) | peak RSS | on disk | query, batch of 1000 | one query |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["params"]
        print(f"| {r['kind']}{p['pq_m'] or ''} | {p['nlist'] or '-'} | {p['nprobe'] or '-'} | "
              f"{r['recall_at_10']:.3f} | {r['build_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['index_bytes_on_disk'] / 2**30:.2f} GiB | {r['query_ms_batch']:.2f} ms | "
              f"{r['query_ms_single']:.1f} ms |")


if __name__ == "__main__":
    main()
