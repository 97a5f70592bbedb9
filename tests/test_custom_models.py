"""Your own models (.keras, .h5 with custom objects, SavedModel) classify through a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests import custom_models
from tests.conftest import BIN, PHOTOS, Worker, batchinfer, collect, submit

IMAGES = sorted(PHOTOS.iterdir())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return custom_models.save_all(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def worker(redis_url, saved, tmp_path_factory):
    """A worker that trusts this module's model folder: a SavedModel runs its own graph, so it is refused
    unless the worker's BATCHINFER_TRUST_MODELS names its folder (tests/test_security.py)."""
    folder = tmp_path_factory.mktemp("worker")
    w = Worker(redis_url, folder / "worker.log", cwd=folder,
               extra_env={"BATCHINFER_TRUST_MODELS": str(saved["savedmodel"].parent)})
    yield w
    w.stop()


CUSTOM_MODULE = """
import keras

@keras.saving.register_keras_serializable(package="mylayers")
def clipped_relu(x):
    return keras.activations.relu(x, max_value=4.0)

CUSTOM_OBJECTS = {"clipped_relu": clipped_relu}
"""

BUILD = """
import keras, sys
sys.path.insert(0, sys.argv[2])
from mylayers import clipped_relu
keras.utils.set_random_seed(0)
inputs = keras.Input((32, 32, 3))
x = keras.layers.Conv2D(4, 3, activation=clipped_relu)(inputs)
x = keras.layers.GlobalAveragePooling2D()(x)
keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(sys.argv[1])
"""


def test_h5_with_operator_registered_custom_objects(tmp_path):
    """A model with a custom activation loads only where the operator registered it (env, not message)."""
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "mylayers.py").write_text(CUSTOM_MODULE)
    h5 = tmp_path / "custom.h5"
    subprocess.run([sys.executable, "-c", BUILD, str(h5), str(tmp_path / "mods")], check=True, capture_output=True,
                   cwd=tmp_path)
    args = ("run", str(PHOTOS / "cat.jpg"), "--model-path", str(h5), "--output", str(tmp_path / "o.csv"), "-q")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([str(BIN / "batchinfer"), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert plain.returncode != 0 and "clipped_relu" in plain.stderr and "Traceback" not in plain.stderr
    env.update(PYTHONPATH=str(tmp_path / "mods"), BATCHINFER_CUSTOM_OBJECTS="mylayers:CUSTOM_OBJECTS")
    ok = subprocess.run([str(BIN / "batchinfer"), *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert pd.read_csv(tmp_path / "o.csv")["label"].isin(["class_0", "class_1"]).all()


@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel"])
def test_own_model_classifies_through_worker_with_its_labels(kind, saved, worker, redis_url, redis_client,
                                                             tmp_path):
    job_id = submit(str(PHOTOS), "--model-path", str(saved[kind]), "--labels", str(saved["labels"]),
                    "--decode", "keras", "--top-k", "3", "--output", str(tmp_path / "shards"), broker=redis_url)
    out = tmp_path / "out.parquet"
    collect(job_id, out, broker=redis_url, timeout=300)
    frame = pd.read_parquet(out).set_index("uri")
    model = custom_models.build()
    want = custom_models.reference(model, IMAGES)
    for path, probs in zip(IMAGES, want):
        row = frame.loc[str(path)]
        assert pd.isna(row["error"])
        assert row["label"] == custom_models.LABELS[int(np.argmax(probs))]
        assert list(row["top_k_labels"]) == [custom_models.LABELS[i] for i in np.argsort(-probs)]
        np.testing.assert_allclose(row["top_k_scores"], np.sort(probs)[::-1], atol=1e-4)
    meta = json.loads(pq.read_schema(out).metadata[b"batchinfer"])
    assert meta["model"].startswith("custom:") and meta["weights_fingerprint"].startswith("sha256:")


def test_own_model_features_from_a_named_layer(saved, tmp_path):
    out = tmp_path / "f.parquet"
    batchinfer("run", str(PHOTOS), "--model-path", str(saved["keras"]), "--task", "features", "--layer", "dw",
               "--pooling", "max", "--output", str(out), "--quiet")
    frame = pd.read_parquet(out)
    assert {len(v) for v in frame["features"]} == {8}
    bad = batchinfer("run", str(PHOTOS), "--model-path", str(saved["keras"]), "--task", "features", "--layer",
                     "nope", "--output", str(tmp_path / "x.parquet"), "--quiet", check=False)
    assert bad.returncode != 0 and "Valid layers" in bad.stderr and "Traceback" not in bad.stderr
