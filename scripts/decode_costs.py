"""CPU milliseconds of each step of ``--decode fast`` on a camera-sized JPEG, and of the alternatives.

    .venv/bin/python scripts/decode_costs.py [--images 200] [--size 1024x768] [--rounds 5] [--markdown]

Splits the decode of a JPEG for a 224x224 input into its two steps and times, on one thread, what
ships and what could replace each step: the JPEG decode (Pillow's libjpeg-turbo; the same at 1/2 scale
in the DCT domain; with libjpeg's fast integer IDCT and plain chroma upsampling; simplejpeg and OpenCV,
when installed) and the antialiased resize (Pillow's bilinear, its box filter, a box reduce by 2 first;
OpenCV's area resize and its Gaussian pyramid step), then the whole ``decode_fast`` call. The JPEGs are
``scripts/bench_run.py``'s (crops and flips of the shipped photos, quality 90). CPU time of this
process (``time.process_time``; OpenCV held to one thread), the median over ``--rounds`` passes with
the choices interleaved. This answers "how fast could a decode be here", not "is it faithful": that is
``scripts/fidelity.py``. simplejpeg and OpenCV are not dependencies; rows for a library that is not
installed say so. "Pillow" is the build this process imports (``PYTHONPATH=.simd`` for Pillow-SIMD, which
``scripts/pillow_simd.sh --target .simd`` builds); each row says which.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import make_jpegs  # noqa: E402

from workers.decode import RESAMPLE, decode_fast, pillow_build  # noqa: E402

OUT = (224, 224)


def _pillow(data: bytes, scale: int = 1, fast_idct: bool = False) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if scale > 1:
        img.draft("RGB", (img.width // scale, img.height // scale))
    elif fast_idct:  # Pillow's decoder flag for draft mode: JDCT_FASTEST, no fancy upsampling (private)
        img.decoderconfig = (1, 1)
    img.load()
    return img


def choices() -> list[tuple[str, str, Callable[[bytes], object] | str]]:
    """(step, choice, function of the JPEG's bytes or why it cannot run)."""
    rows: list[tuple[str, str, Callable[[bytes], object] | str]] = [
        ("decode", "Pillow (shipped)", _pillow),
        ("decode", "Pillow at 1/2 scale (DCT)", lambda d: _pillow(d, scale=2)),
        ("decode", "Pillow, fast IDCT, plain upsampling", lambda d: _pillow(d, fast_idct=True)),
    ]
    try:
        import simplejpeg
        rows += [("decode", "simplejpeg", simplejpeg.decode_jpeg),
                 ("decode", "simplejpeg, fastdct and fastupsample",
                  lambda d: simplejpeg.decode_jpeg(d, fastdct=True, fastupsample=True))]
    except ImportError:
        rows.append(("decode", "simplejpeg", "not installed"))
    try:
        import cv2
        cv2.setNumThreads(1)
        rows.append(("decode", "OpenCV imdecode", lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)))
    except ImportError:
        cv2 = None
        rows.append(("decode", "OpenCV", "not installed"))
    # the resize steps start from a decoded image; each times the resize alone
    cache: dict[bytes, Image.Image] = {}

    def full(d: bytes) -> Image.Image:
        if d not in cache:
            cache[d] = _pillow(d)
        return cache[d]

    rows += [("resize", "Pillow bilinear, antialiased (shipped)", lambda d: full(d).resize(OUT, RESAMPLE)),
             ("resize", "Pillow box", lambda d: full(d).resize(OUT, Image.Resampling.BOX)),
             ("resize", "Pillow box reduce by 2, then bilinear", lambda d: full(d).reduce(2).resize(OUT, RESAMPLE))]
    if cv2 is not None:
        arrays: dict[bytes, np.ndarray] = {}

        def array(d: bytes) -> np.ndarray:
            if d not in arrays:
                arrays[d] = np.asarray(full(d))
            return arrays[d]

        rows += [("resize", "OpenCV area", lambda d: cv2.resize(array(d), OUT, interpolation=cv2.INTER_AREA)),
                 ("resize", "OpenCV pyrDown, then Pillow bilinear",
                  lambda d: Image.fromarray(cv2.pyrDown(array(d))).resize(OUT, RESAMPLE))]
    rows += [("whole", "decode_fast (shipped)", lambda d: decode_fast(d, OUT)),
             ("whole", "decode_fast, DRAFT_FACTOR 1.5 (1/2 scale)", lambda d: decode_fast(d, OUT, draft_factor=1.5))]
    return rows


def measure(images: list[bytes], rounds: int) -> list[dict[str, object]]:
    table = choices()
    runnable = [(i, fn) for i, (_, _, fn) in enumerate(table) if callable(fn)]
    for _, fn in runnable:  # warm: fills the resize rows' caches of decoded images
        for data in images:
            fn(data)
    times: dict[int, list[float]] = {i: [] for i, _ in runnable}
    for _ in range(rounds):
        for i, fn in runnable:
            start = time.process_time()
            for data in images:
                fn(data)
            times[i].append((time.process_time() - start) * 1000 / len(images))
    return [{"step": step, "choice": name,
             "ms": round(statistics.median(times[i]), 2) if i in times else None,
             **({} if callable(fn) else {"status": fn})} for i, (step, name, fn) in enumerate(table)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="1024x768", help="JPEG width x height")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--folder", help="where the JPEGs are kept (default: a folder in the temp dir)")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table instead of JSON lines")
    args = ap.parse_args()
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size {args.size}: expected WIDTHxHEIGHT, e.g. 1024x768")
    if args.images < 1 or args.rounds < 1:
        ap.error("--images and --rounds must be at least 1")
    folder = Path(args.folder or Path(tempfile.gettempdir()) / f"batchinfer-decode-{args.size}" / str(args.images))
    make_jpegs(folder, args.images, (width, height))
    images = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
    rows = measure(images, args.rounds)
    build = pillow_build()  # "Pillow" in the rows is this build (Pillow-SIMD: scripts/pillow_simd.sh)
    if not args.markdown:
        for row in rows:
            print(json.dumps({**row, "pillow": build}))
        return
    print(f"{build}:\n\n| step | choice | CPU ms per {width}x{height} JPEG |\n|---|---|---|")
    for row in rows:
        print(f"| {row['step']} | {row['choice']} | {row['ms'] if row['ms'] is not None else row['status']} |")


if __name__ == "__main__":
    main()
