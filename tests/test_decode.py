"""Unit tests of ``workers.decode``: hostile files become DecodeError, tricky files decode correctly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.images import (
    BLUE,
    GRAY16_BANDS,
    GREEN,
    HEIGHT,
    HOSTILE,
    RED,
    TRANSPARENT_ROWS,
    TRICKY,
    WIDTH,
    bomb_png,
    make_image_folder,
)
from workers.decode import DECODERS, decode_fast, decode_keras
from workers.errors import DecodeError

PHOTOS = Path(__file__).parent / "data" / "photos"
PHOTO_NAMES = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "motorcycle.png")
SIZE = (HEIGHT, WIDTH)  # (32, 48): decoding a tricky file at its own size
PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89478485, Pillow's built-in default
MODES = sorted(DECODERS)  # ["fast", "keras"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images")
    make_image_folder(path)
    return path


def _read(folder: Path, name: str) -> bytes:
    return (folder / name).read_bytes()


def _keras_reference(path: Path, size: tuple[int, int]) -> np.ndarray:
    from keras.utils import img_to_array, load_img

    return img_to_array(load_img(str(path), target_size=size))


def _close(pixels: np.ndarray, colour: tuple[int, int, int], atol: float = 3) -> bool:
    """Every pixel of ``pixels`` (... x 3) is within ``atol`` of ``colour`` in every channel."""
    return bool(np.all(np.abs(pixels.astype(np.float64) - np.asarray(colour, dtype=np.float64)) <= atol))


# --- the generated folder itself ---------------------------------------------------------------------


def test_make_image_folder_writes_every_file(tmp_path):
    expected = make_image_folder(tmp_path / "nested" / "dir")
    assert expected == {**HOSTILE, **dict.fromkeys(TRICKY)}
    written = {p.name: p.stat().st_size for p in (tmp_path / "nested" / "dir").iterdir()}
    assert set(written) == set(expected)
    assert written["empty.jpg"] == 0
    assert all(size < 64 * 1024 for size in written.values()), written
    assert all(substring == substring.lower() for substring in HOSTILE.values())


def test_make_image_folder_is_deterministic(tmp_path, folder):
    make_image_folder(tmp_path)
    for name in [*HOSTILE, *TRICKY]:
        assert (tmp_path / name).read_bytes() == _read(folder, name), name


def test_bomb_png_is_a_real_png_over_twice_the_limit(folder):
    data = _read(folder, "bomb.png")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) < 32 * 1024
    with pytest.raises(Image.DecompressionBombError):
        Image.open(folder / "bomb.png")
    small = bomb_png(40, 30)  # same builder, harmless size: Pillow must decode it fully
    with Image.open(io.BytesIO(small)) as img:
        assert (img.mode, img.size) == ("1", (40, 30))
        assert not np.asarray(img).any()


# --- hostile files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_raises_decode_error(folder, name, mode):
    with pytest.raises(DecodeError) as info:
        DECODERS[mode](_read(folder, name), SIZE)
    message = str(info.value)
    assert HOSTILE[name] in message.lower(), message


@pytest.mark.parametrize("mode", MODES)
def test_image_between_one_and_two_times_the_limit_is_refused(mode):
    # 100e6 pixels: Pillow only warns (the hard error is at 2x), so decode.py's own check must refuse it.
    data = bomb_png(10_000, 10_000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(DecodeError) as info:
        DECODERS[mode](data, SIZE)
    assert "decompression bomb" in str(info.value).lower()
    assert "10000x10000" in str(info.value)


def test_bomb_limit_is_pillows_default():
    import workers.decode  # noqa: F401  (importing it must not loosen the limit)

    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_limits_unchanged_after_decoding(folder):
    for mode in MODES:
        DECODERS[mode](_read(folder, "upper.JPG"), SIZE)
        with pytest.raises(DecodeError):
            DECODERS[mode](_read(folder, "truncated.jpg"), SIZE)
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_MAX_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("photo", "keep"), [("cat.jpg", 100), ("motorcycle.png", 20)])
def test_file_truncated_inside_its_header_is_a_decode_error(mode, photo, keep):
    data = (PHOTOS / photo).read_bytes()[:keep]
    with pytest.raises(DecodeError, match="truncated"):
        DECODERS[mode](data, SIZE)


def test_colour_key_transparency_is_white_in_fast_mode():
    import io

    img = Image.new("RGB", (8, 8), (10, 20, 30))
    img.paste((0, 0, 0), (0, 0, 8, 4))
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=(0, 0, 0))  # a tRNS colour key, no alpha channel
    out = DECODERS["fast"](buf.getvalue(), (8, 8)).array
    assert (out[:3] == 255).all() and (out[5:] == (10, 20, 30)).all()


# --- tricky files: shape, dtype, reported size -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TRICKY)
def test_tricky_file_decodes(folder, name, mode):
    decoded = DECODERS[mode](_read(folder, name), SIZE)
    assert decoded.array.shape == (HEIGHT, WIDTH, 3)
    assert decoded.array.dtype == (np.uint8 if mode == "fast" else np.float32)
    assert (decoded.width, decoded.height) == (WIDTH, HEIGHT)  # the stored size, before any EXIF rotation
    assert decoded.array.min() >= 0 and decoded.array.max() <= 255


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(224, 224), (17, 90)])
def test_output_shape_follows_size_height_width(folder, mode, size):
    decoded = DECODERS[mode](_read(folder, "upper.JPG"), size)
    assert decoded.array.shape == (*size, 3)


def test_gray_becomes_three_equal_channels(folder):
    arr = decode_fast(_read(folder, "gray.png"), SIZE).array
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    row = arr[HEIGHT // 2, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] < 10 and row[-1] > 245


@pytest.mark.parametrize("mode", MODES)
def test_cmyk_comes_out_rgb(folder, mode):
    arr = DECODERS[mode](_read(folder, "cmyk.jpg"), SIZE).array
    assert _close(arr, RED, atol=3)


def test_palette_comes_out_rgb_with_transparency_on_white_in_fast_mode(folder):
    arr = decode_fast(_read(folder, "palette.png"), SIZE).array
    opaque = arr[: HEIGHT - TRANSPARENT_ROWS - 2]
    assert _close(opaque[:, : WIDTH // 2 - 2], RED)
    assert _close(opaque[:, WIDTH // 2 + 2 :], GREEN)
    assert _close(arr[HEIGHT - TRANSPARENT_ROWS + 2 :], (255, 255, 255))


def test_rgba_transparent_region_is_white_in_fast_mode(folder):
    arr = decode_fast(_read(folder, "rgba.png"), SIZE).array
    assert _close(arr[:, : WIDTH // 2 - 2], BLUE)
    assert _close(arr[:, WIDTH // 2 + 2 :], (255, 255, 255))
    # also after a real (antialiased) resize
    small = decode_fast(_read(folder, "rgba.png"), (8, 12)).array
    assert _close(small[:, 8:], (255, 255, 255))


@pytest.mark.parametrize("size", [SIZE, (16, 24)])
def test_gray16_is_scaled_not_clipped_in_fast_mode(folder, size):
    arr = decode_fast(_read(folder, "gray16.png"), size).array
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    band = size[1] // len(GRAY16_BANDS)
    centres = [int(arr[size[0] // 2, band * i + band // 2, 0]) for i in range(len(GRAY16_BANDS))]
    expected = [round(v / 257) for v in GRAY16_BANDS]  # [0, 1, 128, 255]
    assert np.allclose(centres, expected, atol=1), centres
    assert centres[1] <= 2  # 200/65535 is nearly black, not 200/255
    assert 120 <= centres[2] <= 136  # mid-grey, not clipped to 255
    assert arr.max() == 255


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["animated.gif", "animated.webp"])
def test_animation_gives_first_frame(folder, name, mode):
    with Image.open(folder / name) as img:
        assert img.n_frames >= 2
    arr = DECODERS[mode](_read(folder, name), SIZE).array
    assert _close(arr, RED, atol=2)


@pytest.mark.parametrize("size", [(48, 32), (32, 48)])
def test_exif_orientation_is_applied_in_fast_mode(folder, size):
    decoded = decode_fast(_read(folder, "exif_rotated.jpg"), size)
    height, width = size
    arr = decoded.array
    assert arr.shape == (height, width, 3)
    # stored: left half red, right half blue; Orientation=6 turns it 90 degrees clockwise -> red on top
    assert _close(arr[: height // 2 - 3], RED, atol=12)
    assert _close(arr[height // 2 + 3 :], BLUE, atol=12)
    assert (decoded.width, decoded.height) == (WIDTH, HEIGHT)  # the file's own (stored) size


def test_keras_mode_ignores_exif_like_load_img(folder):
    arr = decode_keras(_read(folder, "exif_rotated.jpg"), SIZE).array
    assert _close(arr[:, : WIDTH // 2 - 3], RED, atol=12)
    assert _close(arr[:, WIDTH // 2 + 3 :], BLUE, atol=12)


# --- keras mode is the reference path, bit for bit ---------------------------------------------------


@pytest.mark.parametrize("size", [(224, 224), (120, 200)])
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_keras_mode_is_bit_identical_on_photos(name, size):
    path = PHOTOS / name
    decoded = decode_keras(path.read_bytes(), size)
    reference = _keras_reference(path, size)
    assert decoded.array.dtype == reference.dtype == np.float32
    assert decoded.array.shape == reference.shape == (*size, 3)
    assert np.array_equal(decoded.array, reference)
    with Image.open(path) as img:
        assert (decoded.width, decoded.height) == img.size


@pytest.mark.parametrize(
    "name", ["gray.png", "cmyk.jpg", "palette.png", "rgba.png", "gray16.png", "animated.gif", "exif_rotated.jpg"]
)
def test_keras_mode_is_bit_identical_on_tricky_files(folder, name):
    decoded = decode_keras(_read(folder, name), (20, 30))
    reference = _keras_reference(folder / name, (20, 30))
    assert decoded.array.dtype == reference.dtype
    assert np.array_equal(decoded.array, reference)


# --- fast mode stays faithful to the full decode -----------------------------------------------------


def _full_decode(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as img:
        full = img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(full, dtype=np.float64)


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_fast_mode_on_photos_is_close_to_full_decode(name):
    path = PHOTOS / name
    decoded = decode_fast(path.read_bytes(), (224, 224))
    assert decoded.array.shape == (224, 224, 3) and decoded.array.dtype == np.uint8
    with Image.open(path) as img:
        assert (decoded.width, decoded.height) == img.size
    assert np.abs(decoded.array - _full_decode(path, (224, 224))).mean() < 3


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big") / "astronaut_2048.jpg"
    with Image.open(PHOTOS / "astronaut.jpg") as img:
        img.convert("RGB").resize((2048, 2048), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path


@pytest.mark.parametrize("size", [(224, 224), (150, 300)])
def test_fast_mode_on_big_jpeg_is_close_to_full_decode(big_jpeg, size):
    decoded = decode_fast(big_jpeg.read_bytes(), size)
    assert decoded.array.shape == (*size, 3) and decoded.array.dtype == np.uint8
    assert (decoded.width, decoded.height) == (2048, 2048)
    mad = np.abs(decoded.array - _full_decode(big_jpeg, size)).mean()
    assert mad < 6, mad


def test_fast_mode_decodes_big_jpeg_at_reduced_scale(big_jpeg, monkeypatch):
    resized_from: list[tuple[int, int]] = []
    original_resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        resized_from.append(self.size)
        return original_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    decoded = decode_fast(big_jpeg.read_bytes(), (224, 224))
    assert decoded.array.shape == (224, 224, 3)
    # draft() lets libjpeg decode at a reduced scale instead of handing 2048x2048 to resize(): the
    # smallest 1/2^k scale that keeps DRAFT_FACTOR x the input size (1/2 -> 1024 for 224 and factor 4)
    from workers.decode import DRAFT_FACTOR

    want = 2048 // max(k for k in (1, 2, 4, 8) if 2048 // k >= DRAFT_FACTOR * 224)
    assert resized_from and max(max(s) for s in resized_from) == want < 2048, resized_from


# --- DCT scaling: as far as the target allows, in the image's own aspect and orientation -------------


def _camera_jpeg(orientation: int | None = None) -> bytes:
    """A 1024x768 JPEG (stored), left half red and right half blue, optionally with an EXIF Orientation."""
    img = Image.new("RGB", (1024, 768), BLUE)
    img.paste(RED, (0, 0, 512, 768))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.fixture
def resized_from(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image ``resize`` is called on (what the decoder handed over)."""
    sizes: list[tuple[int, int]] = []
    original_resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        sizes.append(self.size)
        return original_resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return sizes


