"""Fidelity of the fast decode path, measured with a real ImageNet model (EfficientNet-Lite0).

    .venv/bin/python scripts/fidelity.py

Builds a set of real photos (the samples inside the scikit-image and scikit-learn wheels and the
repository's own, as crops, flips and rescales, saved as large JPEGs so the DCT shortcut applies) and
reports how often top-1 agrees between:
  fast vs full   --decode fast vs decoding at full resolution and resizing with the same filter
  fast vs keras  --decode fast vs --decode keras (keras.utils.load_img: nearest-neighbour resize)

    .venv/bin/python scripts/fidelity.py --choices

compares instead each DCT-scaling factor and ``reducing_gap`` tried for ``fast`` (the README's table):
top-1 agreement with the full decode, and decode milliseconds per camera-sized (1024x768) JPEG. The
first row is the measurement's own noise floor: the full decode resized with the same filter in
floating point (one rounding instead of two), which moves only labels that were a near tie.

    .venv/bin/python scripts/fidelity.py --choices --photos DIR [--long-side 1024]

runs the choices on a folder of photos instead (each rescaled to a long side of 1024 px and saved as a
JPEG of quality 90), e.g. a clone of github.com/EliSchwartz/imagenet-sample-images (one ImageNet photo
per class). Files named after their WordNet id (``n01440764_tench.JPEG``) also give each choice's top-1
accuracy against the true class.

    python3 scripts/fidelity.py --gpu-decode [--photos DIR]

compares ``--decode gpu`` (nvJPEG and the resize on the GPU, with its per-image CPU fallback) with
``--decode fast`` on the CPU: top-1 agreement, accuracy where the class is known, how many images the
GPU decoded and the mean pixel difference, next to the noise floor (the float reference against
``fast``). Needs a CUDA GPU with torch and torchvision (the README's GPU section has the device call).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import time
from collections.abc import Callable
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


def folder_set(folder: Path, long_side: int = 1024) -> tuple[list[bytes], list[int | None]]:
    """Each photo of ``folder`` rescaled (Lanczos) to ``long_side`` and saved as a JPEG of quality 90, and
    its ImageNet class index when its name starts with the class's WordNet id, else None."""
    wnids = {wnid: i for i, wnid in enumerate(_wordnet_ids())}
    data, truth = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        img = Image.open(path).convert("RGB")
        scale = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        data.append(buf.getvalue())
        truth.append(wnids.get(path.name.split("_")[0]))
    return data, truth


def photos_and_classes(photos: Path | None, long_side: int,
                       seeds: tuple[int, ...]) -> tuple[list[bytes], list[int | None]]:
    """The wheels' photo set (classes unknown), or ``folder_set(photos, long_side)``."""
    if photos is None:
        images = [jpeg for seed in seeds for jpeg in photo_set(seed)]
        return images, [None] * len(images)
    return folder_set(photos, long_side)


def _wordnet_ids() -> list[str]:
    from importlib import resources

    index = json.loads(resources.files("workers.models").joinpath("imagenet_class_index.json").read_text())
    return [index[str(i)][0] for i in range(len(index))]


