"""``--decode gpu``: a batch of files -> one uint8 N x H x W x 3 batch on the GPU, nvJPEG with a CPU fallback.

One torchvision call decodes a whole batch of JPEGs with nvJPEG (``decode_jpeg(list, device="cuda")``); the
EXIF orientation and the antialiased bilinear resize of the ``fast`` decoder run on the device too, and the
batch reaches the model without a trip through the host (``Predictor.predict`` takes it as is on torch, by
DLPack on JAX and TensorFlow). Whatever nvJPEG should not or cannot decode goes, one image at a time, to the CPU decoder
(``workers.decode.decode_fast``), whose rows it then is, error messages included: files that are not JPEG,
CMYK, 12-bit, arithmetic-coded or cut-off JPEGs, images over Pillow's decompression-bomb limit (read from the
header, before any decode) and any image nvJPEG refuses. nvJPEG fails a batch as a whole on one bad image,
so a failed batch is split in halves until the images that fail are found.

``BatchDecoder`` holds that logic and takes its device operations as two functions, so it is tested
without a GPU; ``TorchJpeg`` is the torchvision implementation of them.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from workers.decode import Decoded, decode_fast
from workers.errors import ConfigError, DecodeError
from workers.jpeg_header import read_header

log = logging.getLogger(__name__)

DEVICE = "cuda"  # where nvJPEG decodes; the tests run the same torchvision calls on "cpu"
CHUNK = 32  # images resized in one call (bounds the float32 copy of full-size images on the device)

DecodeMany = Callable[[list[bytes], list[int]], list[Any]]  # (files, EXIF orientations) -> H x W x 3 images
Stack = Callable[[list[Any]], Any]  # device images and host arrays, in order -> one N x H x W x 3 batch
Mapper = Callable[[Callable[[bytes], Any], Iterable[bytes]], Iterable[Any]]


@dataclass
class DeviceBatch:
    """One decoded batch: ``x`` stacks the images that decoded, in input order (``ok``); ``None`` if none did."""

    x: Any
    sizes: list[tuple[int, int] | None]  # (width, height) as stored, per input
    errors: list[str | None]  # per input: None, or the CPU decoder's error message
    on_device: int = 0  # how many nvJPEG decoded (the rest went to the CPU decoder)
    ok: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.ok = [i for i, error in enumerate(self.errors) if error is None]


class BatchDecoder:
    """Decode a batch of file bytes on the device, falling back per image to the CPU decoder.

        decoder = BatchDecoder((224, 224), ops.decode_many, ops.stack)
        batch = decoder.decode([jpeg_bytes, png_bytes, ...])  # batch.x: len(batch.ok) x 224 x 224 x 3

    ``decode_many(datas, orientations)`` decodes JPEGs to images of ``size`` (oriented, resized) and may
    raise for the whole list when one of them is bad; ``stack`` turns device images and the fallback's host
    arrays (in input order) into one batch; ``map_fn`` runs the fallback (a thread pool's ``map``).
    """

    def __init__(self, size: tuple[int, int], decode_many: DecodeMany, stack: Stack,
                 fallback: Callable[[bytes, tuple[int, int]], Decoded] = decode_fast, map_fn: Mapper = map) -> None:
        self.size = size
        self._decode_many = decode_many
        self._stack = stack
        self._fallback = fallback
        self._map = map_fn
        self._last_error = ""

    def decode(self, datas: Sequence[bytes]) -> DeviceBatch:
        n = len(datas)
        images: list[Any] = [None] * n
        sizes: list[tuple[int, int] | None] = [None] * n
        errors: list[str | None] = [None] * n
        limit = Image.MAX_IMAGE_PIXELS
        jpegs = [(i, h) for i, h in enumerate(map(read_header, datas))  # the bomb limit, from the header
                 if h is not None and h.gpu_decodable and (limit is None or h.width * h.height <= limit)]
        decoded = self._on_device([datas[i] for i, _ in jpegs], [h.orientation for _, h in jpegs])
        for (i, header), image in zip(jpegs, decoded):
            if image is not None:
                images[i], sizes[i] = image, (header.width, header.height)
        rest = [i for i in range(n) if images[i] is None]
        for i, result in zip(rest, self._map(self._on_host, [datas[i] for i in rest])):
            if isinstance(result, str):
                errors[i] = result
            else:
                images[i], sizes[i] = result.array, (result.width, result.height)
        refused = sum(1 for image in decoded if image is None)
        if refused > 1 and refused == len(jpegs):  # more likely the device than the files: say so once a batch
            log.warning("the GPU decoded none of %d JPEGs in this batch (%s); they were decoded on the CPU",
                        refused, self._last_error)
        elif rest:
            log.debug("%d of %d images decoded on the CPU", len(rest), n)
        ok = [i for i in range(n) if errors[i] is None]
        x = self._stack([images[i] for i in ok]) if ok else None
        return DeviceBatch(x, sizes, errors, n - len(rest))

    def _on_device(self, datas: list[bytes], orientations: list[int]) -> list[Any]:
        """One image per file, ``None`` where the device refused it; a failed call is split in halves."""
        if not datas:
            return []
        try:
            images = list(self._decode_many(datas, orientations))
        except Exception as exc:  # nvJPEG refuses the whole list for one bad file (RuntimeError, ValueError)
            if len(datas) == 1:
                self._last_error = f"{type(exc).__name__}: {exc}"
                return [None]
            half = len(datas) // 2
            return (self._on_device(datas[:half], orientations[:half])
                    + self._on_device(datas[half:], orientations[half:]))
        if len(images) != len(datas):
            raise RuntimeError(f"decode_many returned {len(images)} images for {len(datas)} files")
        return images

    def _on_host(self, data: bytes) -> Decoded | str:
        try:
            return self._fallback(data, self.size)
        except DecodeError as exc:
            return str(exc)


def check_available(device: str | None = None) -> None:
    """Raise ``ConfigError`` (one line) unless torch and torchvision import and, for CUDA, a GPU is here."""
    device = device or DEVICE
    try:
        torch = import_torch()
    except (ImportError, OSError) as exc:
        raise ConfigError(f"--decode gpu needs PyTorch and torchvision (pip install torch torchvision): {exc}") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--decode gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                          "(use --decode fast)")


def import_torch() -> Any:
    """torch, with torchvision.io loaded. After TensorFlow, without Triton: both bundle LLVM, and importing
    Triton (torchvision imports it through torch._dynamo) once TensorFlow is loaded aborts the process
    ("LLVM ERROR: inconsistency in registered CommandLine options"). torch then runs without Triton's
    compiled kernels, which the TensorFlow backend never uses."""
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # then `import triton` raises ImportError
    import torch
    import torchvision.io  # noqa: F401

    return torch


def batch_decoder(size: tuple[int, int], map_fn: Mapper = map, device: str | None = None) -> BatchDecoder:
    """The nvJPEG decoder for ``size`` = (height, width), after ``check_available``."""
    check_available(device)
    ops = TorchJpeg(size, device or DEVICE)
    return BatchDecoder(size, ops.decode_many, ops.stack, map_fn=map_fn)


class TorchJpeg:
    """nvJPEG through torchvision, then EXIF orientation and an antialiased bilinear resize on the device."""

    def __init__(self, size: tuple[int, int], device: str = DEVICE) -> None:
        import torch

        self.size = size
        self.device = torch.device(device)

    def decode_many(self, datas: list[bytes], orientations: list[int]) -> list[Any]:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():  # read-only buffers (nothing writes them); torchvision 0.29's deprecation
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            files = [torch.frombuffer(data, dtype=torch.uint8) for data in datas]
            decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device)
        return self.resize([orient(image, o) for image, o in zip(decoded, orientations)])

    def resize(self, images: list[Any]) -> list[Any]:
        """3 x h x w uint8 images -> H x W x 3 uint8 at ``size``, antialiased bilinear as Pillow's reduce does;
        images of one shape are resized together."""
        import torch
        import torch.nn.functional as F

        out: list[Any] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(tuple(image.shape), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), CHUNK):
                part = indices[start:start + CHUNK]
                x = torch.stack([images[i] for i in part]).float()
                if tuple(x.shape[-2:]) != self.size:
                    x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
                y = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                for i, image in zip(part, y):
                    out[i] = image
        return out

    def stack(self, items: list[Any]) -> Any:
        """Device images and the CPU decoder's arrays, in order -> one contiguous batch, ready on the device."""
        import torch

        with warnings.catch_warnings():  # Pillow's arrays are read-only; they are copied, never written
            warnings.simplefilter("ignore", UserWarning)
            tensors = [item if isinstance(item, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(item))
                       for item in items]
        batch = torch.stack([t.to(self.device) for t in tensors])
        if self.device.type == "cuda":  # the consumer (JAX, TensorFlow) may read it on another stream
            torch.cuda.current_stream(self.device).synchronize()
        return batch


def orient(image: Any, orientation: int) -> Any:
    """A 3 x h x w tensor as Pillow's ``ImageOps.exif_transpose`` shows it (EXIF Orientation 1..8)."""
    hw = (-2, -1)
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(hw)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, hw)
    if orientation == 7:
        return image.transpose(-2, -1).flip(hw)
    if orientation == 8:
        return image.rot90(1, hw)
    return image
