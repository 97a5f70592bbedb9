"""Job lifecycle from the command line: ids, jobs, cancel, delete, retention, status without workers."""

from __future__ import annotations

import pandas as pd

from tests import probe_model
from tests.conftest import PHOTOS, batchinfer, start_probe_worker, submit_probe, wait_until
from workers.keys import Keys
from workers.redis_jobstore import RedisJobStore

KEYS = Keys()  # the default namespace's key names


def test_job_ids_are_validated_and_never_reused(redis_url, redis_client, tmp_path):
    common = (str(PHOTOS), "--output", str(tmp_path / "out"), "--weights", "none", "-q")
    for bad in ("a:shards", "../x", "-rf", "a b", "x" * 129):
        sub = batchinfer("submit", *common, f"--job-id={bad}", broker=redis_url, check=False)
        assert sub.returncode == 2 and "invalid job id" in sub.stderr and sub.stderr.count("\n") == 1, sub.stderr
    assert not redis_client.keys("batchinfer:job:*"), "nothing was created"

    first = batchinfer("submit", *common, "--job-id", "nightly-2026.11.23_a", broker=redis_url)
    assert first.stdout.strip() == "nightly-2026.11.23_a"
    again = batchinfer("submit", *common, "--job-id", "nightly-2026.11.23_a", broker=redis_url, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    job = RedisJobStore.from_url(redis_url).get_job("nightly-2026.11.23_a")
    assert job.n_shards == 1 and job.images_total == len(list(PHOTOS.iterdir())), "not merged into the old job"

    listed = batchinfer("jobs", broker=redis_url).stdout
    assert "nightly-2026.11.23_a" in listed and "running" in listed
    status = batchinfer("status", "nightly-2026.11.23_a", broker=redis_url).stdout
    assert "none alive on queue 'batchinfer'" in status and "images/s" not in status, "no worker: no ETA"
    unknown = batchinfer("status", "no-such-job", broker=redis_url, check=False)
    assert unknown.returncode == 2 and "unknown job" in unknown.stderr


def test_cancel_then_delete(redis_url, redis_client, probe, tmp_path):
    images = probe_model.make_images(tmp_path / "in", 24)
    w = start_probe_worker(redis_url, tmp_path, "canceller", PROBE_SLEEP="1", BATCHINFER_HEARTBEAT_SECONDS="1",
              BATCHINFER_LEASE_SECONDS="4", BATCHINFER_RETENTION="300")
    try:
        job_id = submit_probe(tmp_path / "in", probe, redis_url)
        store = RedisJobStore.from_url(redis_url)
        wait_until(lambda: store.get_job(job_id).n_running, 120, "a running shard")
        batchinfer("cancel", job_id, broker=redis_url)
        wait_until(lambda: store.get_job(job_id).finished, 30, "running shards to stop")
        wait_until(lambda: "not run (cancelled)" in w.text(), 30, "a queued shard to be skipped")
        job = store.get_job(job_id)
        assert job.n_done < 6 and job.n_running == 0
        assert "handed back (job cancelled)" in w.text()
        status = batchinfer("status", job_id, broker=redis_url).stdout
        assert f"job      {job_id} (cancelled)" in status
        assert 0 < redis_client.ttl(KEYS.job(job_id)) <= 300, "a finished job's state expires after the retention"

        col = batchinfer("collect", job_id, "--output", str(tmp_path / "r.parquet"), broker=redis_url, check=False)
        assert col.returncode == 1 and "cancelled" in col.stderr
        if job.n_done:
            batchinfer("collect", job_id, "--output", str(tmp_path / "r.parquet"), "--allow-partial",
                       broker=redis_url)
            assert len(pd.read_parquet(tmp_path / "r.parquet")) == 4 * job.n_done < len(images)

        batchinfer("delete", job_id, broker=redis_url)
        assert not redis_client.keys(f"batchinfer:job:{job_id}*") and store.get_job(job_id) is None
        gone = batchinfer("status", job_id, broker=redis_url, check=False)
        assert gone.returncode == 2 and "unknown job" in gone.stderr
    finally:
        w.stop()


def test_delete_rows_of_a_redis_sink_job(redis_url, redis_client):
    store = RedisJobStore.from_url(redis_url)
    store.create_job("sinkjob", {"model": {}, "output": {"sink": "redis"}})
    store.add_shard("sinkjob", 0, ["/a.jpg"])
    redis_client.hset(KEYS.image("sinkjob", "/a.jpg"), mapping={"uri": "/a.jpg", "label": "cat"})
    redis_client.rpush(KEYS.shard_rows("sinkjob", "shard-000000"), KEYS.image("sinkjob", "/a.jpg"))
    redis_client.hset(KEYS.image("otherjob", "/a.jpg"), "uri", "/a.jpg")
    batchinfer("delete", "sinkjob", broker=redis_url)
    assert redis_client.exists(KEYS.image("sinkjob", "/a.jpg")), "rows stay without --rows"
    assert not redis_client.exists(KEYS.job("sinkjob"))
    store.create_job("sinkjob", {"model": {}, "output": {"sink": "redis"}})
    batchinfer("delete", "sinkjob", "--rows", broker=redis_url)
    assert redis_client.keys("batchinfer:job:sinkjob*") == []
    assert redis_client.exists(KEYS.image("otherjob", "/a.jpg")), "another job's rows are untouched"
    missing = batchinfer("delete", "sinkjob", broker=redis_url, check=False)
    assert missing.returncode == 2 and "unknown job" in missing.stderr
