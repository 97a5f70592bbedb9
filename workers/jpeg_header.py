"""What a JPEG's headers say before any pixel is decoded: size, colour components, coding, EXIF orientation.

``--decode gpu`` reads this to choose, per image, between nvJPEG and the CPU decoder (a file that is not a
baseline or progressive 8-bit JPEG with 1 or 3 components goes to the CPU) and to apply the decompression-
bomb limit and the EXIF orientation itself (nvJPEG does neither). Pure Python, a few microseconds a file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOI = b"\xff\xd8\xff"
_SOF_GPU = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman: what nvJPEG decodes
_SOF_ALL = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length
_SOS, _APP1, _EOI = 0xDA, 0xE1, b"\xff\xd9"
_EOI_TAIL = 4096  # bytes searched for the end-of-image marker (some cameras append data after it)


@dataclass(frozen=True)
class JpegHeader:
    """``width`` x ``height`` as stored (before EXIF orientation), as Pillow's ``img.size`` reports it."""

    width: int
    height: int
    components: int
    precision: int
    sof: int  # the start-of-frame marker: 0xC0 baseline, 0xC2 progressive, ...
    orientation: int = 1  # EXIF Orientation, 1..8 (1: as stored)
    complete: bool = True  # an end-of-image marker near the end (a cut-off file is not)

    @property
    def gpu_decodable(self) -> bool:
        """nvJPEG decodes it the way Pillow would: 8-bit Huffman-coded, gray or YCbCr, whole.

        CMYK/YCCK (4 components) is left to Pillow, which knows Adobe's inverted CMYK; a cut-off file too,
        so its error row is Pillow's "truncated" one rather than whatever nvJPEG makes of it."""
        return (self.sof in _SOF_GPU and self.precision == 8 and self.components in (1, 3)
                and self.width > 0 and self.height > 0 and self.complete)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == SOI


def read_header(data: bytes) -> JpegHeader | None:
    """The frame header and EXIF orientation of a JPEG, or ``None`` when ``data`` is no JPEG this can read."""
    if not is_jpeg(data):
        return None
    orientation: int | None = None  # Pillow reads the first Exif block
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _NO_LENGTH:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4:pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if marker == _APP1 and orientation is None and body[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(body[6:])
        elif marker in _SOF_ALL:
            if len(body) < 6:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", body)
            complete = _EOI in data[-_EOI_TAIL:]
            return JpegHeader(width, height, components, precision, marker, orientation or 1, complete)
        elif marker == _SOS:
            return None  # scan data before any frame header
        pos += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 in a TIFF-structured EXIF block; 1 when absent or unreadable."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == 0x0112 and kind == 3:  # SHORT
            (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            return value if 1 <= value <= 8 else 1
    return 1
