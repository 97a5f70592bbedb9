"""Whole-process benchmark: ``batchinfer run`` on camera-sized JPEGs vs the model alone on ready tensors.

    .venv/bin/python scripts/bench_run.py                # 4,096 JPEGs of 1024x768, MobileNetV2, batch 32
    .venv/bin/python scripts/bench_run.py --images 1024 --size 640x480 --repeat 1

Both sides are timed as whole processes, from process start (imports, model build, first trace
included) to exit:
  model only   a subprocess that builds the model (random weights) and runs ``predictor.predict`` on
               ready, preprocessed tensors (a few distinct batches, cycled) for the same image count
  end to end   ``batchinfer run FOLDER --model M --weights none --output X.parquet -q``, the real CLI
ratio = end-to-end images/s / model-only images/s, the median over ``--repeat`` pairs of runs (each
pair run back to back, in alternating order, so a machine shared with other work slows both sides
alike). With ``--steady N`` each side also runs on N images, and the marginal rates (extra images /
extra seconds, from the medians) give the ratio without start-up. CPU seconds of each process are
reported too. ``--draft-factor`` runs the CLI with another ``workers.decode.DRAFT_FACTOR`` (to measure
what a less faithful DCT scaling would buy). Prints one JSON line (``scripts/bench.py`` calls this for
its whole-process figure).

    .venv/bin/python scripts/bench_run.py --device-ms 70

instead runs the shard pipeline alone, in this process, on the same JPEGs with a stand-in model that
takes DEVICE_MS per batch without the host's CPU (as an accelerator does), shard after shard as
``batchinfer run`` does: the cost of each shard's start (a new pool, an empty prefetch) shows there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"


def make_jpegs(folder: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` distinct JPEGs of ``size`` = (width, height): crops and flips of the shipped photos.
    Kept between runs (a folder holding exactly ``count`` of them is reused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    sources = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.iterdir())]
    rng = np.random.default_rng(0)
    for i in range(count):
        img = sources[i % len(sources)]
        w, h = img.size
        x0, y0 = int(rng.integers(0, w // 4)), int(rng.integers(0, h // 4))
        crop = img.crop((x0, y0, x0 + 3 * w // 4, y0 + 3 * h // 4)).resize(size, Image.Resampling.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"img{i:06d}.jpg", quality=90)


def model_only(model: str, images: int, batch_size: int) -> None:
    """The child process of the model-only side: build, then predict ``images`` ready tensors."""
    t0 = time.perf_counter()
    from workers.contract import ModelSpec
    from workers.models.loader import build_predictor

    predictor = build_predictor(ModelSpec(name=model, weights="none", batch_size=batch_size))
    h, w = predictor.input_hw
    rng = np.random.default_rng(0)
    ready = [predictor.preprocess(rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8))
             for _ in range(min(8, -(-images // batch_size)))]
    t1 = time.perf_counter()
    for i, start in enumerate(range(0, images, batch_size)):
        x = ready[i % len(ready)][:min(batch_size, images - start)]
        predictor.predict(x)
        if i == 0:
            t2 = time.perf_counter()
    t3 = time.perf_counter()
    print(json.dumps({"setup_s": round(t1 - t0, 3), "first_batch_s": round(t2 - t1, 3),
                      "steady_images_per_s": round((images - min(batch_size, images)) / max(t3 - t2, 1e-9), 1)}))


class DeviceStandIn:
    """A model that takes ``seconds`` per batch and no host CPU, like an accelerator (``--device-ms``)."""

    model_name, fingerprint, preprocess_name, input_hw = "stand-in", "none", "none", (224, 224)
    feature_columns: dict[str, int] = {}
    feature_shapes: dict[str, list[int]] = {}
    labels, top_k = ["x"], 1

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return {"top_k_indices": np.zeros((len(x), 1), np.int32), "top_k_scores": np.ones((len(x), 1), np.float32)}


def shards_only(folder: Path, args: argparse.Namespace, out: Path) -> float:
    """Images per second of the shard pipeline over ``folder`` with the device stand-in."""
    from workers.contract import ModelSpec, OutputSpec, ShardTask
    from workers.pipeline import process_shard
    from workers.settings import Settings

    try:
        from workers.feed import feeder
    except ImportError:  # before one pool per process: each shard started its own
        feeder = None  # type: ignore[assignment]
    settings = Settings.from_env()
    uris = sorted(str(p) for p in folder.iterdir())
    spec = ModelSpec(name=args.model, weights="none", batch_size=args.batch_size, top_k=1, decode=args.decode)
    tasks = [ShardTask("bench", i, uris[start:start + args.shard_size], spec, OutputSpec(path=str(out)))
             for i, start in enumerate(range(0, len(uris), args.shard_size))]
    model = DeviceStandIn(args.device_ms / 1000)
    begin = time.perf_counter()
    for i, task in enumerate(tasks):
        if feeder is not None and i + 1 < len(tasks):
            feeder(settings.io_threads).announce(tasks[i + 1], model.input_hw)
        process_shard(task, model, settings)
    return len(uris) / (time.perf_counter() - begin)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) and stdout of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, proc.stdout


def _warm(folder: Path) -> None:
    """Read every file once, so both sides meet a warm page cache."""
    for path in folder.iterdir():
        path.read_bytes()


def measure(args: argparse.Namespace, folder: Path, images: int, out: Path, env: dict[str, str],
            model_first: bool) -> dict[str, float]:
    model_cmd = [sys.executable, str(Path(__file__).resolve()), "--model-only", "--model", args.model,
                 "--images", str(images), "--batch-size", str(args.batch_size)]
    cli = ["-m", "producer.cli"]
    if args.draft_factor is not None:
        cli = ["-c", f"import sys, workers.decode as d; d.DRAFT_FACTOR = {args.draft_factor}; "
               "from producer.cli import main; sys.exit(main())"]
    run_cmd = [sys.executable, *cli, "run", str(folder), "--model", args.model, "--weights", "none",
               "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--decode", args.decode,
               "--output", str(out), "-q"]
    if model_first:
        model_s, model_cpu, text = _timed(model_cmd, env)
        run_s, run_cpu, _ = _timed(run_cmd, env)
    else:
        run_s, run_cpu, _ = _timed(run_cmd, env)
        model_s, model_cpu, text = _timed(model_cmd, env)
    inner = json.loads(text.strip().splitlines()[-1])
    return {"model_s": model_s, "run_s": run_s, "model_cpu_s": model_cpu, "run_cpu_s": run_cpu,
            "model_steady_in_process": inner["steady_images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="MobileNetV2")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--size", default="1024x768", help="JPEG width x height")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--decode", default="fast", help="the run's --decode mode")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the median is reported")
    ap.add_argument("--steady", type=int, default=0, metavar="N",
                    help="also run each side on N images and report marginal (start-up free) rates")
    ap.add_argument("--folder", help="where the JPEGs are kept (default: a folder in the temp dir)")
    ap.add_argument("--draft-factor", type=float, help="run the CLI with this DRAFT_FACTOR (default: the shipped one)")
    ap.add_argument("--device-ms", type=float, help="the shard pipeline alone, with a stand-in model taking this "
                    "many milliseconds per batch and no host CPU (see above)")
    ap.add_argument("--model-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model_only:
        model_only(args.model, args.images, args.batch_size)
        return

    from workers.decode import pillow_build  # which build decodes (scripts/pillow_simd.sh)

    width, height = (int(v) for v in args.size.lower().split("x"))
    base = Path(args.folder or Path(tempfile.gettempdir()) / f"batchinfer-bench-{args.size}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device_ms is not None:
        folder = base / str(args.images)
        make_jpegs(folder, args.images, (width, height))
        _warm(folder)
        with tempfile.TemporaryDirectory() as tmp:
            rates = [shards_only(folder, args, Path(tmp)) for _ in range(args.repeat)]
        ideal = args.batch_size / (args.device_ms / 1000)
        print(json.dumps({"device_ms": args.device_ms, "images": args.images, "size": args.size,
                          "batch_size": args.batch_size, "shard_size": args.shard_size,
                          "images_per_s": round(statistics.median(rates), 1), "runs": [round(r, 1) for r in rates],
                          "device_bound_images_per_s": round(ideal, 1),
                          "ratio": round(statistics.median(rates) / ideal, 3), "cpus": os.cpu_count(),
                          "pillow": pillow_build()}))
        return
    counts = [args.images] + ([args.steady] if args.steady else [])
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            make_jpegs(base / str(n), n, (width, height))
            _warm(base / str(n))
        for i in range(args.repeat):
            for n in counts:
                runs[n].append(measure(args, base / str(n), n, Path(tmp) / "out.parquet", env, model_first=i % 2 == 0))

    def median(n: int, key: str) -> float:
        return statistics.median(r[key] for r in runs[n])

    n = args.images
    model_ips, run_ips = n / median(n, "model_s"), n / median(n, "run_s")
    pairs = [r["model_s"] / r["run_s"] for r in runs[n]]
    result: dict[str, object] = {
        "model": args.model, "images": n, "size": args.size, "batch_size": args.batch_size,
        "shard_size": args.shard_size, "decode": args.decode, "draft_factor": args.draft_factor,
        "repeat": args.repeat, "model_only_images_per_s": round(model_ips, 1),
        "end_to_end_images_per_s": round(run_ips, 1), "ratio": round(statistics.median(pairs), 3),
        "ratio_per_pair": [round(x, 3) for x in pairs],
        "model_only_s": [round(r["model_s"], 2) for r in runs[n]],
        "end_to_end_s": [round(r["run_s"], 2) for r in runs[n]],
        "model_only_cpu_s": [round(r["model_cpu_s"], 1) for r in runs[n]],
        "end_to_end_cpu_s": [round(r["run_cpu_s"], 1) for r in runs[n]],
        "model_steady_in_process_images_per_s": round(median(n, "model_steady_in_process"), 1),
    }
    if args.steady:
        small = args.steady
        model_marginal = (n - small) / (median(n, "model_s") - median(small, "model_s"))
        run_marginal = (n - small) / (median(n, "run_s") - median(small, "run_s"))
        result.update({
            "steady_from": small, "model_only_start_s": round(median(small, "model_s"), 2),
            "end_to_end_start_s": round(median(small, "run_s"), 2),
            "model_only_marginal_images_per_s": round(model_marginal, 1),
            "end_to_end_marginal_images_per_s": round(run_marginal, 1),
            "steady_ratio": round(run_marginal / model_marginal, 3),
        })
    result.update({"cpus": os.cpu_count(), "machine": platform.machine(), "pillow": pillow_build()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
