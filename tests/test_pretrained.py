"""A real ImageNet model offline: EfficientNet-Lite0 labels real photos correctly through a real worker."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import PHOTOS, Worker, batchinfer, collect, submit

CATS = {"tabby", "tiger_cat", "Persian_cat", "Siamese_cat", "Egyptian_cat"}
COFFEE = {"espresso", "cup", "coffee_mug"}
ROCKET = {"missile", "projectile", "space_shuttle"}
MOTORBIKE = {"moped", "motor_scooter", "crash_helmet"}
# file -> (classes that must be in the top 5, whether the top-1 must be one of them)
EXPECTED = {"cat.jpg": (CATS, True), "coffee.jpg": (COFFEE, True), "rocket.jpg": (ROCKET, False),
            "motorcycle.png": (MOTORBIKE, True), "chelsea.png": (CATS, True), "skimage-coffee.png": (COFFEE, True),
            "skimage-rocket.jpg": (ROCKET, False)}


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    return tmp_path_factory.mktemp("keras-home")


@pytest.fixture(scope="module")
def lite_worker(redis_url, keras_home, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite-worker")
    w = Worker(redis_url, folder / "worker.log", cwd=folder, extra_env={"KERAS_HOME": str(keras_home)})
    yield w
    w.stop()


def photos(folder: Path) -> Path:
    for p in PHOTOS.iterdir():
        shutil.copy(p, folder / p.name)
    skimage = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    shutil.copy(skimage / "chelsea.png", folder / "chelsea.png")
    shutil.copy(skimage / "coffee.png", folder / "skimage-coffee.png")
    shutil.copy(skimage / "rocket.jpg", folder / "skimage-rocket.jpg")
    return folder


def test_lite0_labels_real_photos_through_a_worker(lite_worker, redis_url, redis_client, keras_home, tmp_path):
    folder = photos(tmp_path / "in") if (tmp_path / "in").mkdir() is None else None
    job = submit(str(folder), "--model", "EfficientNetLite0", "--output", str(tmp_path / "shards"),
                 broker=redis_url)
    out = tmp_path / "labels.parquet"
    collect(job, out, broker=redis_url, timeout=300)
    frame = pd.read_parquet(out)
    frame["file"] = frame["uri"].map(lambda u: Path(u).name)
    rows = frame.set_index("file")
    for name, (classes, top1) in EXPECTED.items():
        labels = list(rows.loc[name, "top_k_labels"])
        assert classes & set(labels), f"{name}: {labels}"
        if top1:
            assert labels[0] in classes, f"{name}: top-1 {labels[0]}"
    assert rows.loc["coffee.jpg", "score"] > 0.5 and rows.loc["cat.jpg", "score"] > 0.5, "confident labels"
    # the first use converted the checkpoint once into the Keras cache; a second job loads the cache
    assert (keras_home / "models" / "efficientnet_lite0_imagenet.weights.h5").exists()
    assert lite_worker.text().count("converting") == 1


def test_conversion_is_cached_across_processes(keras_home, tmp_path):
    import os

    env_before = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(keras_home)
    try:
        cached = keras_home / "models" / "efficientnet_lite0_imagenet.weights.h5"
        if not cached.exists():  # this test may run alone
            batchinfer("run", str(PHOTOS / "cat.jpg"), "--model", "EfficientNetLite0", "-o", str(tmp_path / "a.csv"),
                       "-q")
        mtime = cached.stat().st_mtime_ns
        proc = batchinfer("run", str(PHOTOS / "cat.jpg"), "--model", "EfficientNetLite0", "-o",
                          str(tmp_path / "b.csv"), "-q")
        assert cached.stat().st_mtime_ns == mtime and "converting" not in proc.stderr
        assert pd.read_csv(tmp_path / "b.csv")["label"][0] in CATS
    finally:
        if env_before is None:
            os.environ.pop("KERAS_HOME", None)
        else:
            os.environ["KERAS_HOME"] = env_before
