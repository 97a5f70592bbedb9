"""Hostile and tricky image files for the decode tests, generated on the fly.

``make_image_folder(folder)`` writes every file below into ``folder`` and returns
``{file_name: expected_error_substring_or_None}``: files in ``HOSTILE`` must become error rows whose
``error`` contains the (lowercase) substring; files in ``TRICKY`` must decode. Everything is
deterministic, small on disk (the largest file is ~24 KB) and takes well under a second to write.

Geometry of the tricky files (``W x H`` as Pillow reports it, i.e. the stored size):

- ``gray.png``          48x32 ``L``, horizontal gradient 0..255.
- ``cmyk.jpg``          48x32 ``CMYK`` JPEG, solid ``CMYK_RED`` (RGB ~ (255, 0, 0)).
- ``palette.png``       48x32 ``P``: left half red, right half green, bottom ``TRANSPARENT_ROWS`` rows use
                        a palette entry (black) that the tRNS chunk marks fully transparent.
- ``rgba.png``          48x32 ``RGBA``: left half opaque blue, right half fully transparent black.
- ``gray16.png``        48x32 16-bit grayscale (``I;16``): four vertical bands of ``GRAY16_BANDS``.
- ``animated.gif``      48x32, two frames: red, then blue.
- ``animated.webp``     48x32, two lossless frames: red, then blue.
- ``exif_rotated.jpg``  48x32 stored, left half red, right half blue, EXIF Orientation=6 (displayed
                        32x48, red on top, blue at the bottom).
- ``upper.JPG``         48x32 ordinary RGB JPEG with an uppercase extension.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> lowercase substring the decode error must contain
HOSTILE: dict[str, str] = {
    "empty.jpg": "empty file",
    "truncated.jpg": "truncated",
    "text.jpg": "not an image",
    "page.jpg": "not an image",
    "bomb.png": "decompression bomb",
}

# files that must decode
TRICKY: tuple[str, ...] = (
    "gray.png",
    "cmyk.jpg",
    "palette.png",
    "rgba.png",
    "gray16.png",
    "animated.gif",
    "animated.webp",
    "exif_rotated.jpg",
    "upper.JPG",
)

WIDTH, HEIGHT = 48, 32  # stored size of every tricky file
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
CMYK_RED = (0, 255, 255, 0)
TRANSPARENT_ROWS = 8  # bottom rows of palette.png that are transparent
GRAY16_BANDS = (0, 200, 32896, 65535)  # 16-bit values; /257 -> 0, ~1, 128, 255
BOMB_SIZE = (14_000, 14_000)  # 196e6 pixels > 2 * Image.MAX_IMAGE_PIXELS (~179e6) with Pillow's default


def bomb_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit grayscale PNG of ``width`` x ``height``, built without allocating the image.

    The IDAT holds ``height`` rows of (filter byte 0 + ``ceil(width / 8)`` zero bytes), deflated in a
    stream, so 14000x14000 costs ~24 KB on disk and ~0.1 s to build.
    """

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = bytes(1 + (width + 7) // 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _halves(left: tuple[int, ...], right: tuple[int, ...], mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (WIDTH, HEIGHT), left)
    img.paste(right, (WIDTH // 2, 0, WIDTH, HEIGHT))
    return img


def _photo_like(width: int = 160, height: int = 120) -> Image.Image:
    """A deterministic, JPEG-unfriendly RGB picture (gradients plus seeded noise)."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + yy) % 256], axis=-1)
    noise = rng.integers(-40, 41, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _hostile_bytes() -> dict[str, bytes]:
    jpeg = _encode(_photo_like(), "JPEG", quality=90)
    return {
        "empty.jpg": b"",
        # Cut well past the headers (~600 bytes) so Pillow opens it and fails while decoding scan data.
        "truncated.jpg": jpeg[: int(len(jpeg) * 0.4)],
        "text.jpg": b"This is not a JPEG, just some plain text that happens to end in .jpg.\n" * 4,
        "page.jpg": (
            b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
            b"<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>\n"
        ),
        "bomb.png": bomb_png(*BOMB_SIZE),
    }


def _tricky_bytes() -> dict[str, bytes]:
    files: dict[str, bytes] = {}

    gradient = np.tile(np.linspace(0, 255, WIDTH).round().astype(np.uint8), (HEIGHT, 1))
    files["gray.png"] = _encode(Image.fromarray(gradient, "L"), "PNG")

    files["cmyk.jpg"] = _encode(Image.new("CMYK", (WIDTH, HEIGHT), CMYK_RED), "JPEG", quality=95)

    indices = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)  # 0 = red
    indices[:, WIDTH // 2 :] = 1  # green
    indices[HEIGHT - TRANSPARENT_ROWS :, :] = 2  # black, but transparent
    palette = Image.fromarray(indices, "L").convert("P")  # L -> P keeps the values as indices
    palette.putpalette([*RED, *GREEN, 0, 0, 0] + [0] * (256 - 3) * 3)
    files["palette.png"] = _encode(palette, "PNG", transparency=2)

    files["rgba.png"] = _encode(_halves((*BLUE, 255), (0, 0, 0, 0), "RGBA"), "PNG")

    bands = np.array(GRAY16_BANDS, dtype=np.uint16).repeat(WIDTH // len(GRAY16_BANDS))
    files["gray16.png"] = _encode(Image.fromarray(np.tile(bands, (HEIGHT, 1))), "PNG")  # mode I;16

    frames = [Image.new("RGB", (WIDTH, HEIGHT), RED), Image.new("RGB", (WIDTH, HEIGHT), BLUE)]
    files["animated.gif"] = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.webp"] = _encode(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True
    )

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    files["exif_rotated.jpg"] = _encode(_halves(RED, BLUE), "JPEG", quality=95, exif=exif)

    files["upper.JPG"] = _encode(_photo_like(WIDTH, HEIGHT), "JPEG", quality=90)

    assert set(files) == set(TRICKY), "TRICKY and _tricky_bytes() disagree"
    return files


def make_image_folder(folder: Path) -> dict[str, str | None]:
    """Write every hostile and tricky file into ``folder``; return ``{name: error substring or None}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, data in _hostile_bytes().items():
        (folder / name).write_bytes(data)
        expected[name] = HOSTILE[name]
    for name, data in _tricky_bytes().items():
        (folder / name).write_bytes(data)
        expected[name] = None
    return expected
