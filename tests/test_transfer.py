"""The Keras transfer-learning flow at scale: features job -> train-head -> classify job, via a real worker."""

from __future__ import annotations

import json
import os

import pandas as pd

from tests.conftest import batchinfer, collect, submit
from tests.shapes import make_shapes


def test_features_train_head_classify_reaches_90_percent(worker, redis_url, redis_client, tmp_path):
    make_shapes(tmp_path / "train", per_class=20, seed=0)
    make_shapes(tmp_path / "holdout", per_class=10, seed=1)

    # 1. a features job through the worker (VGG16 with seeded random weights: no download needed)
    job = submit(str(tmp_path / "train"), "--model", "VGG16", "--weights", "none", "--task", "features",
                 "--input-size", "64", "--output", str(tmp_path / "f-shards"), broker=redis_url)
    features = tmp_path / "features.parquet"
    collect(job, features, broker=redis_url)

    # 2. train a head on the features; labels from the parent folder names
    model = tmp_path / "shapes.keras"
    trained = batchinfer("train-head", str(features), "--output", str(model))
    assert model.exists() and "3 classes: circle, square, triangle" in trained.stderr
    sidecar = json.loads((tmp_path / "shapes.keras.json").read_text())
    assert sidecar["labels"] == ["circle", "square", "triangle"]
    assert sidecar["preprocess"] == "caffe", "VGG16's own: the caffe family"

    # 3. classify held-out images through the worker with the complete model and its own labels
    job = submit(str(tmp_path / "holdout"), "--model-path", str(model), "--output", str(tmp_path / "c"),
                 broker=redis_url)
    result = tmp_path / "pred.csv"
    collect(job, result, broker=redis_url)
    frame = pd.read_csv(result)
    truth = frame["uri"].map(lambda u: os.path.basename(os.path.dirname(u)))
    assert len(frame) == 30 and frame["error"].isna().all()
    accuracy = float((truth == frame["label"]).mean())
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.2f}"


def test_train_head_labels_from_csv_and_bad_input(tmp_path):
    make_shapes(tmp_path / "imgs", per_class=4, seed=2)
    features = tmp_path / "f.parquet"
    batchinfer("run", str(tmp_path / "imgs"), "--model", "VGG16", "--weights", "none", "--task", "features",
               "--input-size", "48", "--output", str(features), "--quiet")
    frame = pd.read_parquet(features)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"uri": frame["uri"], "label": ["odd" if i % 2 else "even" for i in range(len(frame))]}).to_csv(
        labels, index=False)
    out = batchinfer("train-head", str(features), "--labels-from", str(labels), "--output", str(tmp_path / "m.keras"),
                     "--head", "dense", "--epochs", "20")
    assert "2 classes: even, odd" in out.stderr
    bad = batchinfer("train-head", str(labels), "--output", str(tmp_path / "x.keras"), check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
