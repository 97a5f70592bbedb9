"""End to end through a real Redis and a real `celery -A workers worker`: submit -> status -> collect."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tests.conftest import batchinfer, check_rows, wait_until
from workers.contract import TASK_NAME, ShardTask
from workers.keys import Keys
from workers.redis_jobstore import RedisJobStore

KEYS = Keys()  # the default namespace's key names


def test_parquet_sink_end_to_end(worker, redis_url, redis_client, mixed_folder, tmp_path):
    folder, expected = mixed_folder
    out_dir = tmp_path / "shards"
    sub = batchinfer("submit", str(folder), "--output", str(out_dir), "--weights", "none",
                     "--shard-size", "4", "--batch-size", "4", broker=redis_url)
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id and " " not in job_id, "the job id is the last line of stdout"

    result = tmp_path / "all.parquet"
    batchinfer("collect", job_id, "--output", str(result), "--wait", "--timeout", "600", broker=redis_url)
    frame = pd.read_parquet(result)
    check_rows(frame, f"{folder}/", expected)
    good = frame[frame["error"].isna()]
    assert good["label"].notna().all() and (good["score"] > 0).all()
    assert all(len(k) == 5 for k in good["top_k_indices"])
    assert all(np.all(np.diff(s) <= 0) for s in good["top_k_scores"]), "top-k sorted by score"
    assert frame[frame["error"].notna()]["label"].isna().all()
    meta = json.loads(pq.read_schema(result).metadata[b"batchinfer"])
    assert meta["model"] == "MobileNetV2" and meta["task"] == "classify" and meta["decode"] == "fast"
    assert meta["weights_fingerprint"].startswith("random") and meta["input_size"] == [224, 224]

    n_shards = -(-len(expected) // 4)
    data_files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("_"))
    assert data_files == [f"shard-{i:06d}.parquet" for i in range(n_shards)]
    spooled = sorted(p.name for p in (out_dir / "_batchinfer" / job_id).iterdir())
    assert spooled == [f"shard-{i:06d}.uris.gz" for i in range(n_shards)], "URI lists travel by reference"
    status = batchinfer("status", job_id, broker=redis_url).stdout
    assert f"{n_shards}/{n_shards} done" in status and f"{len(expected)}/{len(expected)}" in status
    assert "images/s" in status
    # the model was built once and kept warm for every later shard
    assert worker.text().count("built MobileNetV2 (classify") == 1

    # idempotency: the same shard delivered twice is recognised as done and leaves one copy of its rows
    store = RedisJobStore.from_url(redis_url)
    job = store.get_job(job_id, shards=True)
    before = job.shards[0]["updated"]
    _resend_shard(redis_url, store, job_id, 0, job.spec)
    wait_until(lambda: f"job {job_id} shard-000000: not run (done)" in worker.text(), 120, "duplicate skipped")
    assert store.get_job(job_id, shards=True).shards[0]["updated"] == before
    again = tmp_path / "again.csv"
    batchinfer("collect", job_id, "--output", str(again), broker=redis_url)
    frame2 = pd.read_csv(again)
    assert len(frame2) == len(expected) and frame2["uri"].is_unique
    assert not list(out_dir.glob(".*")), "no temporary files left behind"


def _resend_shard(redis_url, store, job_id, shard_id, spec) -> None:
    """Send a shard's message again, as a broker redelivery would (its URIs come from the job state)."""
    from workers.app import app

    app.conf.broker_url = redis_url
    task = ShardTask.from_dict({"job_id": job_id, "shard_id": shard_id, "uris": store.shard_uris(job_id, shard_id),
                                "model": spec["model"], "output": spec["output"]})
    app.send_task(TASK_NAME, kwargs={"task": task.to_dict()}, queue="batchinfer")


