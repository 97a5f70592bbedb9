"""``--decode gpu``: the per-image CPU fallback and the merge, without a GPU; the real torchvision calls on CPU.

The first half injects fake device operations (numpy arrays stand for device tensors) into ``BatchDecoder``
and ``process_shard``, so it runs everywhere, CI included. The second half runs the torchvision calls
themselves on the CPU (``decode_jpeg(device="cpu")``: the same call, without nvJPEG) where torch and
torchvision are installed, and compares them with the ``fast`` decoder; the agreement of nvJPEG itself is
measured on a GPU machine (``scripts/bench.py``).
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from tests.images import HOSTILE, TRICKY, _photo_like, make_image_folder
from workers import decode_gpu
from workers.contract import ModelSpec, OutputSpec, ShardTask
from workers.decode import decode_fast
from workers.decode_gpu import BatchDecoder, check_available
from workers.errors import ConfigError, DecodeError
from workers.jpeg_header import read_header
from workers.pipeline import process_shard
from workers.settings import Settings

PHOTOS = Path(__file__).parent / "data" / "photos"
SIZE = (24, 32)  # (height, width)


def _jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **params)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _bad_scan_jpeg() -> bytes:
    """Headers a JPEG reader accepts, scan data no decoder can: the start-of-scan names component 9."""
    data = bytearray(_jpeg(_photo_like()))
    sos = data.index(b"\xff\xda")
    data[sos + 5] = 9
    return bytes(data)


def _cpu_error(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_fast(data, SIZE)
    return str(info.value)


class FakeDevice:
    """``decode_many`` and ``stack`` over numpy: each decoded image is filled with its file's first
    distinguishing byte (``marks``), and files in ``refuse`` make the whole call fail, as nvJPEG does."""

    def __init__(self, refuse: tuple[bytes, ...] = ()) -> None:
        self.refuse = set(refuse)
        self.calls: list[int] = []
        self.marks: dict[bytes, int] = {}

    def mark(self, data: bytes, value: int) -> bytes:
        self.marks[data] = value
        return data

    def decode_many(self, datas: list[bytes], orientations: list[int]) -> list[np.ndarray]:
        self.calls.append(len(datas))
        if self.refuse & set(datas):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return [np.full((*SIZE, 3), self.marks.get(d, 7), np.uint8) for d in datas]

    def decoder(self) -> BatchDecoder:
        return BatchDecoder(SIZE, self.decode_many, np.stack)


# --- the JPEG header ---------------------------------------------------------------------------------------


def test_header_reads_size_coding_and_orientation(tmp_path):
    make_image_folder(tmp_path)
    rotated = read_header((tmp_path / "exif_rotated.jpg").read_bytes())
    assert rotated is not None and (rotated.width, rotated.height, rotated.orientation) == (48, 32, 6)
    assert rotated.gpu_decodable
    progressive = read_header(_jpeg(_photo_like(), progressive=True))
    assert progressive is not None and progressive.sof == 0xC2 and progressive.gpu_decodable
    cmyk = read_header((tmp_path / "cmyk.jpg").read_bytes())
    assert cmyk is not None and cmyk.components == 4 and not cmyk.gpu_decodable
    truncated = read_header((tmp_path / "truncated.jpg").read_bytes())
    assert truncated is not None and not truncated.complete and not truncated.gpu_decodable
    for name in ("gray.png", "text.jpg", "empty.jpg", "animated.gif"):
        assert read_header((tmp_path / name).read_bytes()) is None, name


# --- the fallback and the merge, with fake device operations ------------------------------------------------


def test_all_jpeg_batch_is_one_device_call_in_input_order():
    fake = FakeDevice()
    datas = [fake.mark(_jpeg(_photo_like(40 + i, 30)), 10 + i) for i in range(5)]
    batch = fake.decoder().decode(datas)
    assert fake.calls == [5]
    assert batch.on_device == 5 and batch.ok == [0, 1, 2, 3, 4] and batch.errors == [None] * 5
    assert batch.x.shape == (5, *SIZE, 3) and batch.x.dtype == np.uint8
    assert [int(img[0, 0, 0]) for img in batch.x] == [10, 11, 12, 13, 14]
    assert batch.sizes == [(40 + i, 30) for i in range(5)]


def test_mixed_png_and_jpeg_merge_in_input_order():
    fake = FakeDevice()
    png = _png(Image.new("RGB", (50, 40), (200, 100, 50)))
    datas = [fake.mark(_jpeg(_photo_like()), 1), png, fake.mark(_jpeg(_photo_like(80, 60)), 3), png]
    batch = fake.decoder().decode(datas)
    assert fake.calls == [2]  # the JPEGs only
    assert batch.on_device == 2 and batch.ok == [0, 1, 2, 3]
    assert batch.sizes == [(160, 120), (50, 40), (80, 60), (50, 40)]
    np.testing.assert_array_equal(batch.x[1], decode_fast(png, SIZE).array)
    np.testing.assert_array_equal(batch.x[3], decode_fast(png, SIZE).array)
    assert int(batch.x[0, 0, 0, 0]) == 1 and int(batch.x[2, 0, 0, 0]) == 3


def test_broken_jpeg_fails_the_batch_then_only_it_falls_back_and_is_the_cpu_decoders_error_row():
    bad = _bad_scan_jpeg()
    assert read_header(bad).gpu_decodable  # type: ignore[union-attr]  (its headers pass: only decoding tells)
    fake = FakeDevice(refuse=(bad,))
    good = [fake.mark(_jpeg(_photo_like(40 + i, 30)), 20 + i) for i in range(7)]
    datas = good[:5] + [bad] + good[5:]
    batch = fake.decoder().decode(datas)
    assert fake.calls[0] == 8 and len(fake.calls) <= 1 + 2 * 3  # the whole batch, then halves down to the bad one
    assert batch.on_device == 7
    assert batch.errors == [None] * 5 + [_cpu_error(bad)] + [None] * 2
    assert batch.errors[5].startswith("cannot decode image")  # type: ignore[union-attr]
    assert batch.ok == [0, 1, 2, 3, 4, 6, 7] and batch.sizes[5] is None
    assert [int(img[0, 0, 0]) for img in batch.x] == [20, 21, 22, 23, 24, 25, 26]


def test_hostile_and_tricky_files_become_the_cpu_decoders_rows(tmp_path):
    make_image_folder(tmp_path)
    names = sorted(HOSTILE) + sorted(TRICKY)
    datas = [(tmp_path / name).read_bytes() for name in names]
    fake = FakeDevice()
    batch = fake.decoder().decode(datas)
    for name, data, error, size in zip(names, datas, batch.errors, batch.sizes):
        if name in HOSTILE:
            assert error == _cpu_error(data), name
            assert size is None
        else:
            assert error is None, name
    device_jpegs = [n for n in names if n in ("exif_rotated.jpg", "upper.JPG")]  # not CMYK, not cut off
    assert fake.calls == [len(device_jpegs)] and batch.on_device == len(device_jpegs)
    for name in ("cmyk.jpg", "gray16.png", "animated.gif"):  # decoded by the CPU decoder, exactly
        i = names.index(name)
        np.testing.assert_array_equal(batch.x[batch.ok.index(i)], decode_fast(datas[i], SIZE).array)


def test_non_jpeg_batch_never_calls_the_device():
    fake = FakeDevice()
    datas = [_png(_photo_like()), b"GIF89a not really", b""]
    batch = fake.decoder().decode(datas)
    assert fake.calls == [] and batch.on_device == 0
    assert batch.ok == [0] and batch.errors[1:] == [_cpu_error(datas[1]), _cpu_error(datas[2])]


def test_empty_batch():
    fake = FakeDevice()
    batch = fake.decoder().decode([])
    assert fake.calls == [] and batch.x is None and batch.ok == [] and batch.sizes == []


def test_batch_of_errors_only_stacks_nothing():
    fake = FakeDevice()
    batch = fake.decoder().decode([b"", b"text"])
    assert batch.x is None and batch.ok == [] and all(batch.errors)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, in the CPU decoder
def test_bomb_limit_is_checked_from_the_header_before_the_device(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    fake = FakeDevice()
    big, small = _jpeg(_photo_like(160, 120)), _jpeg(_photo_like(80, 60))
    batch = fake.decoder().decode([big, small])
    assert fake.calls == [1]  # the small one only
    assert batch.errors[0] == _cpu_error(big) and "decompression bomb" in batch.errors[0]
    assert batch.ok == [1]


# --- process_shard's gpu branch, with fake device operations ------------------------------------------------


class FakePredictor:
    """What ``process_shard`` reads of a predictor; ``predict`` "classifies" each image by its mean."""

    model_name, fingerprint, preprocess_name, top_k = "fake", "fake:0", "none", 1
    feature_columns: dict[str, int] = {}
    feature_shapes: dict[str, list[int]] = {}
    labels = [f"class_{i}" for i in range(256)]

    def __init__(self, spec: ModelSpec) -> None:
        self.spec, self.input_hw, self.seen = spec, SIZE, []

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        raise AssertionError("a device batch goes to predict as it is")

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.seen.append(x.dtype)
        means = np.asarray(x, np.float32).mean(axis=(1, 2, 3))
        return {"top_k_indices": means.astype(np.int32)[:, None], "top_k_scores": np.ones((len(x), 1), np.float32)}


def test_process_shard_gpu_branch_writes_rows_in_order(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "in")
    fake = FakeDevice(refuse=(_bad_scan_jpeg(),))
    (tmp_path / "in" / "bad.jpg").write_bytes(_bad_scan_jpeg())
    for i in range(3):
        (tmp_path / "in" / f"p{i}.jpg").write_bytes(fake.mark(_jpeg(_photo_like(40 + i, 30)), 50 + i))
    uris = sorted(str(p) for p in (tmp_path / "in").iterdir()) + [str(tmp_path / "in" / "missing.jpg")]
    monkeypatch.setattr(decode_gpu, "batch_decoder", lambda size, map_fn=map, device=None: BatchDecoder(
        size, fake.decode_many, np.stack, map_fn=map_fn))
    spec = ModelSpec(name="MobileNetV2", batch_size=4, decode="gpu", top_k=1)
    predictor = FakePredictor(spec)
    task = ShardTask("job", 0, uris, spec, OutputSpec(path=str(tmp_path / "out")))
    result = process_shard(task, predictor, Settings(io_threads=2))
    table = pq.read_table(tmp_path / "out").to_pandas()
    assert list(table["uri"]) == uris
    errors = dict(zip(table["uri"].map(lambda u: Path(u).name), table["error"]))
    assert errors["missing.jpg"] == "file not found"
    assert errors["bad.jpg"] == _cpu_error(_bad_scan_jpeg())
    for name, needle in HOSTILE.items():
        assert needle in errors[name].lower(), name
    assert all(pd.isna(errors[name]) for name in TRICKY)
    labels = dict(zip(table["uri"].map(lambda u: Path(u).name), table["label"]))
    assert [labels[f"p{i}.jpg"] for i in range(3)] == ["class_50", "class_51", "class_52"]
    assert result.images == len(uris) and result.errors == len(HOSTILE) + 2
    assert set(result.timings) >= {"read_decode", "wait", "predict", "write", "total"}
    assert set(predictor.seen) == {np.dtype(np.uint8)}  # the device batch, straight to the model


def test_worker_without_torch_or_cuda_fails_the_shard_as_a_config_error(tmp_path):
    if _cuda():
        pytest.skip("this machine has a CUDA GPU")
    spec = ModelSpec(decode="gpu")
    task = ShardTask("job", 0, [str(PHOTOS / "cat.jpg")], spec, OutputSpec(path=str(tmp_path / "out")))
    with pytest.raises(ConfigError, match=r"^--decode gpu needs (PyTorch and torchvision|a CUDA GPU)"):
        process_shard(task, FakePredictor(spec), Settings())
    assert not (tmp_path / "out").exists()  # before the sink was opened


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# --- the real torchvision calls, on the CPU -----------------------------------------------------------------

torchvision_missing = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "torchvision")),
    reason="torchvision not installed")


@torchvision_missing
@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_matches_pillows_exif_transpose(orientation):
    import torch

    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(img))
    got = decode_gpu.orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


@torchvision_missing
def test_torchvision_on_cpu_agrees_with_the_fast_decoder(tmp_path):
    """Photos, camera-sized JPEGs, every EXIF orientation, hostile and tricky files, through the real calls."""
    make_image_folder(tmp_path)
    names = sorted(HOSTILE) + sorted(TRICKY)
    datas = [(tmp_path / name).read_bytes() for name in names]
    photos = sorted(PHOTOS.iterdir())
    datas += [p.read_bytes() for p in photos]
    names += [p.name for p in photos]
    camera = Image.open(PHOTOS / "rocket.jpg").convert("RGB").resize((1024, 768))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        datas.append(_jpeg(camera, exif=exif))
        names.append(f"camera-{orientation}.jpg")
    datas.append(_bad_scan_jpeg())
    names.append("bad.jpg")
    size = (224, 224)
    batch = decode_gpu.batch_decoder(size, device="cpu").decode(datas)
    assert batch.on_device == sum(1 for n in names if n.endswith((".jpg", ".JPG")) and n not in HOSTILE
                                  and n not in ("cmyk.jpg", "bad.jpg"))
    for k, i in enumerate(batch.ok):
        ref = decode_fast(datas[i], size, dct_scaling=False)
        assert batch.sizes[i] == (ref.width, ref.height), names[i]
        diff = np.abs(batch.x[k].numpy().astype(np.float64) - ref.array)
        assert diff.mean() < 0.5 and diff.max() <= 3, (names[i], diff.mean(), diff.max())
    for i, error in enumerate(batch.errors):
        if error is not None:
            assert error == _cpu_error_at(datas[i], size), names[i]
    assert {names[i] for i, e in enumerate(batch.errors) if e} == {*HOSTILE, "bad.jpg"}


def _cpu_error_at(data: bytes, size: tuple[int, int]) -> str:
    with pytest.raises(DecodeError) as info:
        decode_fast(data, size)
    return str(info.value)


@torchvision_missing
def test_check_available_on_a_machine_without_cuda():
    check_available("cpu")
    if not _cuda():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            check_available("cuda")


@torchvision_missing
def test_gpu_branch_on_cpu_gives_the_fast_decoders_top1_with_efficientnet_lite0(tmp_path, monkeypatch):
    """The whole branch (read, torchvision decode, merge, model) against ``--decode fast`` on real photos:
    the shipped ones and camera-sized crops, flips and EXIF rotations of them, plus a broken file."""
    from workers.models.loader import build_predictor

    folder = tmp_path / "in"
    folder.mkdir()
    for photo in sorted(PHOTOS.iterdir()):
        (folder / photo.name).write_bytes(photo.read_bytes())
        img = Image.open(photo).convert("RGB")
        w, h = img.size
        for k, (box, orientation) in enumerate([((0, 0, 3 * w // 4, 3 * h // 4), 1),
                                                ((w // 4, h // 4, w, h), 6), ((0, h // 8, w, h), 3)]):
            exif = Image.Exif()
            exif[0x0112] = orientation
            crop = img.crop(box).resize((1024, 768)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            (folder / f"{photo.stem}-{k}.jpg").write_bytes(_jpeg(crop, exif=exif))
    (folder / "bad.jpg").write_bytes(_bad_scan_jpeg())
    uris = sorted(str(p) for p in folder.iterdir())
    monkeypatch.setattr(decode_gpu, "DEVICE", "cpu")
    rows = {}
    for mode in ("fast", "gpu"):
        spec = ModelSpec(name="EfficientNetLite0", weights="imagenet", batch_size=8, decode=mode, top_k=1)
        task = ShardTask("job", 0, uris, spec, OutputSpec(path=str(tmp_path / mode)))
        process_shard(task, build_predictor(spec), Settings(io_threads=2))
        rows[mode] = pq.read_table(tmp_path / mode).to_pandas()
    fast, gpu = rows["fast"], rows["gpu"]
    assert list(gpu["uri"]) == uris
    assert list(gpu["error"].fillna("")) == list(fast["error"].fillna(""))
    pd.testing.assert_frame_equal(gpu[["width", "height"]], fast[["width", "height"]])
    ok = fast["error"].isna()
    assert ok.sum() == len(uris) - 1
    agree = (gpu["label"][ok] == fast["label"][ok]).mean()
    assert agree >= 0.99, list(zip(fast["label"][ok], gpu["label"][ok]))
