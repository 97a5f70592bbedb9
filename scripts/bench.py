"""Throughput benchmark: the model on ready tensors vs the whole shard pipeline (read, decode, predict, write).

    .venv/bin/python scripts/bench.py --model MobileNetV2 --images 512 --batch-size 32

The target is end-to-end >= 0.85 x model-only throughput on the same machine. Results are
printed as one JSON line; the README records the last measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "tests" / "data" / "photos"


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[str]:
    """``count`` distinct JPEGs of ``size`` (crops and flips of the shipped photos)."""
    sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir())]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = sources[i % len(sources)]
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        crop = img.crop((x0, y0, x0 + 3 * w // 4, y0 + 3 * h // 4)).resize(size)
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"img{i:06d}.jpg"
        crop.save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="MobileNetV2")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--decode", default="fast")
    ap.add_argument("--task", default="classify")
    args = ap.parse_args()

    from workers.contract import ModelSpec, OutputSpec, ShardTask
    from workers.models.loader import build_predictor
    from workers.pipeline import process_shard

    spec = ModelSpec(name=args.model, weights="none", task=args.task, batch_size=args.batch_size,
                     decode=args.decode)
    predictor = build_predictor(spec)
    h, w = predictor.input_hw
    x = np.random.default_rng(0).uniform(0, 255, (args.batch_size, h, w, 3)).astype(np.float32)
    x = predictor.preprocess(x)
    predictor.predict(x)  # warm up
    n_batches = max(1, args.images // args.batch_size)
    start = time.perf_counter()
    for _ in range(n_batches):
        predictor.predict(x)
    model_ips = n_batches * args.batch_size / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        uris = make_jpegs(Path(tmp) / "in", args.images)
        task = ShardTask("bench", 0, uris, spec, OutputSpec(path=str(Path(tmp) / "out")))
        process_shard(task, predictor)  # warm the file cache
        result = process_shard(task, predictor)
    e2e_ips = result.images / result.timings["total"]
    print(json.dumps({
        "model": args.model, "task": args.task, "decode": args.decode, "batch_size": args.batch_size,
        "images": args.images, "model_images_per_s": round(model_ips, 1),
        "end_to_end_images_per_s": round(e2e_ips, 1), "ratio": round(e2e_ips / model_ips, 3),
        "stage_seconds": {k: round(v, 2) for k, v in result.timings.items()},
        "cpus": os.cpu_count(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
