"""Top-1 agreement of ``--precision float16|bfloat16`` with float32, per Keras backend, on real photos.

    .venv/bin/python scripts/precision.py                        # tensorflow and jax, every precision
    .venv/bin/python scripts/precision.py --backends torch --views 8

EfficientNetLite0 with its ImageNet weights (converted offline, no download) classifies views of
``tests/data/photos``: each photo whole plus ``--views`` random crops (half to all of each side, half of
them mirrored), resized to 224x224. Each backend runs in a child process (Keras fixes its backend at
import). Prints a Markdown table: top-1 agreement with float32, the largest change of the top-1 score,
and model-only images per second; the README records the last measured table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"
PRECISIONS = ("float32", "float16", "bfloat16")
SIZE, BATCH = 224, 32


def views(count: int, seed: int = 0) -> np.ndarray:
    """Every photo whole, then ``count`` random crops of each (every other one mirrored), uint8 224x224."""
    rng = np.random.default_rng(seed)
    out = []
    for path in sorted(PHOTOS.iterdir()):
        img = Image.open(path).convert("RGB")
        out.append(np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
        for i in range(count):
            w, h = (int(img.width * rng.uniform(0.5, 1)), int(img.height * rng.uniform(0.5, 1)))
            x0, y0 = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
            crop = img.crop((x0, y0, x0 + w, y0 + h)).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            if i % 2:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            out.append(np.asarray(crop))
    return np.stack(out)


def classify(x: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Top-5 indices and scores of every view, and model-only images per second (after a warm-up)."""
    from workers.contract import ModelSpec
    from workers.models.loader import build_predictor

    predictor = build_predictor(ModelSpec(name="EfficientNetLite0", weights="imagenet", task="classify",
                                          batch_size=BATCH, precision=precision))
    indices, scores = [], []
    start = time.perf_counter()
    for i in range(0, len(x), BATCH):
        out = predictor.predict(x[i:i + BATCH])
        indices.append(out["top_k_indices"])
        scores.append(out["top_k_scores"])
    return np.concatenate(indices), np.concatenate(scores), len(x) / (time.perf_counter() - start)


def child(count: int) -> None:
    """One backend (``KERAS_BACKEND``): a JSON line per precision."""
    x = views(count)
    base_idx, base_scores, _ = classify(x, "float32")
    for precision in PRECISIONS:
        row: dict[str, object] = {"backend": os.environ.get("KERAS_BACKEND", "tensorflow"), "precision": precision,
                                  "images": len(x)}
        try:
            idx, scores, ips = classify(x, precision)
        except Exception as exc:  # a precision this backend cannot run here: a row that says so
            row["error"] = str(exc).splitlines()[0][:160]
        else:
            row.update(agree=float((idx[:, 0] == base_idx[:, 0]).mean()),
                       max_top1_score_change=float(np.abs(scores[:, 0] - base_scores[:, 0]).max()),
                       images_per_s=round(ips, 1))
        print(json.dumps(row), flush=True)


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| backend | precision | top-1 agreement with float32 | max top-1 score change | img/s (model only) |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['precision']} | not supported: {r['error']} | | |")
        else:
            agree = float(r["agree"])  # type: ignore[arg-type]
            lines.append(f"| {r['backend']} | {r['precision']} | {agree:.1%} of {r['images']} | "
                         f"{float(r['max_top1_score_change']):.4f} | {r['images_per_s']} |")  # type: ignore[arg-type]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="tensorflow,jax", help="comma-separated Keras backends")
    ap.add_argument("--views", type=int, default=15, help="random crops per photo besides the whole photo")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.views)
        return
    rows = []
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend,
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, __file__, "--child", "--views", str(args.views)], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{backend}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(table(rows))
    print(f"\n{platform.machine()}, {os.cpu_count()} CPUs, EfficientNetLite0 ImageNet, batch {BATCH}")


if __name__ == "__main__":
    main()
