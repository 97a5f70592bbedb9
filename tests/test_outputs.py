"""Output options: classify and features from one pass, several layers, unpooled maps, non-square inputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS
from workers.attempt import run_shard
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.jobstate import MemoryJobStore
from workers.models.loader import PredictorCache

URIS = [str(p) for p in sorted(PHOTOS.iterdir())]
CACHE = PredictorCache(maxsize=4)


def run(spec: ModelSpec, out) -> tuple:
    store = MemoryJobStore()
    store.create_job("j", {})
    run_shard(ShardTask("j", 0, URIS, spec, OutputSpec(path=str(out))), store, CACHE.get)
    table = pq.read_table(out / "shard-000000.parquet")
    return table, json.loads(table.schema.metadata[b"batchinfer"])


def test_classify_and_features_in_one_pass_equal_separate_runs(tmp_path):
    base = dict(name="ResNet50", weights="none", input_shape=(64, 64), batch_size=8)
    both, meta = run(ModelSpec(task="classify,features", **base), tmp_path / "both")
    only_c, _ = run(ModelSpec(task="classify", **base), tmp_path / "c")
    only_f, _ = run(ModelSpec(task="features", **base), tmp_path / "f")
    assert {"label", "top_k_scores", "features"} <= set(both.column_names)
    assert both.column("top_k_indices").to_pylist() == only_c.column("top_k_indices").to_pylist()
    np.testing.assert_allclose(both.column("top_k_scores").to_pylist(), only_c.column("top_k_scores").to_pylist(),
                               atol=1e-6)
    np.testing.assert_allclose(both.column("features").to_pylist(), only_f.column("features").to_pylist(),
                               rtol=1e-5, atol=1e-6)
    assert meta["task"] == "classify,features" and meta["feature_columns"] == {"features": 2048}


def test_several_layers_each_their_own_column(tmp_path):
    spec = ModelSpec(name="VGG16", weights="none", task="features", layers=("block3_pool", "block4_pool"),
                     input_shape=(64, 64), pooling="max", batch_size=8)
    table, meta = run(spec, tmp_path)
    assert table.schema.field("features_block3_pool").type.list_size == 256
    assert table.schema.field("features_block4_pool").type.list_size == 512
    assert "features" not in table.column_names
    single, _ = run(ModelSpec(name="VGG16", weights="none", task="features", layers=("block4_pool",),
                              input_shape=(64, 64), pooling="max", batch_size=8), tmp_path / "one")
    np.testing.assert_allclose(table.column("features_block4_pool").to_pylist(),
                               single.column("features").to_pylist(), rtol=1e-5, atol=1e-6)
    assert meta["layers"] == ["block3_pool", "block4_pool"]


def test_pooling_none_keeps_the_map_flattened_with_its_shape(tmp_path):
    spec = ModelSpec(name="MobileNetV2", weights="none", task="features", pooling="none",
                     input_shape=(64, 96), batch_size=8)
    table, meta = run(spec, tmp_path)
    assert meta["feature_shapes"]["features"] == [2, 3, 1280]
    assert table.schema.field("features").type.list_size == 2 * 3 * 1280
    avg, _ = run(ModelSpec(name="MobileNetV2", weights="none", task="features", pooling="avg",
                           input_shape=(64, 96), batch_size=8), tmp_path / "avg")
    maps = np.array(table.column("features").to_pylist()).reshape(len(URIS), 2, 3, 1280)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), np.array(avg.column("features").to_pylist()),
                               rtol=1e-4, atol=1e-5)
    assert meta["input_size"] == [64, 96]


def test_non_square_input_is_what_the_model_sees(tmp_path):
    _, meta = run(ModelSpec(name="DenseNet121", weights="none", task="features", input_shape=(96, 64),
                            batch_size=8), tmp_path)
    assert meta["input_size"] == [96, 64] and meta["feature_columns"] == {"features": 1024}


@pytest.mark.parametrize("preprocess", ["none", "caffe", "torch", "ResNet50"])
def test_preprocess_override_changes_the_input(preprocess, tmp_path):
    from workers.models.preprocess import preprocess_function

    x = np.full((1, 2, 2, 3), 128.0, dtype=np.float32)
    y = preprocess_function(preprocess, "MobileNetV2")(x.copy())
    if preprocess == "none":
        np.testing.assert_array_equal(y, x)
    else:
        assert not np.allclose(y, x)
