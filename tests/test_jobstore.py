"""The job state machine: both stores pass one contract; the Redis one also holds under racing attempts."""

from __future__ import annotations

import threading
import time

import pytest

from workers import keys
from workers.jobstate import (
    CANCELLED,
    DEAD,
    DONE,
    FAILED,
    PENDING,
    RUN,
    RUNNING,
    SKIP_RUNNING,
    UNKNOWN,
    Holder,
    MemoryJobStore,
)
from workers.keys import Keys
from workers.redis_jobstore import RedisJobStore

KEYS = Keys()  # the default namespace's key names

LEASE = 30


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        return MemoryJobStore()
    request.getfixturevalue("redis_client")  # an empty database
    return RedisJobStore.from_url(request.getfixturevalue("redis_url"), retention=3600)


def _job(store, job_id="j1", shards=3, per=2, submitted=True):
    assert store.create_job(job_id, {"model": {}, "output": {}, "queue": "q"})
    for i in range(shards):
        assert store.add_shard(job_id, i, [f"/img/{i}-{k}.jpg" for k in range(per)])
    if submitted:
        store.finish_submit(job_id, shards, shards * per)
    return job_id


def test_a_shard_runs_once_and_done_is_final(store):
    job = _job(store)
    a, b = Holder("w1"), Holder("w2")
    first = store.begin(job, 0, a, LEASE, 3)
    assert first.action == RUN and first.attempt == 1 and first.runs == 1
    second = store.begin(job, 0, b, LEASE, 3)
    assert second.action == SKIP_RUNNING and second.lease["worker"] == "w1", "never twice at once"
    assert store.heartbeat(job, 0, a.token, LEASE) == "ok"
    assert store.heartbeat(job, 0, b.token, LEASE) == "lost"
    state = store.get_job(job)
    assert (state.n_running, state.count(PENDING)) == (1, 2)
    assert state.running[0]["shard"] == 0 and state.running[0]["attempt"] == 1

    assert store.finish(job, 0, a.token, {"images": 2, "errors": 1}) == "ok"
    assert store.finish(job, 0, a.token, {"images": 2, "errors": 1}) == DONE, "a second finish changes nothing"
    assert store.begin(job, 0, b, LEASE, 3).action == DONE, "a duplicate delivery of a done shard is skipped"
    assert store.fail(job, 0, a.token, "late failure", None) == "lost", "done never goes back"
    state = store.get_job(job)
    assert (state.n_done, state.n_running, state.images_done, state.errors) == (1, 0, 2, 1)
    assert not state.finished


def test_failures_back_off_then_dead_letter(store):
    job = _job(store, shards=1)
    for attempt in (1, 2):
        h = Holder("w")
        assert store.begin(job, 0, h, LEASE, 3).attempt == attempt
        assert store.fail(job, 0, h.token, f"boom {attempt}", retry_in=60) == PENDING
    state = store.get_job(job, shards=True)
    assert state.shards[0]["state"] == PENDING and state.shards[0]["reason"] == "boom 2"
    assert state.shards[0]["retry_at"] > time.time() + 50
    h = Holder("w")
    assert store.begin(job, 0, h, LEASE, 3).attempt == 3
    assert store.fail(job, 0, h.token, "boom 3", retry_in=None) == FAILED
    state = store.get_job(job)
    assert state.n_failed == 1 and state.failed[0]["reason"] == "boom 3" and state.failed[0]["attempts"] == 3
    assert state.finished, "every shard is done or failed"
    assert store.begin(job, 0, Holder("w"), LEASE, 3).action == FAILED, "dead letters wait for retry"


def test_deliveries_of_a_crashing_shard_count(store):
    """A process that dies mid-shard records nothing; the next delivery takes over its lease and counts."""
    job = _job(store, shards=1)
    crashed = Holder("w", pid=10_000_001)
    assert store.begin(job, 0, crashed, LEASE, 3).action == RUN
    for attempt in (2, 3, 4):
        blocked = store.begin(job, 0, Holder("w"), LEASE, 3)
        assert blocked.action == SKIP_RUNNING and blocked.lease["token"] == crashed.token
        crashed = Holder("w", pid=10_000_000 + attempt)  # the caller saw that pid is gone: take over
        again = store.begin(job, 0, crashed, LEASE, 3, takeover=blocked.lease["token"])
        if attempt <= 3:
            assert again.action == RUN and again.attempt == attempt
    assert again.action == DEAD and "gave up after 3 attempts" in again.reason and "died" in again.reason
    state = store.get_job(job)
    assert state.n_failed == 1 and state.n_running == 0 and state.n_lost == 3 and state.finished


def test_release_hands_back_without_counting(store):
    job = _job(store, shards=1)
    h = Holder("w")
    store.begin(job, 0, h, LEASE, 1)
    assert store.release(job, 0, h.token, "worker shutting down") == PENDING
    again = store.begin(job, 0, Holder("w"), LEASE, 1)
    assert again.action == RUN and again.attempt == 1 and again.runs == 2, "a hand-back is not an attempt"


def test_cancel(store):
    job = _job(store, shards=2)
    h = Holder("w")
    store.begin(job, 0, h, LEASE, 3)
    store.cancel(job)
    assert store.begin(job, 1, Holder("w"), LEASE, 3).action == CANCELLED
    assert store.heartbeat(job, 0, h.token, LEASE) == CANCELLED
    assert not store.get_job(job).finished, "a running shard is still stopping"
    store.release(job, 0, h.token, "job cancelled")
    assert store.get_job(job).finished


