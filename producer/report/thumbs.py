"""Thumbnails embedded in the page: each sampled image read through its storage backend (local, s3, http),
decoded small (JPEG DCT scaling), turned upright, and kept as a ``data:image/jpeg`` URI of a few KB.

The bytes are untrusted: Pillow's decompression-bomb limit holds, and an image that cannot be read or
decoded gets ``None`` (the page shows a placeholder), never an exception.
"""

from __future__ import annotations

import base64
import io
import logging
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageOps

from workers.decode import open_image, to_rgb
from workers.storage import storage_for

log = logging.getLogger(__name__)

SIZE = 128
QUALITY = 70
THREADS = 8


@dataclass
class Thumb:
    """A thumbnail: its data URI and size in pixels (for the page's ``<img>`` tags)."""

    src: str
    width: int
    height: int


def thumbnail(data: bytes, size: int = SIZE, quality: int = QUALITY) -> Thumb:
    """``data`` (an image file's bytes) as a JPEG thumbnail at most ``size`` pixels on its longer side."""
    img = open_image(data)  # the workers' own opening: the bomb limit held
    img.seek(0)  # animations: the first frame
    if img.format == "JPEG":
        img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale straight from the DCT
    img = to_rgb(ImageOps.exif_transpose(img))  # transparency on white, as the workers decode it
    img.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, optimize=True)
    return Thumb("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), img.width,
                 img.height)


def _one(uri: str, size: int) -> Thumb | None:
    try:
        return thumbnail(storage_for(uri).read(uri), size)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes or a missing file: the placeholder is the outcome
        log.debug("no thumbnail of %s: %s", uri, exc)
        return None


def thumbnails(uris: Iterable[str], size: int = SIZE, threads: int = THREADS) -> dict[str, Thumb | None]:
    """A thumbnail (or ``None``) for each distinct URI, read ``threads`` at a time."""
    unique = list(dict.fromkeys(uris))
    if not unique:
        return {}
    # an image over the limit is refused in ``thumbnail``; Pillow's own warning would only add a stderr line.
    # Filters are global: set here, in the calling thread, around the whole pool.
    with warnings.catch_warnings(), \
            ThreadPoolExecutor(min(threads, len(unique)), thread_name_prefix="report-thumb") as pool:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return dict(zip(unique, pool.map(lambda u: _one(u, size), unique)))
