"""``batchinfer report`` at scale: the time and the page size for a synthetic classify output of 1,000,000 rows.

    .venv/bin/python scripts/bench_report.py                      # 1,000,000 rows, 1 % errors
    .venv/bin/python scripts/bench_report.py --rows 200000 --keep /tmp/out.parquet

The output is what ``batchinfer run --output x.parquet`` writes, made with pyarrow, not a model: ImageNet
labels drawn from a Zipf-like distribution, top-1 scores from a Beta distribution, top-5 lists, row groups
of 65,536 rows, the job metadata, and the job's shard timings (256-image shards on 8 workers, a few
starved by decoding) as collect records them. URIs name files that do not exist (thumbnails become
placeholders, as for images since deleted) except every 20,000th, which is one of the repository's photos.
About 1 % of the rows are errors of a few kinds, with the path in the message.

The report runs as a user runs it (``python -m producer.cli report``, a subprocess); the script prints one
JSON line: rows, seconds, the page's size and the peak memory of the report process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNK = 65_536
SHARD = 256
WORKERS = 8
ERRORS = ("file not found", "truncated image: image file is truncated ({n} bytes not processed)",
          "not an image (Pillow cannot identify the file format)", "empty file (0 bytes)",
          "cannot read {uri}: AccessDenied")


def synthetic_classify(path: Path, rows: int, error_rate: float = 0.01, seed: int = 0) -> None:
    """Write a classify output of ``rows`` rows to ``path`` (see the module docstring)."""
    from workers.schema import output_schema, with_job_metadata, with_job_record

    rng = np.random.default_rng(seed)
    names = [v[1] for _, v in sorted(json.loads((ROOT / "workers/models/imagenet_class_index.json").read_text())
                                     .items(), key=lambda kv: int(kv[0]))]
    weights = 1.0 / (np.arange(len(names)) + 3.0) ** 1.1
    weights = rng.permutation(weights / weights.sum())
    label_array = pa.array(names)
    photos = sorted(str(p) for p in (ROOT / "tests/data/photos").iterdir())
    job_id = "bench-report"
    meta = {"job_id": job_id, "model": "MobileNetV2", "task": "classify", "weights": "imagenet", "top_k": 5,
            "input_size": [224, 224], "decode": "fast", "precision": "float32", "preprocess": "tf",
            "weights_fingerprint": "imagenet:keras-3", "batchinfer_version": "0.1.0", "layers": [],
            "feature_columns": {}, "feature_shapes": {}, "pooling": None, "model_path": None}
    schema = with_job_record(with_job_metadata(output_schema("classify"), meta), _record(rows, job_id, rng))
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, rows, CHUNK):
            n = min(CHUNK, rows - start)
            index = np.arange(start, start + n)
            uris = [f"/data/photos/{i // 1000:04d}/img_{i:07d}.jpg" for i in index.tolist()]
            for i in index[index % 20_000 == 7].tolist():
                uris[i - start] = photos[(i // 20_000) % len(photos)]
            failed = rng.random(n) < error_rate
            kinds = rng.integers(0, len(ERRORS), n)
            errors = [ERRORS[k].format(n=int(k * 37 + 3), uri=u) if f else None
                      for f, k, u in zip(failed.tolist(), kinds.tolist(), uris)]
            top = np.stack([rng.choice(len(names), n, p=weights) for _ in range(5)], axis=1).astype(np.int32)
            first = rng.beta(2.0, 1.6, n).astype(np.float32)
            rest = np.sort(rng.random((n, 4)).astype(np.float32), axis=1)[:, ::-1] * (1 - first)[:, None] / 2
            scores = np.concatenate([first[:, None], rest], axis=1)
            ok = ~failed
            offsets = pa.array(np.r_[0, np.cumsum(np.where(ok, 5, 0))].astype(np.int32))
            flat_top, flat_scores = top[ok].reshape(-1), scores[ok].reshape(-1)
            mask = pa.array(failed)
            columns = {
                "uri": pa.array(uris, pa.string()),
                "error": pa.array(errors, pa.string()),
                "width": pa.array(np.where(ok, 640, 0).astype(np.int32), mask=failed),
                "height": pa.array(np.where(ok, 480, 0).astype(np.int32), mask=failed),
                "size_bytes": pa.array(rng.integers(40_000, 400_000, n), mask=failed),
                "modified": pa.array(np.full(n, 1_760_000_000_000_000), pa.timestamp("us", tz="UTC"), mask=failed),
                "etag": pa.nulls(n, pa.string()),
                "label": pc.if_else(mask, pa.scalar(None, pa.string()), label_array.take(pa.array(top[:, 0]))),
                "score": pa.array(first, mask=failed),
                "top_k_indices": pa.ListArray.from_arrays(offsets, pa.array(flat_top), mask=mask),
                "top_k_labels": pa.ListArray.from_arrays(offsets, label_array.take(pa.array(flat_top)), mask=mask),
                "top_k_scores": pa.ListArray.from_arrays(offsets, pa.array(flat_scores), mask=mask),
            }
            writer.write_table(pa.table([columns[f.name] for f in schema], schema=schema))


def _record(rows: int, job_id: str, rng: np.random.Generator) -> dict[str, Any]:
    """The job record of a plausible run: each shard taken by the first free of 8 workers, two of which are
    starved (their model waits for decoding)."""
    from workers.jobrecord import job_record
    from workers.jobstate import JobState

    created = 1_760_000_000.0
    job = JobState(job_id, {"output": {"sink": "parquet"}}, created, True, -(-rows // SHARD), rows)
    clock = [created + 2.0 + w * 0.3 for w in range(WORKERS)]
    for shard in range(job.shards_total or 0):
        w = int(np.argmin(clock))
        images = min(SHARD, rows - shard * SHARD)
        starved = w >= WORKERS - 2
        predict = images / 400 * rng.uniform(0.9, 1.1)
        wait = predict * (1.5 if starved else 0.08) * rng.uniform(0.8, 1.2)
        write = 0.02 * rng.uniform(0.5, 1.5)
        seconds = predict + wait + write + 0.005
        job.shards[shard] = {"state": "done", "images": images, "errors": round(images * 0.01),
                             "started": clock[w], "finished": clock[w] + seconds, "seconds": seconds,
                             "worker": f"celery@gpu-{w:02d}",
                             "stages": {"read_decode": images / 120, "wait": wait, "predict": predict, "write": write}}
        clock[w] += seconds + 0.002
    job.n_done = job.n_shards = len(job.shards)
    job.first_started = created + 2.0
    job.finished_at = max(clock)
    return job_record(job)


def run_report(source: Path, output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "report", str(source), "--output", str(output),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": round(seconds, 2), "html_bytes": output.stat().st_size, "peak_rss_bytes": peak,
            "stderr": proc.stderr.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--error-rate", type=float, default=0.01)
    parser.add_argument("--keep", type=Path, help="write the synthetic output here (and reuse it if it exists)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        source = args.keep or Path(tmp) / "synthetic.parquet"
        made = time.perf_counter()
        if not source.exists():
            synthetic_classify(source, args.rows, args.error_rate)
        made = time.perf_counter() - made
        result = run_report(source, Path(tmp) / "report.html")
        size = source.stat().st_size
    print(json.dumps({"rows": args.rows, "error_rate": args.error_rate, "generate_seconds": round(made, 2),
                      "parquet_bytes": size, **result}))


if __name__ == "__main__":
    main()