def test_redis_sink_features_end_to_end(worker, redis_url, redis_client, mixed_folder, tmp_path):
    folder, expected = mixed_folder
    sub = batchinfer("submit", str(folder), "--sink", "redis", "--task", "features", "--input-size", "96",
                     "--weights", "none", "--shard-size", "5", "--ttl", "3600", broker=redis_url)
    job_id = sub.stdout.strip().splitlines()[-1]
    result = tmp_path / "features.jsonl"
    batchinfer("collect", job_id, "--output", str(result), "--wait", "--timeout", "600", broker=redis_url)
    frame = pd.read_json(result, lines=True)
    check_rows(frame, f"{folder}/", expected)
    good = frame[frame["error"].isna()]
    dims = {len(v) for v in good["features"]}
    assert dims == {1280}, "MobileNetV2 pooled features have 1280 floats"

    # the documented key layout: one hash per image, features as little-endian float32 bytes
    uri = next(u for u, e in zip(frame["uri"], frame["error"]) if e is None or e != e)
    raw = redis_client.hgetall(KEYS.image(job_id, uri))
    vector = np.frombuffer(raw[b"features"], dtype="<f4")
    stored = np.asarray(frame.set_index("uri").loc[uri, "features"], dtype=np.float32)
    np.testing.assert_allclose(vector, stored, rtol=1e-6)
    assert 0 < redis_client.ttl(KEYS.image(job_id, uri)) <= 3600
    bad = next(u for u, e in zip(frame["uri"], frame["error"]) if isinstance(e, str))
    assert b"error" in redis_client.hgetall(KEYS.image(job_id, bad))

    # `retry --shard` runs a done shard again: it rewrites the same keys, still one row per image
    store = RedisJobStore.from_url(redis_url)
    job = store.get_job(job_id, shards=True)
    before = job.shards[1]["updated"]
    n_keys = len(redis_client.keys(KEYS.image(job_id, "*")))
    redis_client.hdel(KEYS.committed(job_id), "shard-000001")  # as if its rows had expired: really redo it
    batchinfer("retry", job_id, "--shard", "1", broker=redis_url)
    wait_until(lambda: store.get_job(job_id, shards=True).shards[1]["updated"] > before
               and store.get_job(job_id, shards=True).shards[1]["state"] == "done", 120, "re-run shard")
    assert store.get_job(job_id, shards=True).shards[1]["runs"] == 2
    assert len(redis_client.keys(KEYS.image(job_id, "*"))) == n_keys == len(expected)
    again = tmp_path / "again.parquet"
    batchinfer("collect", job_id, "--output", str(again), broker=redis_url)
    assert pd.read_parquet(again)["uri"].is_unique and len(pd.read_parquet(again)) == len(expected)


def test_failed_shards_are_reported(worker, redis_url, redis_client, tmp_path):
    missing = tmp_path / "not-there.weights.h5"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    sub = batchinfer("submit", str(empty), "--output", str(tmp_path / "out"), broker=redis_url, check=False)
    assert sub.returncode != 0 and "no images found" in sub.stderr and not sub.stdout
    from tests.conftest import PHOTOS

    sub = batchinfer("submit", str(PHOTOS), "--weights", str(missing), "--output", str(tmp_path / "out"),
                     "--shard-size", "2", broker=redis_url)
    assert "not on this machine" in sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    col = batchinfer("collect", job_id, "--output", str(tmp_path / "r.parquet"), "--wait", "--timeout", "300",
                     broker=redis_url, check=False)
    assert time.monotonic() - started < 300
    assert col.returncode != 0 and "Traceback" not in col.stderr
    assert "shard-000000: failed" in col.stderr and "weights file not found" in col.stderr
    status = batchinfer("status", job_id, broker=redis_url, check=False)
    assert status.returncode == 1, "failed shards make status exit non-zero"
    assert "3 failed" in status.stdout and "weights file not found" in status.stdout
    assert f"batchinfer retry {job_id}" in status.stdout


def test_submit_failing_mid_stream_marks_the_job(redis_url, redis_client, tmp_path):
    """A manifest that breaks after shards were enqueued: the job says so instead of 'submitting' forever."""
    from tests.conftest import PHOTOS

    bad = tmp_path / "broken.parquet"
    bad.write_text("not parquet")
    sub = batchinfer("submit", str(PHOTOS), str(bad), "--output", str(tmp_path / "out"), "--shard-size", "2",
                     "--weights", "none", broker=redis_url, check=False)
    assert sub.returncode == 1 and "broken.parquet" in sub.stderr and "Traceback" not in sub.stderr
    job_id = redis_client.zrange(KEYS.jobs(), 0, -1)[-1].decode()
    status = batchinfer("status", job_id, broker=redis_url).stdout
    assert "submission failed" in status and "broken.parquet" in status