@pytest.mark.parametrize("size, expected", [
    ((224, 224), (1024, 768)),  # 768 / 2 < 4 x 224: decoded whole, as fidelity needs (README table)
    ((96, 128), (512, 384)),  # 512x384 still covers 4 x (128, 96): half scale
    ((48, 64), (256, 192)),  # a quarter
    ((128, 96), (1024, 768)),  # a portrait target on a landscape image: 768 / 2 < 4 x 128
])
def test_camera_jpeg_decodes_at_the_scale_its_own_aspect_allows(resized_from, size, expected):
    decoded = decode_fast(_camera_jpeg(), size)
    assert resized_from == [expected]
    assert decoded.array.shape == (*size, 3) and (decoded.width, decoded.height) == (1024, 768)
    half = size[1] // 2
    assert _close(decoded.array[:, : half - 3], RED, atol=12) and _close(decoded.array[:, half + 3 :], BLUE, atol=12)


def test_exif_rotated_camera_jpeg_decodes_at_reduced_scale_and_upright(resized_from):
    # stored 1024x768 with Orientation=6: displayed 768x1024, red on top. A portrait target of 128x96
    # (height x width) asks 4 x (96, 128) of the stored image, which its half scale covers; asking the
    # square (512, 512) as before, so either turn would fit, forced a full decode (768 / 2 < 512)
    decoded = decode_fast(_camera_jpeg(orientation=6), (128, 96))
    assert resized_from == [(512, 384)]
    assert decoded.array.shape == (128, 96, 3) and (decoded.width, decoded.height) == (1024, 768)
    assert _close(decoded.array[: 64 - 3], RED, atol=12) and _close(decoded.array[64 + 3 :], BLUE, atol=12)


