"""Fidelity of the fast decode path, measured with a real ImageNet model (EfficientNet-Lite0).

    .venv/bin/python scripts/fidelity.py

Builds a set of real photos (the samples inside the scikit-image and scikit-learn wheels and the
repository's own, as crops, flips and rescales, saved as large JPEGs so the DCT shortcut applies) and
reports how often top-1 agrees between:
  fast vs full   --decode fast vs decoding at full resolution and resizing with the same filter
  fast vs keras  --decode fast vs --decode keras (keras.utils.load_img: nearest-neighbour resize)
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "camera.png", "brick.png", "grass.png", "gravel.png", "coins.png",
                  "hubble_deep_field.jpg"]
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def source_photos() -> list[Image.Image]:
    photos = [Image.open(p).convert("RGB") for p in sorted((ROOT / "tests" / "data" / "photos").iterdir())]
    skimage = _package_dir("skimage")
    if skimage:
        photos += [Image.open(skimage / "data" / n).convert("RGB") for n in SKIMAGE_PHOTOS
                   if (skimage / "data" / n).exists()]
    sklearn = _package_dir("sklearn")
    if sklearn:
        photos += [Image.open(sklearn / "datasets" / "images" / n).convert("RGB") for n in SKLEARN_PHOTOS]
    return photos


def variants(photo: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """Crops, flips and rescales of one photo; long sides 500-2000 px."""
    w, h = photo.size
    out = [photo]
    for frac in (0.6, 0.8):
        cw, ch = int(w * frac), int(h * frac)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out.append(photo.crop((x, y, x + cw, y + ch)))
    out += [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    scaled = []
    for img in out:
        long_side = int(rng.integers(500, 2001))
        scale = long_side / max(img.size)
        scaled.append(img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.Resampling.LANCZOS))
    return scaled


def photo_set(seed: int = 0) -> list[bytes]:
    """JPEG bytes of every variant of every source photo."""
    rng = np.random.default_rng(seed)
    data = []
    for photo in source_photos():
        for img in variants(photo, rng):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(rng.integers(80, 96)))
            data.append(buf.getvalue())
    return data


def top1(model, preprocess, arrays: list[np.ndarray], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(arrays), batch):
        x = preprocess(np.stack(arrays[i:i + batch]).astype(np.float32))
        out.append(np.asarray(model(x, training=False)).argmax(1))
    return np.concatenate(out)


def measure(seeds: tuple[int, ...] = (0, 1)) -> dict[str, float | int]:
    from workers.decode import decode_fast, decode_keras
    from workers.models.efficientnet_lite import EfficientNetLite0, preprocess_input

    model = EfficientNetLite0(weights="imagenet")
    images = [jpeg for seed in seeds for jpeg in photo_set(seed)]
    size = (224, 224)
    fast = top1(model, preprocess_input, [decode_fast(d, size).array for d in images])
    full = top1(model, preprocess_input, [decode_fast(d, size, dct_scaling=False).array for d in images])
    keras_mode = top1(model, preprocess_input, [decode_keras(d, size).array for d in images])
    return {"images": len(images), "fast_vs_full": float((fast == full).mean()),
            "fast_vs_keras": float((fast == keras_mode).mean()), "full_vs_keras": float((full == keras_mode).mean())}


if __name__ == "__main__":
    print(json.dumps(measure()))
