"""Every Keras backend: device-side preprocessing, ``--precision``, and JAX (and PyTorch where installed) runs
that match TensorFlow without importing it.

Tests marked ``backends`` run in this process on whatever ``KERAS_BACKEND`` it has; ``scripts/test`` runs
them again under ``KERAS_BACKEND=jax``. The others start ``batchinfer run`` and ``celery -A workers worker``
subprocesses on each backend, with a ``tensorflow`` tripwire first on their path: a stub package that
records any attempt to import it (and fails it, as on a machine without TensorFlow).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS, ROOT, Worker, assert_one_line_error, collect, submit
from workers.contract import ModelSpec
from workers.models.predictor import MODEL_INPUT, PIXELS, host_batch

PHOTO_PATHS = sorted(PHOTOS.iterdir())
# the level test_precision_agreement_on_real_photos holds float16 and bfloat16 to (100 % measured on its 20 views)
MIN_AGREEMENT = 0.95


def keras_photos(size: int) -> np.ndarray:
    """The photos as ``--decode keras`` gives them: float32 whole numbers, load_img's nearest resize."""
    from workers.decode import decode_keras

    return np.stack([decode_keras(p.read_bytes(), (size, size)).array for p in PHOTO_PATHS])


# --- the host keeps uint8 -----------------------------------------------------------------------------------


def test_host_batch_is_uint8_whenever_that_is_exact():
    u8 = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert host_batch(u8) is u8
    for whole in (u8.astype(np.float32), u8.astype(np.float64), u8.astype(np.int64)):
        got = host_batch(whole)
        assert got.dtype == np.uint8 and np.array_equal(got, u8)
    for kept in (u8 + np.float32(0.5), u8.astype(np.float32) - 1, u8.astype(np.float32) + 200):  # fraction, <0, >255
        got = host_batch(kept)
        assert got.dtype == np.float32 and np.array_equal(got, kept)


# --- the device casts and preprocesses: the float path's input, bit for bit ----------------------------------


FAMILIES = ["ResNet50", "MobileNetV2", "DenseNet121", "EfficientNetB0", "MobileNetV3Small", "EfficientNetLite0"]


