"""Image bytes -> fixed-size RGB arrays, in two modes.

``keras`` reproduces the reference path exactly: ``keras.utils.load_img(target_size=(H, W))``
(Pillow ``convert("RGB")`` and a nearest-neighbour resize) then ``img_to_array``.

``fast`` (the default) is quicker and more faithful to the photo: large JPEGs are decoded at a reduced
scale in the DCT domain (Pillow ``draft``, only as far as top-1 stays faithful: ``DRAFT_FACTOR``), EXIF
orientation is applied, transparency is composited on white, 16-bit images are scaled to 8 bits (not
clipped) and the resize is antialiased bilinear. No full-size copy is made: an image is resized in its
stored orientation and the small result turned upright.

Both keep Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): a larger image is an
error row, not an allocation of gigabytes.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from PIL import Image

from workers.errors import DecodeError

# JPEGs are DCT-decoded at the smallest 1/2^k scale that keeps this many times the input size in both
# dimensions (as the image will stand after EXIF rotation); the antialiased resize does the rest. 1 is
# fastest, larger is closer to a full decode: 4 is the smallest factor measured whose top-1 agrees with a
# full decode on >= 99 % of real photos (README, "Fidelity of --decode fast", has every choice measured).
DRAFT_FACTOR = 4.0
ORIENTATION = 0x0112  # the EXIF tag, and the transposition that shows each of its values upright
_T = Image.Transpose
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
              7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_ROTATIONS = {_T.TRANSPOSE, _T.ROTATE_270, _T.TRANSVERSE, _T.ROTATE_90}  # width and height swap
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when reducing, as every Pillow filter but NEAREST

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def pillow_build() -> str:
    """``"Pillow-SIMD 12.1.1.post0"`` or ``"Pillow 13.0.0"``: the distribution the imported ``PIL`` came
    from (Pillow-SIMD, ``scripts/pillow_simd.sh``, resizes about 5x faster; both may be installed)."""
    import PIL

    here = os.path.realpath(PIL.__file__)
    for name, label in (("pillow-simd", "Pillow-SIMD"), ("pillow", "Pillow")):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if os.path.realpath(str(dist.locate_file("PIL/__init__.py"))) == here:
            return f"{label} {dist.version}"
    return f"Pillow {PIL.__version__}"


@dataclass
class Decoded:
    """One decoded image: ``array`` is H x W x 3 (uint8 in fast mode, float32 in keras mode)."""

    array: np.ndarray
    width: int
    height: int


def open_image(data: bytes) -> Image.Image:
    """Pillow's image of untrusted bytes, with the bomb limit held; ``DecodeError`` saying what is wrong."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise DecodeError("not an image (Pillow cannot identify the file format)") from exc
    except Exception as exc:  # e.g. a file cut off inside its header: "Truncated File Read"
        raise DecodeError(_describe(exc)) from exc
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.width * img.height > limit:
        raise DecodeError(
            f"decompression bomb: {img.width}x{img.height} = {img.width * img.height} pixels "
            f"exceeds Pillow's limit of {limit}"
        )
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: alpha composited on white, 16/32-bit integers scaled to 8 bits."""
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255, as an 8-bit viewer shows a 16-bit image
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # palette or tRNS colour key
        img = img.convert("RGBA")
    if img.mode in _TRANSPARENT_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def draft_request(size: tuple[int, int], orientation: int, factor: float) -> tuple[int, int]:
    """The (width, height) to ask ``Image.draft`` for: ``factor`` x ``size`` = (height, width), in the
    stored orientation of an image whose EXIF ``orientation`` will turn it afterwards."""
    height, width = size
    if _TRANSPOSE.get(orientation) in _ROTATIONS:
        height, width = width, height
    return math.ceil(factor * width), math.ceil(factor * height)


def decode_fast(data: bytes, size: tuple[int, int], dct_scaling: bool = True, *,
                draft_factor: float | None = None, reducing_gap: float | None = None) -> Decoded:
    """Decode for inference at ``size`` = (height, width); see the module docstring.

    ``dct_scaling=False`` decodes JPEGs at full resolution and resizes with the filter alone, no box
    reduce (the reference the shortcuts are measured against; see ``scripts/fidelity.py``).
    ``draft_factor`` (default ``DRAFT_FACTOR``) and ``reducing_gap`` (Pillow's box reduce before the
    filter; off, as it flipped 2-3 % of top-1 labels) are there for those measurements."""
    height, width = size
    draft_factor = DRAFT_FACTOR if draft_factor is None else draft_factor
    img = open_image(data)
    orig_w, orig_h = img.size
    box = None
    try:
        img.seek(0)  # animated GIF/WebP/PNG: first frame
        if dct_scaling and img.format == "JPEG":  # a JPEG's EXIF is read with its header, before decoding
            drafted = img.draft("RGB", draft_request(size, _orientation(img), draft_factor))
            box = drafted[1] if drafted else None  # the source area exactly, when the scaled size rounded up
        img.load()
        turn = _TRANSPOSE.get(_orientation(img))  # after loading: a PNG may keep its EXIF after the pixels
        img = to_rgb(img)
        # resize first in the stored orientation, then turn the small image (no copy of a large upright one)
        out = (height, width) if turn in _ROTATIONS else (width, height)
        img = img.resize(out, RESAMPLE, box=box, reducing_gap=reducing_gap if dct_scaling else None)
        if turn is not None:
            img = img.transpose(turn)
        array = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure is this image's error row
        raise DecodeError(_describe(exc)) from exc
    return Decoded(array, orig_w, orig_h)


def _orientation(img: Image.Image) -> int:
    return int(img.getexif().get(ORIENTATION, 1) or 1)


def decode_keras(data: bytes, size: tuple[int, int]) -> Decoded:
    """Bit-identical to ``img_to_array(load_img(path, target_size=size))``."""
    from keras.utils import img_to_array, load_img

    probe = open_image(data)
    orig_w, orig_h = probe.size
    try:
        img = load_img(io.BytesIO(data), target_size=size)
        array = img_to_array(img)
    except Exception as exc:  # untrusted bytes: any decoder failure is this image's error row
        raise DecodeError(_describe(exc)) from exc
    return Decoded(array, orig_w, orig_h)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated image: {text}"
    return f"cannot decode image: {type(exc).__name__}: {text}"


DECODERS = {"fast": decode_fast, "keras": decode_keras}


@dataclass
class Encoded(Decoded):
    """A file's bytes, read by the pool and left for the batch decoder on the device (``--decode gpu``)."""

    data: bytes = b""


def keep_encoded(data: bytes, size: tuple[int, int]) -> Decoded:
    """``--decode gpu``'s stand-in for a decoder: the pool only reads; ``workers.decode_gpu`` decodes the batch."""
    return Encoded(np.empty((0, 0, 3), np.uint8), 0, 0, data)