def test_smaller_draft_factor_decodes_camera_jpeg_at_half_scale(resized_from):
    decoded = decode_fast(_camera_jpeg(), (224, 224), draft_factor=1.5)
    assert resized_from == [(512, 384)] and decoded.array.shape == (224, 224, 3)


def test_draft_request_follows_exif_orientation():
    from workers.decode import draft_request

    assert draft_request((96, 128), 1, 4) == (512, 384)
    assert draft_request((96, 128), 6, 4) == (384, 512)  # the stored image is turned a quarter afterwards
    assert draft_request((96, 128), 3, 4) == (512, 384)  # a half turn keeps the aspect
    assert draft_request((224, 224), 1, 1.5) == (336, 336)


def test_reduced_scale_keeps_the_geometry_of_an_odd_sized_jpeg():
    # 161x121 at 1/8 scale is 21x16 pixels covering 20.125x15.125 source pixels: resizing that exact box
    # (not the whole 21x16) keeps a ramp where a full decode puts it (without the box: MAD 3.7)
    w, h = 8 * 20 + 1, 8 * 15 + 1
    ramp = np.tile(np.linspace(0, 255, w), (h, 1))
    img = Image.fromarray(np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 128)], -1).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    fast = decode_fast(buf.getvalue(), (15, 20), draft_factor=1).array.astype(np.float64)
    full = decode_fast(buf.getvalue(), (15, 20), dct_scaling=False).array.astype(np.float64)
    assert np.abs(fast - full).mean() < 1.0
