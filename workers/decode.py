"""Image bytes -> fixed-size RGB arrays, in two modes.

``keras`` reproduces the reference path exactly: ``keras.utils.load_img(target_size=(H, W))``
(Pillow ``convert("RGB")`` and a nearest-neighbour resize) then ``img_to_array``.

``fast`` (the default) is quicker and more faithful to the photo: JPEGs are decoded at a reduced
scale in the DCT domain (Pillow ``draft``), EXIF orientation is applied, transparency is composited
on white, 16-bit images are scaled to 8 bits (not clipped) and the resize is antialiased bilinear.

Both keep Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``): a larger image is an
error row, not an allocation of gigabytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from workers.errors import DecodeError

# JPEGs are DCT-decoded at no less than this many times the input size; the antialiased resize does
# the rest. 1 is fastest; larger is closer to a full decode (scripts/fidelity.py measures top-1 agreement).
DRAFT_FACTOR = 4
RESAMPLE = Image.Resampling.BILINEAR  # antialiased when reducing, as every Pillow filter but NEAREST

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


@dataclass
class Decoded:
    """One decoded image: ``array`` is H x W x 3 (uint8 in fast mode, float32 in keras mode)."""

    array: np.ndarray
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
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


def _to_rgb(img: Image.Image) -> Image.Image:
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


def decode_fast(data: bytes, size: tuple[int, int], dct_scaling: bool = True) -> Decoded:
    """Decode for inference at ``size`` = (height, width); see the module docstring.

    ``dct_scaling=False`` decodes JPEGs at full resolution first (the reference the shortcut is
    measured against; see ``scripts/fidelity.py``)."""
    height, width = size
    img = _open(data)
    orig_w, orig_h = img.size
    try:
        img.seek(0)  # animated GIF/WebP/PNG: first frame
        # EXIF may rotate by 90 degrees, so ask for the larger side both ways; and keep at least twice the
        # target so the antialiased resize, not the DCT box filter, does the last halving (top-1 fidelity)
        side = DRAFT_FACTOR * max(height, width)
        if dct_scaling:
            img.draft("RGB", (side, side))  # JPEG only: DCT-domain downscale by 1/2, 1/4 or 1/8
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = img.resize((width, height), RESAMPLE)
        array = np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except Exception as exc:  # untrusted bytes: any decoder failure is this image's error row
        raise DecodeError(_describe(exc)) from exc
    return Decoded(array, orig_w, orig_h)


def decode_keras(data: bytes, size: tuple[int, int]) -> Decoded:
    """Bit-identical to ``img_to_array(load_img(path, target_size=size))``."""
    from keras.utils import img_to_array, load_img

    probe = _open(data)
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
