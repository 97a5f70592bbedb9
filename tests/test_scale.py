"""Costs that must not grow with the job: broker memory per queued image, bytes read by `status`."""

from __future__ import annotations

import json

from tests.conftest import batchinfer
from workers.keys import Keys
from workers.redis_jobstore import RedisJobStore

KEYS = Keys()  # the default namespace's key names

N_URIS = 100_000


def _manifest(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("".join(f"/data/photos/2026/11/{i // 1000:04d}/IMG_{i:07d}.jpg\n" for i in range(N_URIS)))
    return path


def test_a_queued_job_costs_the_broker_under_16_bytes_per_image(redis_url, redis_client, tmp_path):
    manifest = _manifest(tmp_path)
    for extra in (["--output", str(tmp_path / "out")], ["--sink", "redis"]):
        redis_client.flushdb()
        before = redis_client.info("memory")["used_memory"]
        job_id = batchinfer("submit", str(manifest), "--weights", "none", "-q", *extra,
                            broker=redis_url).stdout.strip().splitlines()[-1]
        per_image = (redis_client.info("memory")["used_memory"] - before) / N_URIS
        assert redis_client.llen("batchinfer") == -(-N_URIS // 256)
        assert len(redis_client.lindex("batchinfer", 0)) < 2500, "a message carries a pointer, not 256 URIs"
        assert per_image < 16, f"{extra}: {per_image:.1f} bytes of Redis per queued image"
        store = RedisJobStore.from_url(redis_url)
        assert store.shard_uris(job_id, 5) == [f"/data/photos/2026/11/0001/IMG_{i:07d}.jpg" for i in range(1280, 1536)]


def test_status_of_a_400000_shard_job_reads_a_bounded_amount(redis_url, redis_client):
    store = RedisJobStore.from_url(redis_url)
    store.create_job("huge", {"model": {"name": "ResNet50", "task": "classify", "weights": "imagenet"},
                              "output": {"sink": "parquet", "path": "/out"}, "queue": "batchinfer"})
    record = json.dumps({"state": "pending", "images_in": 256, "attempts": 0, "runs": 0})
    pipe = redis_client.pipeline(transaction=False)
    for start in range(0, 400_000, 10_000):
        pipe.hset(KEYS.shards("huge"), mapping={str(i): record for i in range(start, start + 10_000)})
    pipe.hset(KEYS.job("huge"), mapping={"n_shards": 400_000})
    pipe.execute()
    store.finish_submit("huge", 400_000, 400_000 * 256)
    assert redis_client.memory_usage(KEYS.shards("huge")) > 20_000_000, "the shard records are big"

    def bytes_sent(*args: str) -> int:
        before = redis_client.info("stats")["total_net_output_bytes"]
        batchinfer(*args, broker=redis_url)
        return redis_client.info("stats")["total_net_output_bytes"] - before

    assert bytes_sent("status", "huge") < 100_000
    assert bytes_sent("jobs") < 100_000
    assert bytes_sent("status", "huge", "--shards", "failed") < 100_000
    paged = bytes_sent("status", "huge", "--shards", "pending", "--limit", "20")
    assert paged < 1_000_000, "a page of pending shards stops scanning once it has them"
    out = batchinfer("status", "huge", "--shards", "pending", "--limit", "3", broker=redis_url).stdout
    assert "0/400000 done" in out and out.count("256 images") == 3