def test_unknown_job_or_shard(store):
    assert store.begin("nope", 0, Holder("w"), LEASE, 3).action == UNKNOWN
    job = _job(store, shards=1)
    assert store.begin(job, 7, Holder("w"), LEASE, 3).action == UNKNOWN
    assert not store.create_job(job, {}), "a job id is never reused"


def test_reap_requeues_then_dead_letters(redis_url, redis_client):
    store = RedisJobStore.from_url(redis_url, retention=3600)
    job = _job(store, shards=1)
    for attempt in (1, 2):
        h = Holder("gone@host", delivery_tag=f"tag{attempt}")
        store.begin(job, 0, h, 0.2, 2)
        time.sleep(0.3)
        assert store.expired_leases() == [(job, 0)]
        state, lease = store.reap(job, 0, 2)
        assert lease["delivery_tag"] == f"tag{attempt}"
        assert state == (PENDING if attempt == 1 else FAILED)
        if attempt == 1:
            assert redis_client.zscore(KEYS.delayed(), keys.member(job, 0)) is not None, "requeued at once"
    snap = store.get_job(job)
    assert snap.n_failed == 1 and snap.n_lost == 2 and "lost (no heartbeat" in snap.failed[0]["reason"]


def test_retention_expires_finished_jobs_and_retry_keeps_them(redis_url, redis_client):
    store = RedisJobStore.from_url(redis_url, retention=100)
    job = _job(store, shards=1)
    h = Holder("w")
    store.begin(job, 0, h, LEASE, 1)
    store.fail(job, 0, h.token, "bad", None)
    assert 0 < redis_client.ttl(KEYS.job(job)) <= 100 and 0 < redis_client.ttl(KEYS.uris(job)) <= 100
    assert job not in store.active_jobs()
    assert store.retry(job) == [0]
    assert redis_client.ttl(KEYS.job(job)) == -1, "a retried job is kept until it finishes again"
    snap = store.get_job(job)
    assert not snap.finished and snap.n_failed == 0 and snap.count(PENDING) == 1
    assert store.shard_uris(job, 0) == ["/img/0-0.jpg", "/img/0-1.jpg"], "URIs recoverable without the message"


def test_racing_attempts_never_regress_done(redis_url, redis_client):
    """Many threads finish and fail the same shards at once: done stays done, counters stay exact."""
    store = RedisJobStore.from_url(redis_url, retention=3600)
    job = _job(store, shards=40, per=1)
    holders = {i: Holder("w") for i in range(40)}
    for i, h in holders.items():
        assert store.begin(job, i, h, LEASE, 3).action == RUN
    barrier = threading.Barrier(8)

    def racer(n: int) -> None:
        own = RedisJobStore.from_url(redis_url, retention=3600)
        barrier.wait()
        for i, h in holders.items():
            if (i + n) % 2:
                own.finish(job, i, h.token, {"images": 1, "errors": 0})
            else:
                own.fail(job, i, h.token, "late failing attempt", retry_in=None)

    threads = [threading.Thread(target=racer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = store.get_job(job, shards=True)
    states = [r["state"] for r in snap.shards.values()]
    assert states == [DONE] * 40, "some attempt of every shard committed, so every shard is done"
    assert (snap.n_done, snap.n_failed, snap.n_running, snap.images_done) == (40, 0, 0, 40)
    assert snap.finished
    # whoever won, a done shard stays done when late attempts report
    for i, h in holders.items():
        store.fail(job, i, h.token, "even later", retry_in=None)
    assert store.get_job(job).n_done == snap.n_done
    assert not [s for s in store.get_job(job, shards=True).shards.values() if s["state"] == RUNNING]


def test_readers_never_write_and_workers_prune_the_indexes(redis_url, redis_client):
    """``jobs`` and ``status`` only read (a read-only ACL user can run them); the workers' recovery drops
    expired job ids from the jobs index and forgets workers unseen for a while."""
    store = RedisJobStore.from_url(redis_url, retention=3600)
    _job(store, "kept", shards=1)
    _job(store, "expired", shards=1)
    redis_client.delete(*KEYS.state_keys("expired"))  # as retention would
    store.touch_worker("q", "old@host")
    redis_client.zadd(KEYS.queue_workers("q"), {"old@host": 0})  # last seen long ago
    size = redis_client.dbsize()
    before = (redis_client.zrange(KEYS.jobs(), 0, -1), redis_client.zrange(KEYS.queue_workers("q"), 0, -1))
    assert [j.job_id for j in store.recent_jobs(10)] == ["kept"]
    assert store.live_workers("q", 30) == []
    assert (redis_client.zrange(KEYS.jobs(), 0, -1), redis_client.zrange(KEYS.queue_workers("q"), 0, -1)) == before
    assert redis_client.dbsize() == size
    assert store.prune_jobs() == 1 and redis_client.zrange(KEYS.jobs(), 0, -1) == [b"kept"]
    store.touch_worker("q", "new@host")
    assert redis_client.zrange(KEYS.queue_workers("q"), 0, -1) == [b"new@host"]


def test_a_namespace_keeps_deployments_apart(redis_url, redis_client):
    ours, theirs = (RedisJobStore.from_url(redis_url, keys=Keys(ns)) for ns in ("teama", "teamb"))
    _job(ours, "same-id", shards=2)
    assert theirs.get_job("same-id") is None and theirs.recent_jobs() == []
    assert redis_client.keys("teamb:*") == [] and redis_client.exists("teama:job:same-id")
    assert not redis_client.keys("batchinfer:*")
