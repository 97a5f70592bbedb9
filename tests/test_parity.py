"""Parity with the seeds' reference path, for every architecture the seed documents name.

Reference: ``load_img(target_size)`` -> ``img_to_array`` -> ``preprocess_input`` -> ``model.predict``.
Ours: the shard pipeline with ``--decode keras`` and the weights loaded from a local file, on whatever
``KERAS_BACKEND`` the tests run with (``scripts/test`` runs the ``backends``-marked ones on JAX too).
"""

from __future__ import annotations

import gc

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS
from tests.weights import constructor, make_weights, reference_inputs
from workers.attempt import run_shard
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.jobstate import MemoryJobStore
from workers.models.loader import PredictorCache
from workers.models.registry import SEED_ARCHITECTURES, get_architecture, model_info

PHOTO_PATHS = sorted(PHOTOS.iterdir())
BATCH = len(PHOTO_PATHS)  # one batch per shard
HEAVY = ("NASNetLarge", "InceptionResNetV2", "DenseNet201", "NASNetMobile", "ResNet152", "ResNet152V2",
         "DenseNet169", "VGG19")  # over 30 s each on 2 cores, the slowest first
# the heavy ones first: scripts/test runs these tests on two pytest workers, and a long test last leaves one idle
NAMES = sorted((a.name for a in SEED_ARCHITECTURES.values()),
               key=lambda name: HEAVY.index(name) if name in HEAVY else len(HEAVY))


def _run(spec: ModelSpec, out) -> pq.Table:
    store = MemoryJobStore()
    store.create_job("parity", {})
    task = ShardTask("parity", 0, [str(p) for p in PHOTO_PATHS], spec, OutputSpec(path=str(out)))
    run_shard(task, store, PredictorCache(1).get)
    return pq.read_table(out / "shard-000000.parquet")


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    import keras

    keras.backend.clear_session()
    gc.collect()


ON_EVERY_BACKEND = {"MobileNetV2"}  # marked ``backends``: scripts/test runs it again under KERAS_BACKEND=jax


def _marks(name: str) -> list[pytest.MarkDecorator]:
    return [mark for mark, names in ((pytest.mark.slow, HEAVY), (pytest.mark.backends, ON_EVERY_BACKEND))
            if name in names]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in NAMES])
def test_classify_and_features_match_reference(name, weights_dir, tmp_path):
    import keras

    arch = get_architecture(name)
    full, notop = make_weights(name, weights_dir, PHOTO_PATHS)
    ctor = constructor(name)
    x = reference_inputs(PHOTO_PATHS, arch.default_size, arch.module)
    shape = (arch.default_size, arch.default_size, 3)  # NASNetLarge(include_top=False) needs it to build its graph
    try:
        reference = ctor(weights=None, include_top=True, input_shape=shape)
        reference.load_weights(str(full))
        probs = reference.predict(x, verbose=0)
        swapped = reference.predict(x[..., ::-1], verbose=0)
        del reference
        assert probs.max() > 0.05, "weights are informative: the softmax is not flat"
        assert len(set(probs.argmax(axis=1))) > 1, "the photos get different top classes"
        assert np.abs(swapped - probs).max() > 1e-2, "an RGB/BGR mix-up would fail the 1e-4 comparison"

        table = _run(ModelSpec(name=name, weights=str(full), task="classify", decode="keras", batch_size=BATCH,
                               top_k=5), tmp_path / "classify")
        assert table.column("error").null_count == len(PHOTO_PATHS)
        want_idx = np.argsort(-probs, axis=1)[:, :5]
        got_idx = np.array(table.column("top_k_indices").to_pylist())
        got_scores = np.array(table.column("top_k_scores").to_pylist())
        np.testing.assert_allclose(got_scores, np.take_along_axis(probs, got_idx, 1), atol=1e-4)
        np.testing.assert_allclose(got_scores, np.take_along_axis(probs, want_idx, 1), atol=1e-4)

        keras.backend.clear_session()
        base = ctor(weights=None, include_top=False, input_shape=shape, pooling="avg")
        base.load_weights(str(notop))
        feats = base.predict(x, verbose=0)
        del base
        assert feats.shape == (len(PHOTO_PATHS), model_info(arch)["feature_dim"])
        assert np.abs(feats).max() > 0 and feats.std(axis=0).max() > 0, "features vary between photos"
        # features must work from either weights file: the no-top one and the full model's
        for weights in (notop, full):
            table = _run(ModelSpec(name=name, weights=str(weights), task="features", decode="keras",
                                   batch_size=BATCH), tmp_path / f"features-{weights.stem}")
            got = np.array(table.column("features").to_pylist(), dtype=np.float32)
            assert got.shape == feats.shape
            np.testing.assert_allclose(got, feats, rtol=1e-3, atol=1e-3 * float(np.abs(feats).max()))
    finally:
        if name != "VGG16":  # VGG16's no-top file serves the next test; full files are big (VGG19: 570 MB)
            notop.unlink(missing_ok=True)
        full.unlink(missing_ok=True)


def test_vgg16_intermediate_layer(weights_dir, tmp_path):
    """``--layer block4_pool`` equals ``Model(inputs, get_layer('block4_pool').output)`` pooled."""
    import keras

    arch = get_architecture("VGG16")
    _, notop = make_weights("VGG16", weights_dir, PHOTO_PATHS, full=False)
    base = keras.applications.VGG16(weights=None, include_top=False)
    base.load_weights(str(notop))
    sub = keras.Model(base.input, base.get_layer("block4_pool").output)
    x = reference_inputs(PHOTO_PATHS, 224, arch.module)
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        want = reduce(sub.predict(x, verbose=0), axis=(1, 2))
        table = _run(ModelSpec(name="VGG16", weights=str(notop), task="features", layers=("block4_pool",),
                               pooling=pooling, decode="keras", batch_size=BATCH), tmp_path / pooling)
        got = np.array(table.column("features").to_pylist(), dtype=np.float32)
        assert got.shape == (len(PHOTO_PATHS), 512)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
