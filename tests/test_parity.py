"""Parity with the seeds' reference path, for every architecture of the registry.

Reference: ``load_img(target_size)`` -> ``img_to_array`` -> ``preprocess_input`` -> ``model.predict``.
Ours: the shard pipeline with ``--decode keras`` and the weights loaded from a local file.
"""

from __future__ import annotations

import importlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS
from tests.weights import make_weights, reference_inputs
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.jobstate import MemoryJobStore
from workers.models.loader import PredictorCache
from workers.models.registry import ARCHITECTURES, get_architecture
from workers.pipeline import run_shard

PHOTO_PATHS = sorted(PHOTOS.iterdir())
NAMES = [a.name for a in ARCHITECTURES.values()]
HEAVY = {"VGG16", "InceptionV3", "DenseNet121"}


def _run(spec: ModelSpec, out) -> pq.Table:
    store = MemoryJobStore()
    store.create_job("parity", {})
    task = ShardTask("parity", 0, [str(p) for p in PHOTO_PATHS], spec, OutputSpec(path=str(out)))
    run_shard(task, store, PredictorCache(1).get)
    return pq.read_table(out / "shard-000000.parquet")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in NAMES])
def test_classify_and_features_match_reference(name, weights_dir, tmp_path):
    import keras

    arch = get_architecture(name)
    full, notop = make_weights(name, weights_dir, PHOTO_PATHS)
    ctor = getattr(importlib.import_module(arch.module), arch.constructor)
    x = reference_inputs(PHOTO_PATHS, arch.default_size, arch.module)

    reference = ctor(weights=None, include_top=True)
    reference.load_weights(str(full))
    probs = reference.predict(x, verbose=0)
    assert probs.max() > 0.05, "weights are informative: the softmax is not flat"

    table = _run(ModelSpec(name=name, weights=str(full), task="classify", decode="keras", batch_size=4,
                           top_k=5), tmp_path / "classify")
    assert table.column("error").null_count == len(PHOTO_PATHS)
    want_idx = np.argsort(-probs, axis=1)[:, :5]
    got_idx = np.array(table.column("top_k_indices").to_pylist())
    got_scores = np.array(table.column("top_k_scores").to_pylist())
    np.testing.assert_allclose(got_scores, np.take_along_axis(probs, got_idx, 1), atol=1e-4)
    np.testing.assert_allclose(got_scores, np.take_along_axis(probs, want_idx, 1), atol=1e-4)

    keras.backend.clear_session()
    base = ctor(weights=None, include_top=False, pooling="avg")
    base.load_weights(str(notop))
    feats = base.predict(x, verbose=0)
    assert np.abs(feats).max() > 0, "features are not all zero"
    # features must work from either weights file: the no-top one and the full model's
    for weights in (notop, full):
        table = _run(ModelSpec(name=name, weights=str(weights), task="features", decode="keras", batch_size=4),
                     tmp_path / f"features-{weights.stem}")
        got = np.array(table.column("features").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(got, feats, rtol=1e-3, atol=1e-3 * float(np.abs(feats).max()))


def test_vgg16_intermediate_layer(weights_dir, tmp_path):
    """``--layer block4_pool`` equals ``Model(inputs, get_layer('block4_pool').output)`` pooled."""
    import keras

    arch = get_architecture("VGG16")
    _, notop = make_weights("VGG16", weights_dir, PHOTO_PATHS)
    base = keras.applications.VGG16(weights=None, include_top=False)
    base.load_weights(str(notop))
    sub = keras.Model(base.input, base.get_layer("block4_pool").output)
    x = reference_inputs(PHOTO_PATHS, 224, arch.module)
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        want = reduce(sub.predict(x, verbose=0), axis=(1, 2))
        table = _run(ModelSpec(name="VGG16", weights=str(notop), task="features", layers=("block4_pool",),
                               pooling=pooling, decode="keras", batch_size=8), tmp_path / pooling)
        got = np.array(table.column("features").to_pylist(), dtype=np.float32)
        assert got.shape == (len(PHOTO_PATHS), 512)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