def float_reference(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The full decode resized with the same antialiased bilinear filter in floating point (Pillow mode
    ``F``, channel by channel) and rounded once: the reference but for its intermediate rounding."""
    from workers.decode import RESAMPLE, open_image, to_rgb

    img = to_rgb(open_image(data))
    height, width = size
    channels = [np.asarray(c.convert("F").resize((width, height), RESAMPLE)) for c in img.split()]
    return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def gpu_decoded(images: list[bytes], size: tuple[int, int] = (224, 224), batch: int = 32,
                device: str | None = None) -> tuple[list[np.ndarray | None], int]:
    """Each image through ``--decode gpu``'s batch decoder, back on the host (None for an error row), and
    how many of them nvJPEG decoded (the rest went to the CPU fallback)."""
    from workers.decode_gpu import batch_decoder

    decoder = batch_decoder(size, device=device)
    out: list[np.ndarray | None] = []
    on_device = 0
    for start in range(0, len(images), batch):
        result = decoder.decode(images[start:start + batch])
        host = result.x.cpu().numpy() if result.x is not None else []
        arrays: list[np.ndarray | None] = [None] * len(result.errors)
        for row, i in enumerate(result.ok):
            arrays[i] = host[row]
        out += arrays
        on_device += result.on_device
    return out, on_device


def compare_decodes(images: list[bytes], truth: list[int | None], decoded: list[np.ndarray | None],
                    on_device: int, classify: Callable[[list[np.ndarray]], np.ndarray]) -> dict[str, float | int]:
    """Top-1 of ``decoded`` (another decoder's arrays, None for an error) against ``--decode fast``'s, and
    the float reference's against ``fast``'s (the noise floor); ``classify`` gives top-1 of arrays."""
    from workers.decode import decode_fast

    size = (224, 224)
    fast_arrays = [decode_fast(d, size).array for d in images]
    kept = [i for i, array in enumerate(decoded) if array is not None]
    fast = classify([fast_arrays[i] for i in kept])
    other = classify([decoded[i] for i in kept])  # type: ignore[misc]
    floor = classify([float_reference(images[i], size) for i in kept])
    diff = np.mean([np.abs(decoded[i].astype(np.int16) - fast_arrays[i]).mean() for i in kept])  # type: ignore[union-attr]
    result: dict[str, float | int] = {
        "images": len(images), "decoded": len(kept), "on_device": on_device,
        "agreement": round(float((other == fast).mean()), 4), "disagree": int((other != fast).sum()),
        "noise_floor": round(float((floor == fast).mean()), 4), "mean_abs_diff": round(float(diff), 3)}
    known = np.array([truth[i] is not None for i in kept])
    if known.any():
        labels = np.array([truth[i] for i in kept])[known]
        result["accuracy_fast"] = round(float((fast[known] == labels).mean()), 4)
        result["accuracy_other"] = round(float((other[known] == labels).mean()), 4)
    return result


def measure_gpu_decode(photos: Path | None = None, long_side: int = 1024, seeds: tuple[int, ...] = (0, 1),
                       device: str | None = None) -> dict[str, float | int]:
    """``--decode gpu`` against ``--decode fast`` on the wheels' photos or those of ``photos``."""
    from workers.decode_gpu import check_available
    from workers.models.efficientnet_lite import EfficientNetLite0, preprocess_input

    check_available(device)  # before the photos are made
    images, truth = photos_and_classes(photos, long_side, seeds)
    decoded, on_device = gpu_decoded(images, device=device)
    model = EfficientNetLite0(weights="imagenet")
    return compare_decodes(images, truth, decoded, on_device, lambda arrays: top1(model, preprocess_input, arrays))


# (draft factor, reducing_gap) pairs compared by --choices; None: the full decode itself (the reference)
CHOICES: list[tuple[float | None, float | None]] = [
    (None, None), (4.0, None), (4.0, 3.0), (4.0, 2.0), (3.0, None), (2.5, None), (2.0, None), (1.5, None),
    (1.0, None)]


def camera_jpegs(count: int = 64, size: tuple[int, int] = (1024, 768)) -> list[bytes]:
    """``count`` JPEGs of ``size`` (quality 90) made from the real photos, for decode timing."""
    photos = source_photos()
    out = []
    for i in range(count):
        buf = io.BytesIO()
        photos[i % len(photos)].resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def measure_choices(seeds: tuple[int, ...] = (0, 1), rounds: int = 7, photos: Path | None = None,
                    long_side: int = 1024) -> list[dict[str, float | None]]:
    """Each of ``CHOICES``: top-1 agreement with the full decode (and accuracy, for photos of known
    class), and the median over ``rounds`` of the milliseconds one thread takes per 1024x768 JPEG (the
    choices interleaved, so a busy machine slows them alike). The photos are the wheels' set, or those of
    the folder ``photos`` (``folder_set``). A first row, ``float reference``, is the noise floor."""
    from workers.decode import decode_fast
    from workers.models.efficientnet_lite import EfficientNetLite0, preprocess_input

    model = EfficientNetLite0(weights="imagenet")
    images, truth = photos_and_classes(photos, long_side, seeds)
    known = np.array([t is not None for t in truth])
    labels = np.array([-1 if t is None else t for t in truth])
    size = (224, 224)

    def decoder(factor: float | None, gap: float | None) -> Callable[[bytes], np.ndarray]:
        if factor is None:
            return lambda data: decode_fast(data, size, dct_scaling=False).array
        return lambda data: decode_fast(data, size, draft_factor=factor, reducing_gap=gap).array

    def row(name: dict[str, float | None], predicted: np.ndarray) -> dict[str, float | None]:
        out = {**name, "agreement": round(float((predicted == full).mean()), 4),
               "disagree": int((predicted != full).sum()), "images": len(images)}
        if known.any():
            out["accuracy"] = round(float((predicted[known] == labels[known]).mean()), 4)
        return out

    full = top1(model, preprocess_input, [decoder(None, None)(d) for d in images])
    floor = row({"draft_factor": None, "reducing_gap": None, "float_reference": True},
                top1(model, preprocess_input, [float_reference(d, size) for d in images]))
    print(json.dumps(floor))
    camera = camera_jpegs()
    rows: list[dict[str, float | None]] = []
    for factor, gap in CHOICES:
        rows.append(row({"draft_factor": factor, "reducing_gap": gap},
                        top1(model, preprocess_input, [decoder(factor, gap)(d) for d in images])))
    times: list[list[float]] = [[] for _ in CHOICES]
    for _ in range(rounds):
        for i, (factor, gap) in enumerate(CHOICES):
            decode = decoder(factor, gap)
            start = time.perf_counter()
            for data in camera:
                decode(data)
            times[i].append((time.perf_counter() - start) * 1000 / len(camera))
    for result, ms in zip(rows, times):
        result["ms_per_1024x768"] = round(statistics.median(ms), 2)
        print(json.dumps(result))
    return [floor, *rows]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--choices", action="store_true", help="compare the DCT-scaling and reducing_gap choices")
    ap.add_argument("--gpu-decode", action="store_true", help="compare --decode gpu with --decode fast")
    ap.add_argument("--photos", type=Path, help="with --choices or --gpu-decode: a folder of photos instead of the "
                    "wheels' set")
    ap.add_argument("--long-side", type=int, default=1024, help="the long side --photos are rescaled to")
    args = ap.parse_args()
    mode = args.choices or args.gpu_decode
    if args.photos is not None and not (mode and args.photos.is_dir()):
        ap.error(f"--photos {args.photos}: {'not a folder' if mode else 'goes with --choices or --gpu-decode'}")
    if args.gpu_decode:
        from workers.errors import ConfigError

        try:
            print(json.dumps(measure_gpu_decode(photos=args.photos, long_side=args.long_side)))
        except ConfigError as exc:  # no CUDA, no torchvision
            ap.exit(1, f"{ap.prog}: {exc}\n")
    elif args.choices:
        measure_choices(photos=args.photos, long_side=args.long_side)
    else:
        print(json.dumps(measure()))
