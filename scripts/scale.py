"""Scale figures against a real redis-server: what a 100M-image night costs the broker, status and collect.

    .venv/bin/python scripts/scale.py [--uris 1000000] [--status-shards 400000] [--collect-rows 65536]

Starts its own redis-server on a free loopback port (no workers), then measures:
  submit   `batchinfer submit` of a manifest of N URIs: URIs/s, the producer's peak RSS, Redis bytes
           per queued image (spooled next to a local output folder, and kept in Redis for --sink redis)
  status   `batchinfer status` of a job of S shards: seconds and bytes Redis sent, per poll
  collect  `batchinfer collect` of a features job (1280 floats per row) from its shard folder: rows/s
Results are printed as one JSON line; the README records the last ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "batchinfer"), *args], env={**os.environ, "BATCHINFER_BROKER_URL": url},
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - start, out.stdout


def measure_submit(client: redis.Redis, url: str, folder: Path, n: int) -> dict:
    manifest = folder / "list.txt"
    with open(manifest, "w") as fh:
        for i in range(n):
            fh.write(f"s3://photos-raw/nightly/2026-11-23/{i // 10000:04d}/{i * 2654435761 % 2**32:08x}.jpg\n")
    out = {}
    for label, extra in (("spooled", ["--output", str(folder / "out")]), ("in_redis", ["--sink", "redis"])):
        client.flushdb()
        before = client.info("memory")["used_memory"]
        rss_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        seconds, _ = cli("submit", str(manifest), "--weights", "none", "-q", *extra, url=url)
        used = client.info("memory")["used_memory"] - before
        out[label] = {"uris_per_s": round(n / seconds), "seconds": round(seconds, 1),
                      "broker_bytes_per_image": round(used / n, 1),
                      "producer_peak_rss_mb": round(max(rss_before, resource.getrusage(
                          resource.RUSAGE_CHILDREN).ru_maxrss) / 1024)}
    return out


def measure_status(client: redis.Redis, url: str, shards: int) -> dict:
    from workers.keys import Keys
    from workers.redis_jobstore import RedisJobStore

    keys = Keys()

    client.flushdb()
    store = RedisJobStore(client)
    store.create_job("big", {"model": {"name": "ResNet50", "task": "classify", "weights": "imagenet"},
                             "output": {"sink": "parquet", "path": "/out"}, "queue": "batchinfer"})
    record = json.dumps({"state": "done", "images_in": 256, "attempts": 1, "runs": 1, "images": 256, "errors": 0})
    pipe = client.pipeline(transaction=False)
    for start in range(0, shards, 10_000):
        pipe.hset(keys.shards("big"), mapping={str(i): record for i in range(start, min(start + 10_000, shards))})
    pipe.hset(keys.job("big"), mapping={"n_shards": shards, "n_done": shards // 2, "images_done": shards * 128})
    pipe.execute()
    store.finish_submit("big", shards, shards * 256)
    polls = []
    for _ in range(5):
        sent = client.info("stats")["total_net_output_bytes"]
        began = time.perf_counter()
        job = store.get_job("big")
        store.live_workers("batchinfer", 30)
        polls.append((time.perf_counter() - began, client.info("stats")["total_net_output_bytes"] - sent))
        assert job is not None
    cli_seconds, _ = cli("status", "big", url=url)
    return {"shards": shards, "poll_ms": round(1000 * min(p[0] for p in polls), 2),
            "poll_bytes": max(p[1] for p in polls), "cli_seconds_with_startup": round(cli_seconds, 2)}


def measure_collect(client: redis.Redis, url: str, folder: Path, rows: int, per_shard: int = 256) -> dict:
    from workers.jobstate import Holder
    from workers.redis_jobstore import RedisJobStore
    from workers.schema import output_schema, with_job_metadata

    client.flushdb()
    out = folder / "shards"
    out.mkdir()
    store = RedisJobStore(client)
    store.create_job("feat", {"model": {"name": "MobileNetV2", "task": "features", "weights": "none"},
                              "output": {"sink": "parquet", "path": str(out), "ttl": 0}, "queue": "batchinfer"})
    schema = with_job_metadata(output_schema("features", feature_dim=1280), {"job_id": "feat"})
    rng = np.random.default_rng(0)
    n = rows // per_shard
    for s in range(n):
        uris = [f"/img/{s}/{k}.jpg" for k in range(per_shard)]
        store.add_shard("feat", s, uris)
        feats = rng.random((per_shard, 1280), dtype=np.float32)
        table = pa.table({"uri": uris, "error": pa.nulls(per_shard, pa.string()),
                          "width": pa.array([640] * per_shard, pa.int32()),
                          "height": pa.array([480] * per_shard, pa.int32()),
                          "features": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), 1280)},
                         schema=schema)
        pq.write_table(table, out / f"shard-{s:06d}.parquet", compression="zstd")
        holder = Holder("scale")
        store.begin("feat", s, holder, 60, 3)
        store.finish("feat", s, holder.token, {"images": per_shard, "errors": 0})
    store.finish_submit("feat", n, n * per_shard)
    seconds, _ = cli("collect", "feat", "--output", str(folder / "all.parquet"), url=url)
    start = time.perf_counter()
    import pyarrow.dataset as ds

    dataset_rows = ds.dataset(out, format="parquet").to_table().num_rows
    dataset_seconds = time.perf_counter() - start
    return {"rows": n * per_shard, "collect_rows_per_s": round(n * per_shard / seconds),
            "dataset_read_rows_per_s": round(dataset_rows / dataset_seconds), "cpus": os.cpu_count()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uris", type=int, default=1_000_000)
    ap.add_argument("--status-shards", type=int, default=400_000)
    ap.add_argument("--collect-rows", type=int, default=65_536)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="batchinfer-scale-"))
    port = free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(folder)],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        result = {"date": time.strftime("%Y-%m-%d"), "submit": measure_submit(client, url, folder, args.uris),
                  "status": measure_status(client, url, args.status_shards),
                  "collect": measure_collect(client, url, folder, args.collect_rows)}
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
