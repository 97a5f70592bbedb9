"""``process_shard`` with a fake predictor (sub-second): the process's decode pool lasts across shards,
the next shard loads while the current one finishes, and stop / broken storage keep their guarantees."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS
from tests.fakes import SIZE, FakePredictor
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.decode import Decoded
from workers.errors import ShardError, ShardStopped
from workers.feed import Feeder, Loaded, feeder
from workers.pipeline import process_shard
from workers.settings import Settings

SPEC = ModelSpec(name="MobileNetV2", weights="none", top_k=1, batch_size=4)


def _task(tmp_path: Path, shard_id: int, uris: list[str]) -> ShardTask:
    return ShardTask("j", shard_id, uris, SPEC, OutputSpec(path=str(tmp_path / "out")))


def _fake_load(events: list[str], lock: threading.Lock, fail: frozenset[str] = frozenset()):
    def load(uri: str, decode, size) -> Loaded:
        with lock:
            events.append(f"load {uri}")
        if uri in fail:
            raise ShardError(f"store down ({uri})")
        return Loaded(uri, Decoded(np.zeros((*size, 3), np.uint8), 32, 24), None, 0.0)
    return load


def _rows(tmp_path: Path, task: ShardTask) -> list[str]:
    return pq.read_table(tmp_path / "out" / f"{task.name}.parquet")["uri"].to_pylist()


def test_the_decode_pool_lasts_across_shards(tmp_path):
    settings = Settings(io_threads=2)
    photos = sorted(str(p) for p in PHOTOS.iterdir())
    feed = feeder(settings.io_threads)
    first = process_shard(_task(tmp_path, 0, photos), FakePredictor(), settings)
    threads = set(feed.pool._threads)  # type: ignore[attr-defined]
    second = process_shard(_task(tmp_path, 1, photos[::-1]), FakePredictor(), settings)
    assert feeder(settings.io_threads) is feed, "one feeder (and pool) per process and thread count"
    assert len(threads) == 2 and set(feed.pool._threads) == threads, "the same threads served both shards"  # type: ignore[attr-defined]
    assert first.images == second.images == len(photos) and first.errors == second.errors == 0
    assert _rows(tmp_path, _task(tmp_path, 1, [])) == photos[::-1]


def test_the_next_shard_loads_while_the_current_one_finishes(tmp_path):
    events: list[str] = []
    lock = threading.Lock()
    next_started = threading.Event()
    load = _fake_load(events, lock)

    def load_and_signal(uri, decode, size):
        if uri.startswith("b"):
            next_started.set()
        return load(uri, decode, size)

    with ThreadPoolExecutor(2) as pool:
        feed = Feeder(pool, prefetch=2, load_image=load_and_signal)
        a = _task(tmp_path, 0, [f"a{i}" for i in range(12)])  # 3 batches of 4
        b = _task(tmp_path, 1, [f"b{i}" for i in range(12)])
        seen_during_last_batch: list[bool] = []
        batches = iter(range(3))

        def on_predict(n):
            if next(batches) == 2:  # shard a's last batch runs on the "model": b's loads have begun
                seen_during_last_batch.append(next_started.wait(10))
            with lock:
                events.append("predict a")

        feed.announce(b, SIZE)
        process_shard(a, FakePredictor(on_predict), Settings(), feed=feed)
        assert seen_during_last_batch == [True]
        last_a = max(i for i, e in enumerate(events) if e == "predict a")
        assert any(e.startswith("load b") for e in events[:last_a]), events
        process_shard(b, FakePredictor(), Settings(), feed=feed)
    assert feed.started_early == 1
    assert events.count("load b0") == 1, "the announced loads were used, not read again"
    assert _rows(tmp_path, b) == b.uris


def test_prefetch_stays_bounded_across_shards(tmp_path):
    """While a batch of ``a`` runs, at most ``prefetch`` batches are in flight, ``a``'s and then ``b``'s."""
    in_flight: list[int] = []
    with ThreadPoolExecutor(4) as pool:
        feed = Feeder(pool, prefetch=2, load_image=_fake_load([], threading.Lock()))
        a = _task(tmp_path, 0, [f"a{i}" for i in range(8)])
        b = _task(tmp_path, 1, [f"b{i}" for i in range(40)])
        feed.announce(b, SIZE)

        def on_predict(n):
            queued = [feed._announced[0]] if feed._announced else []
            in_flight.append(sum(len(q.pending) for q in queued))

        process_shard(a, FakePredictor(on_predict), Settings(), feed=feed)
        assert in_flight == [1, 2], "b takes the places a no longer needs, never more"
        assert feed._announced[0].next == 3 * SPEC.batch_size, "once a is done, b has prefetch + 1 batches going"
        feed.cancel_announced()


def test_stop_commits_nothing_and_the_pool_carries_on(tmp_path):
    settings = Settings(io_threads=2)
    photos = sorted(str(p) for p in PHOTOS.iterdir()) * 3
    asked = iter(range(100))
    with pytest.raises(ShardStopped, match="cancelled"):
        process_shard(_task(tmp_path, 0, photos), FakePredictor(), settings,
                      should_stop=lambda: "cancelled" if next(asked) == 1 else None)
    out = tmp_path / "out"
    assert not out.exists() or not [p for p in os.listdir(out) if "shard-000000" in p], "nothing of the shard is left"
    result = process_shard(_task(tmp_path, 1, photos), FakePredictor(), settings)
    assert result.images == len(photos)


def test_a_broken_store_fails_its_shard_only(tmp_path):
    events: list[str] = []
    down = frozenset(f"a{i}" for i in range(40))
    with ThreadPoolExecutor(2) as pool:
        feed = Feeder(pool, prefetch=2, load_image=_fake_load(events, threading.Lock(), fail=down))
        a = _task(tmp_path, 0, sorted(down))
        b = _task(tmp_path, 1, [f"b{i}" for i in range(6)])
        feed.announce(b, SIZE)
        with pytest.raises(ShardError, match="store down"):
            process_shard(a, FakePredictor(), Settings(), feed=feed)
        reads = sum(e.startswith("load a") for e in events)
        assert reads <= 4, f"after the first failure the shard's other loads fail fast ({reads} reads)"
        result = process_shard(b, FakePredictor(), Settings(), feed=feed)
    assert result.images == 6 and result.errors == 0
    assert not (tmp_path / "out" / f"{a.name}.parquet").exists() and _rows(tmp_path, b) == b.uris


def test_error_rows_are_unchanged(tmp_path):
    photos = sorted(str(p) for p in PHOTOS.iterdir())
    missing = str(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    uris = [photos[0], missing, str(tmp_path / "junk.jpg"), photos[1]]
    result = process_shard(_task(tmp_path, 0, uris), FakePredictor(), Settings(io_threads=2))
    table = pq.read_table(tmp_path / "out" / "shard-000000.parquet").to_pylist()
    assert result.errors == 2 and [r["uri"] for r in table] == uris
    assert [r["error"] for r in table][0::3] == [None, None]
    assert table[1]["error"] == "file not found" and "not an image" in table[2]["error"]
    assert table[0]["label"] == "a" and table[1]["label"] is None


def test_prime_loads_one_image_at_a_time_within_its_budget_until_ready(tmp_path):
    """While the model is built, primed loads run on one thread, up to ``limit_bytes`` of images (whole
    batches); after ``ready()`` the pool's threads all work again and the primed images are used."""
    lock = threading.Lock()
    loaded: list[str] = []
    running = [0, 0]  # now, most at once

    def load(uri: str, decode, size) -> Loaded:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.02)
        with lock:
            running[0] -= 1
            loaded.append(uri)
        return Loaded(uri, Decoded(np.zeros((*size, 3), np.uint8), 32, 24), None, 0.0)

    a = _task(tmp_path, 0, [f"a{i}" for i in range(8)])  # 2 batches of 4
    b = _task(tmp_path, 1, [f"b{i}" for i in range(8)])
    with ThreadPoolExecutor(4) as pool:
        feed = Feeder(pool, prefetch=1, load_image=load)
        image_bytes = SIZE[0] * SIZE[1] * 3
        feed.prime([a, b], SIZE, limit_bytes=10 * image_bytes)  # 10 images: a's 2 batches and b's first
        deadline = time.monotonic() + 10
        while len(loaded) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert sorted(loaded) == sorted(a.uris + b.uris[:4]), "whole batches, up to the budget, nothing more"
        assert running[1] == 1, "one load at a time while the model is built"
        feed.ready()
        process_shard(a, FakePredictor(), Settings(), feed=feed)
        process_shard(b, FakePredictor(), Settings(), feed=feed)
    assert running[1] > 1, "after ready() the loads run on several threads"
    assert sorted(loaded) == sorted(a.uris + b.uris), "every image loaded once"
    assert feed.started_early == 2 and _rows(tmp_path, a) == a.uris and _rows(tmp_path, b) == b.uris


def test_a_shard_runs_whatever_unclaimed_loads_hold(tmp_path):
    """Loads announced for a shard that never runs (primed at a size the model was not built at) do not
    take the running shard's places in the prefetch window: it still gets every batch."""
    with ThreadPoolExecutor(2) as pool:
        feed = Feeder(pool, prefetch=1, load_image=_fake_load([], threading.Lock()))
        stale = _task(tmp_path, 0, [f"s{i}" for i in range(12)])
        feed.prime([stale], (8, 8))  # 3 batches in flight, never claimed
        feed.ready()
        a = _task(tmp_path, 1, [f"a{i}" for i in range(10)])
        result = process_shard(a, FakePredictor(), Settings(), feed=feed)
        feed.cancel_announced()
    assert result.images == 10 and _rows(tmp_path, a) == a.uris