@pytest.mark.backends
@pytest.mark.parametrize("name", FAMILIES)  # caffe, tf, torch, none, a rescaling layer inside, our own
def test_uint8_on_the_device_is_the_float_path(name):
    from workers.models.loader import build_predictor
    from workers.models.registry import get_architecture

    x = keras_photos(64)
    predictor = build_predictor(ModelSpec(name=name, weights="none", task="classify,features", decode="keras",
                                          input_shape=(64, 64), batch_size=8), expose_inputs=True)
    sent = predictor.preprocess(x)
    assert sent.dtype == np.uint8 and np.array_equal(sent, x), "a quarter of the bytes, the same pixels"
    out = predictor.predict(sent)
    assert out[PIXELS].dtype == np.float32
    np.testing.assert_array_equal(out[PIXELS], x)  # the device's float32 pixels are the float path's, exactly
    want = importlib.import_module(get_architecture(name).module).preprocess_input(x.copy())
    np.testing.assert_array_equal(out[MODEL_INPUT], want)  # and so is the model's input (PixelTable)
    floats = predictor.predict(x + np.float32(0))  # a float32 batch: preprocess_input's arithmetic on the device
    np.testing.assert_array_equal(floats[PIXELS], out[PIXELS])
    np.testing.assert_allclose(floats[MODEL_INPUT], want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
    np.testing.assert_array_equal(floats["top_k_indices"], out["top_k_indices"])
    np.testing.assert_allclose(floats["top_k_scores"], out["top_k_scores"], atol=1e-5)
    feats = out["features"]
    np.testing.assert_allclose(floats["features"], feats, rtol=1e-4, atol=1e-4 * float(np.abs(feats).max()))


def test_a_pixel_table_is_the_numpy_preprocessing_exactly():
    from keras.applications import imagenet_utils

    from workers.models.predictor import PixelTable

    x = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    for mode, source in (("caffe", (2, 1, 0)), ("tf", (0, 1, 2)), ("torch", (0, 1, 2))):
        def pre(a, mode=mode):
            return imagenet_utils.preprocess_input(a, mode=mode)

        table = PixelTable.of(pre)
        assert table is not None and table.source == source and not table.identity
        got = table.values[x[..., list(source)].astype(np.int32) + np.arange(3) * 256]
        np.testing.assert_array_equal(got, pre(x.astype(np.float32)))
    assert PixelTable.of(lambda a: a).identity
    assert PixelTable.of(lambda a: a - a.mean(axis=(1, 2), keepdims=True)) is None, "not per pixel: no table"


@pytest.mark.backends
def test_a_custom_models_sidecar_preprocessing_runs_on_the_device(tmp_path):
    from keras.applications import imagenet_utils

    from tests import custom_models
    from workers.models.loader import build_predictor

    path = tmp_path / "model.keras"
    custom_models.build().save(path)
    (tmp_path / "model.keras.json").write_text(json.dumps({"preprocess": "caffe"}))
    predictor = build_predictor(ModelSpec(model_path=str(path), decode="keras", batch_size=8, top_k=3),
                                expose_inputs=True)
    assert predictor.preprocess_name == "caffe"
    x = keras_photos(48)
    out = predictor.predict(predictor.preprocess(x))
    np.testing.assert_array_equal(out[PIXELS], x)
    np.testing.assert_array_equal(out[MODEL_INPUT], imagenet_utils.preprocess_input(x.copy(), mode="caffe"))


class DLPackOnly:
    """Another framework's tensor, seen only through the DLPack protocol."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def aligned(x: np.ndarray, to: int = 64) -> np.ndarray:
    """A copy of ``x`` at an address that is a multiple of ``to`` (as a device allocator's; TensorFlow needs it)."""
    raw = np.empty(x.nbytes + to, np.uint8)
    start = -raw.ctypes.data % to
    out = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


@pytest.mark.backends
def test_predict_takes_a_device_tensor_or_dlpack():
    import keras

    from workers.models.backends import from_dlpack
    from workers.models.loader import build_predictor

    predictor = build_predictor(ModelSpec(name="MobileNetV2", weights="none", task="classify,features",
                                          input_shape=(64, 64), batch_size=8))
    x = aligned(keras_photos(64).astype(np.uint8)[:3])  # fewer than the batch: padded where the batch is
    want = predictor.predict(x)
    for given in (keras.ops.convert_to_tensor(x), from_dlpack(DLPackOnly(x)), DLPackOnly(x)):
        got = predictor.predict(given)
        assert sorted(got) == sorted(want)
        for column, value in want.items():
            np.testing.assert_array_equal(got[column], value, err_msg=f"{type(given).__name__} {column}")
    with pytest.raises(ValueError, match="compiled for"):
        predictor.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        predictor.predict([[0]])


# --- --precision --------------------------------------------------------------------------------------------


def test_precision_is_part_of_the_model_identity():
    spec = ModelSpec()
    assert spec.precision == "float32"
    assert ModelSpec.from_dict({"name": "MobileNetV2"}).precision == "float32", "messages from before the option"
    assert ModelSpec(precision="bfloat16").cache_key() != spec.cache_key()


def test_precision_metadata_and_incremental_check():
    from producer.incremental import differences

    spec = ModelSpec(name="MobileNetV2", weights="none", precision="bfloat16")
    base = {"task": "classify", "layers": [], "decode": "fast", "top_k": 5, "model": "MobileNetV2",
            "weights": "none"}
    assert differences({**base, "precision": "bfloat16"}, spec) == []
    assert differences(base, spec) == ["precision='float32' there, 'bfloat16' here"]  # older outputs: float32


def test_an_unknown_precision_is_one_argparse_line(cli, tmp_path):
    result = cli("run", str(PHOTOS), "--precision", "float8", "--output", str(tmp_path / "x.csv"))
    line = assert_one_line_error(result, "--precision")
    assert "float32" in line and "bfloat16" in line


@pytest.mark.backends
def test_precision_agreement_on_real_photos(tmp_path, monkeypatch):
    """EfficientNetLite0 (real ImageNet weights) in float16 and bfloat16 names the same top class as in float32.

    Measured on 2026-11-24 (2-core CPU): 100 % of these 20 views for both, on TensorFlow and on JAX (on 160
    views, README: float16 99.4 %, bfloat16 95.6 % on TensorFlow and 98.1 % on JAX); the bound leaves one
    view of slack for CPUs whose 16-bit arithmetic rounds differently.
    """
    sys.path.insert(0, str(ROOT / "scripts"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # converts the shipped checkpoint once, no download
    try:
        precision = importlib.import_module("precision")
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    x = precision.views(3)
    base, base_scores, _ = precision.classify(x, "float32")
    for dtype, score_change in (("float16", 0.02), ("bfloat16", 0.1)):
        got, scores, _ = precision.classify(x, dtype)
        agreement = float((got[:, 0] == base[:, 0]).mean())
        assert agreement >= MIN_AGREEMENT, (dtype, agreement)
        assert np.abs(scores[:, 0] - base_scores[:, 0]).max() < score_change, dtype
        assert scores.dtype == np.float32 and got.dtype == np.int32, "the output schema does not change"


@pytest.mark.backends
def test_own_model_at_a_lower_precision(tmp_path):
    """A saved model's layers keep their saved dtype policy: --precision rebuilds them in 16 bits."""
    from tests import custom_models
    from workers.models.loader import build_predictor

    custom_models.build().save(tmp_path / "model.keras")
    x = keras_photos(48).astype(np.uint8)
    out = {}
    for precision in ("float32", "bfloat16"):
        spec = ModelSpec(model_path=str(tmp_path / "model.keras"), batch_size=8, top_k=3, precision=precision)
        out[precision] = build_predictor(spec).predict(x)
    np.testing.assert_array_equal(out["bfloat16"]["top_k_indices"][:, 0], out["float32"]["top_k_indices"][:, 0])
    assert out["bfloat16"]["top_k_scores"].dtype == np.float32
    differ = np.abs(out["bfloat16"]["top_k_scores"] - out["float32"]["top_k_scores"]).max()
    assert 0 < differ < 0.05, "computed in bfloat16 (not float32), close to float32"


# --- a backend that is not there ----------------------------------------------------------------------------


def test_an_unsupported_backend_is_one_line(cli, tmp_path):
    result = cli("run", str(PHOTOS), "--output", str(tmp_path / "x.csv"), env={"KERAS_BACKEND": "numpy"})
    assert_one_line_error(result, "KERAS_BACKEND=numpy is not supported")


def test_a_worker_on_an_unsupported_backend_exits_in_one_line(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "celery"), "-A", "workers", "worker"], cwd=tmp_path,
                          env={**os.environ, "KERAS_BACKEND": "numpy", "BATCHINFER_BROKER_URL": "redis://127.0.0.1:1/0",
                               "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("batchinfer")]
    assert errors == ["batchinfer worker: error: KERAS_BACKEND=numpy is not supported: use tensorflow, jax, torch"]
    assert proc.stderr.strip().endswith(errors[0])
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed here")
def test_a_backend_that_is_not_installed_is_one_line(cli, tmp_path):
    result = cli("run", str(PHOTOS), "--output", str(tmp_path / "x.csv"), env={"KERAS_BACKEND": "torch"})
    assert_one_line_error(result, "KERAS_BACKEND=torch needs torch", "keras-batch-inference[torch]")


# --- real runs on each backend, against TensorFlow's rows ---------------------------------------------------


@pytest.fixture(scope="module")
def tripwire(tmp_path_factory) -> tuple[str, Path]:
    """(a folder with a ``tensorflow`` stub, the file it writes the importer's stack to)."""
    folder = tmp_path_factory.mktemp("tripwire")
    marker = folder / "tensorflow-imported.txt"
    (folder / "tensorflow").mkdir()
    (folder / "tensorflow" / "__init__.py").write_text(
        "import traceback\n"
        f"with open({str(marker)!r}, 'a') as fh:\n"
        "    fh.write(''.join(traceback.format_stack()) + '\\n')\n"
        "raise ImportError('tensorflow must not be imported on this backend')\n")
    return str(folder), marker


def backend_env(backend: str, tripwire: tuple[str, Path], keras_home: Path) -> dict[str, str]:
    env = {"KERAS_BACKEND": backend, "KERAS_HOME": str(keras_home)}
    if backend != "tensorflow":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tripwire[0], str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m producer.cli`` (a venv without the ``batchinfer`` script, e.g. PyTorch's, runs it too)."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 or not check, proc.stderr[-3000:]
    return proc


RUN = ("--model", "EfficientNetLite0", "--task", "classify,features", "--decode", "keras", "--batch-size", "4",
       "--quiet")


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keras_home")


@pytest.fixture(scope="module")
def tensorflow_rows(tmp_path_factory, tripwire, keras_home) -> pd.DataFrame:
    """The photos through EfficientNetLite0 (real ImageNet weights) on TensorFlow, as ``batchinfer run`` writes."""
    out = tmp_path_factory.mktemp("tf") / "rows.parquet"
    run_cli("run", str(PHOTOS), *RUN, "--output", str(out), env=backend_env("tensorflow", tripwire, keras_home))
    return pd.read_parquet(out)


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """The parity tests' tolerances: scores to 1e-4, features to 1e-3 of their scale, the same classes."""
    assert list(got["uri"]) == list(want["uri"]) and got["error"].isna().all()
    assert list(got["label"]) == list(want["label"])
    np.testing.assert_array_equal(np.stack(got["top_k_indices"]), np.stack(want["top_k_indices"]))
    np.testing.assert_allclose(np.stack(got["top_k_scores"]), np.stack(want["top_k_scores"]), atol=1e-4)
    feats = np.stack(want["features"])
    np.testing.assert_allclose(np.stack(got["features"]), feats, rtol=1e-3, atol=1e-3 * float(np.abs(feats).max()))


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=needs("jax")),
                                     pytest.param("torch", marks=needs("torch"))])
def test_run_matches_tensorflow_without_importing_it(backend, tensorflow_rows, tripwire, keras_home, tmp_path):
    out = tmp_path / "rows.parquet"
    run_cli("run", str(PHOTOS), *RUN, "--output", str(out), env=backend_env(backend, tripwire, keras_home))
    assert not tripwire[1].exists(), tripwire[1].read_text()
    assert_same_rows(pd.read_parquet(out), tensorflow_rows)
    meta = json.loads(pq.read_schema(out).metadata[b"batchinfer"])
    assert meta["precision"] == "float32" and meta["preprocess"] == "tf"


@needs("jax")
def test_jax_takes_gpu_memory_as_it_needs_it(tripwire, keras_home):
    """XLA preallocates 75 % of a GPU at start; a worker turns that off (as TensorFlow's memory growth) so that
    several processes, or the model and ``--decode gpu``'s torchvision, share a card, unless the user said."""
    code = ("import os; from workers.models import backends; backends.load(); "
            "import jax; print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'), jax.__name__)")
    env = {**os.environ, **backend_env("jax", tripwire, keras_home)}
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    for given, want in ((None, "false jax"), ("true", "true jax")):
        if given:
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = given
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.split() == want.split()
    assert not tripwire[1].exists(), tripwire[1].read_text()


@needs("jax")
def test_own_model_files_on_jax_without_tensorflow(tripwire, keras_home, tmp_path):
    """.keras and legacy .h5 models run (Keras's deserialisation of a .h5 would import TensorFlow to look for
    its ``TensorShape``, were it not kept out); a SavedModel is one line."""
    from tests import custom_models

    model = custom_models.build()
    want = custom_models.reference(model, PHOTO_PATHS)
    env = backend_env("jax", tripwire, keras_home)
    for name in ("model.keras", "model.h5"):
        model.save(tmp_path / name)
        run_cli("run", str(PHOTOS), "--model-path", str(tmp_path / name), "--decode", "keras", "--top-k", "1",
                "--output", str(tmp_path / f"{name}.parquet"), "--quiet", env=env)
        assert not tripwire[1].exists(), tripwire[1].read_text()
        rows = pd.read_parquet(tmp_path / f"{name}.parquet")
        np.testing.assert_allclose(np.stack(rows["top_k_scores"])[:, 0], want.max(axis=1), atol=1e-4)

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    result = run_cli("run", str(PHOTOS), "--model-path", str(saved), "--output", str(tmp_path / "x.csv"), env=env,
                     check=False)
    assert_one_line_error(result, "TensorFlow SavedModel", "KERAS_BACKEND=tensorflow")


@needs("jax")
def test_celery_worker_on_jax_matches_tensorflow(redis_url, tripwire, keras_home, tensorflow_rows, tmp_path):
    env = backend_env("jax", tripwire, keras_home)
    worker = Worker(redis_url, tmp_path / "worker.log", cwd=tmp_path, extra_env=env)
    try:
        job = submit(str(PHOTOS), *RUN[:-1], "--output", str(tmp_path / "out"), broker=redis_url)
        collect(job, tmp_path / "rows.parquet", broker=redis_url, timeout=300)
    finally:
        worker.stop()
    assert not tripwire[1].exists(), tripwire[1].read_text()
    assert "on jax" in worker.text() and "Traceback" not in worker.text()
    assert_same_rows(pd.read_parquet(tmp_path / "rows.parquet"), tensorflow_rows)
