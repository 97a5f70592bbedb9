"""`batchinfer run`: submit, work and collect in one process, with no Redis server."""

from __future__ import annotations

import os
import time

import pandas as pd

from tests.conftest import PHOTOS, batchinfer
from workers.contract import ModelSpec
from workers.models.loader import PredictorCache


def test_run_prints_table_and_writes_one_row_per_file(mixed_folder, tmp_path):
    folder, expected = mixed_folder
    out = tmp_path / "result.csv"
    env_broker = "redis://127.0.0.1:1/0"  # nothing listens there: run must not need a server
    proc = batchinfer("run", str(folder), "--weights", "none", "--input-size", "96", "--shard-size", "7",
                      "--output", str(out), broker=env_broker)
    frame = pd.read_csv(out)
    assert len(frame) == len(expected) and frame["uri"].is_unique
    for uri, error in zip(frame["uri"], frame["error"]):
        want = expected[os.path.relpath(uri, folder)]
        assert (want is None) == (not isinstance(error, str)), (uri, error)
        if want:
            assert want in error.lower()
    assert "cat.jpg" in proc.stdout and "label" in proc.stdout, "the results table is printed"
    assert not list(tmp_path.glob(".*")), "no temporary files left next to the output"


def test_run_features_parquet_and_jsonl(tmp_path):
    for name in ("f.parquet", "f.jsonl"):
        batchinfer("run", str(PHOTOS), "--task", "features", "--model", "resnet50", "--weights", "none",
                   "--input-size", "64", "--pooling", "max", "--output", str(tmp_path / name), "--quiet")
    a = pd.read_parquet(tmp_path / "f.parquet")
    b = pd.read_json(tmp_path / "f.jsonl", lines=True)
    assert len(a) == len(b) == len(list(PHOTOS.iterdir()))
    assert {len(v) for v in a["features"]} == {2048}
    assert list(a["uri"]) == list(b["uri"])


def test_imagenet_weights_unavailable_is_one_clear_line(tmp_path):
    env_keras = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:1",
                 "HTTP_PROXY": "http://127.0.0.1:1"}
    old = {k: os.environ.get(k) for k in env_keras}
    os.environ.update(env_keras)
    try:
        proc = batchinfer("run", str(PHOTOS / "cat.jpg"), "--model", "ResNet50", "--weights", "imagenet",
                          "--output", str(tmp_path / "x.parquet"), "--quiet", check=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in last and "--weights PATH" in last
    assert not (tmp_path / "x.parquet").exists()


def test_predictor_cache_is_a_small_lru():
    built = []
    cache = PredictorCache(maxsize=2, build=lambda spec: built.append(spec.name) or spec.name)
    a, b, c = ModelSpec(name="A"), ModelSpec(name="B"), ModelSpec(name="C")
    assert [cache.get(s) for s in (a, a, b, a, c, a, b)] == ["A", "A", "B", "A", "C", "A", "B"]
    assert built == ["A", "B", "C", "B"], "A stays warm; B was evicted by C and rebuilt"


def _photo_copies(folder, copies: int) -> list[str]:
    folder.mkdir()
    for i in range(copies):
        for photo in PHOTOS.iterdir():
            (folder / f"{i}{photo.name}").write_bytes(photo.read_bytes())
    return sorted(str(p) for p in folder.iterdir())


def test_run_loads_each_next_shard_while_the_current_one_finishes(tmp_path, monkeypatch):
    """In-process, with a fake model: every shard after the first was already loading when it started.
    (The model is built at another size than MobileNetV2's registry entry says, so nothing decoded while
    it was built is used: the run still has every row.)"""
    from producer.embedded import run
    from tests.fakes import FakeCache
    from workers.feed import feeder
    from workers.settings import Settings

    monkeypatch.setattr("workers.models.loader.PredictorCache", FakeCache)
    uris = _photo_copies(tmp_path / "in", 3)
    feed = feeder(Settings.from_env().io_threads)
    before = feed.started_early
    _, rows = run([str(tmp_path / "in")], ModelSpec(weights="none", batch_size=2), str(tmp_path / "out.parquet"),
                  shard_size=4, progress=False)
    assert rows == len(uris) == 15
    assert feed.started_early - before == 3, "shards 1, 2 and 3 of 0..3 started early"
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert list(frame["uri"]) == uris and frame["error"].isna().all()


def test_run_decodes_the_first_shards_while_the_model_is_built(tmp_path, monkeypatch):
    """A registry model's input size is known before it is built: the first shards' images decode
    meanwhile (on one thread), and the run uses them instead of reading them again."""
    from producer.embedded import run
    from tests.fakes import SIZE, FakeCache
    from workers import feed as feed_module
    from workers.settings import Settings

    feed = feed_module.feeder(Settings.from_env().io_threads)
    seen: list[bool] = []

    class SlowBuild(FakeCache):
        def get(self, spec):
            if not seen:  # the first get is the build: wait (at most 10 s) for shard 0's first batch
                first = feed._announced[0].pending[0] if feed._announced else []
                deadline = time.monotonic() + 10
                while first and not all(f.done() for f in first) and time.monotonic() < deadline:
                    time.sleep(0.01)
                seen.append(bool(first) and all(f.done() and f.result().error is None for f in first))
            return super().get(spec)

    loads: list[str] = []
    real_load = feed_module.load
    monkeypatch.setattr(feed, "_load_image", lambda uri, *a: loads.append(uri) or real_load(uri, *a))
    monkeypatch.setattr("workers.models.loader.PredictorCache", SlowBuild)
    uris = _photo_copies(tmp_path / "in", 3)
    before = feed.started_early
    _, rows = run([str(tmp_path / "in")], ModelSpec(weights="none", batch_size=2, input_shape=SIZE),
                  str(tmp_path / "out.parquet"), shard_size=4, progress=False)
    assert seen == [True], "shard 0's first batch was decoded before the model was ready"
    assert feed.started_early - before == 4, "every shard, the first one too, started early"
    assert sorted(loads) == uris, "each image was read once"
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert rows == 15 and list(frame["uri"]) == uris and frame["error"].isna().all()


def test_run_in_keras_mode_does_not_decode_while_the_model_is_built(tmp_path, monkeypatch):
    """``--decode keras`` imports Keras in the decode threads; TensorFlow imported from two threads at once
    can deadlock (it did, in CI), so keras mode waits for the model."""
    from producer.embedded import run
    from tests.fakes import SIZE, FakeCache
    from workers.feed import feeder
    from workers.settings import Settings

    feed = feeder(Settings.from_env().io_threads)
    announced_at_build: list[int] = []

    class Build(FakeCache):
        def get(self, spec):
            announced_at_build.append(len(feed._announced))
            return super().get(spec)

    monkeypatch.setattr("workers.models.loader.PredictorCache", Build)
    uris = _photo_copies(tmp_path / "in", 3)
    before = feed.started_early
    _, rows = run([str(tmp_path / "in")], ModelSpec(weights="none", batch_size=2, input_shape=SIZE, decode="keras"),
                  str(tmp_path / "out.parquet"), shard_size=4, progress=False)
    assert announced_at_build[0] == 0, "nothing was loading while the model was built"
    assert feed.started_early - before == 3, "shards 1, 2 and 3 still load while the one before them runs"
    assert rows == len(uris) == 15
