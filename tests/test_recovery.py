"""The recovery pass every worker runs, against a real Redis (publishing is recorded instead of sent)."""

from __future__ import annotations

import time

import pytest

from workers import keys
from workers.jobstate import PENDING, RUN, Holder
from workers.keys import Keys
from workers.recovery import Recovery
from workers.redis_jobstore import RedisJobStore
from workers.settings import Settings
from workers.spool import STATE

KEYS = Keys()  # the default namespace's key names


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(redis_url, redis_client):
    store = RedisJobStore.from_url(redis_url, retention=3600)
    settings = Settings(lease_seconds=10, heartbeat_seconds=1, max_attempts=3)
    sent = []
    clock = Clock()
    recovery = Recovery(store, settings, "me@host", sent.append, broker=redis_client, clock=clock)
    store.create_job("j", {"model": {"name": "MobileNetV2"}, "output": {"sink": "parquet", "path": "/out"},
                           "queue": "batchinfer"})
    for i in range(3):
        store.add_shard("j", i, [f"/img/{i}.jpg"])
    store.finish_submit("j", 3, 3)
    return store, recovery, sent, clock


def test_expired_leases_are_reaped_and_requeued_with_their_uris(setup, redis_client):
    store, recovery, sent, clock = setup
    assert store.begin("j", 1, Holder("dead@host", delivery_tag="t-1"), 0.1, 3).action == RUN
    redis_client.hset("unacked", "t-1", "the dead worker's message")
    redis_client.zadd("unacked_index", {"t-1": 1})
    time.sleep(0.2)
    assert recovery.run_once()["reaped"] == 0, "no reaping in the first lease period after contact"
    clock.now += 10
    done = recovery.run_once()
    assert done["reaped"] == 1 and done["published"] == 1
    assert [(t.job_id, t.shard_id, t.uris_ref) for t in sent] == [("j", 1, STATE)], "a pointer, not the URIs"
    assert store.shard_uris("j", 1) == ["/img/1.jpg"]
    assert sent[0].model.name == "MobileNetV2" and sent[0].output.path == "/out"
    assert not redis_client.hexists("unacked", "t-1"), "the dead worker's broker copy cannot come back"
    assert not redis_client.zcard(KEYS.delayed()), "published once, then forgotten"
    assert store.live_workers("batchinfer", 5) == ["me@host"]


def test_backoff_waits_until_due(setup):
    store, recovery, sent, clock = setup
    h = Holder("w")
    store.begin("j", 0, h, 30, 3)
    store.fail("j", 0, h.token, "disk full", retry_in=0.5)
    assert recovery.run_once()["published"] == 0, "not before its backoff"
    time.sleep(0.6)
    assert recovery.run_once()["published"] == 1 and sent[0].shard_id == 0


def test_shards_whose_message_was_lost_are_sent_again(setup, redis_client):
    """Pending shards, an empty queue, nothing running and no progress for a lease period: resend."""
    store, recovery, sent, clock = setup
    h = Holder("w")
    store.begin("j", 2, h, 30, 3)
    store.finish("j", 2, h.token, {"images": 1, "errors": 0})
    redis_client.rpush("batchinfer", "a message")  # the queue is not empty: nothing is lost yet
    clock.now += 10
    recovery.run_once()
    clock.now += 20
    assert recovery.run_once()["resent"] == 0
    redis_client.delete("batchinfer")
    recovery.run_once()
    clock.now += 5
    assert recovery.run_once()["resent"] == 0, "stalled for less than a lease period"
    clock.now += 6
    done = recovery.run_once()
    assert done["resent"] == 2 and sorted(t.shard_id for t in sent) == [0, 1]
    assert store.get_job("j").count(PENDING) == 2


def test_cancelled_and_unknown_jobs_are_not_published(setup, redis_client):
    store, recovery, sent, clock = setup
    store.schedule("j", [0])
    store.cancel("j")
    redis_client.zadd(KEYS.delayed(), {keys.member("gone", 4): 0})
    assert recovery.run_once()["published"] == 0 and not sent
    assert not redis_client.zcard(KEYS.delayed())


def test_settings_back_off_over_minutes_and_are_checked():
    s = Settings()
    assert 45 <= s.backoff(1) <= 75 and 180 <= s.backoff(2) <= 300 and s.backoff(9) <= 900 * 1.25
    with pytest.raises(ValueError, match="at most half"):
        Settings.from_env({"BATCHINFER_LEASE_SECONDS": "10", "BATCHINFER_HEARTBEAT_SECONDS": "6"})
    with pytest.raises(ValueError, match="BATCHINFER_MAX_ATTEMPTS must be at least 1"):
        Settings.from_env({"BATCHINFER_MAX_ATTEMPTS": "0"})
