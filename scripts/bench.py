"""Throughput: the model alone on ready tensors vs the whole shard pipeline from JPEG files, per Keras backend,
precision, model, batch size and decode mode, in one run on one machine.

    python scripts/bench.py                                  # MobileNetV2, batch 32, 512 JPEGs, this backend
    python scripts/bench.py --backend jax,torch --model MobileNetV2,ResNet50 --batch-size 32,64,128,256 \\
        --precision float32,bfloat16 --decode fast,gpu --images 4096 --markdown

Each backend runs in a subprocess of its own (``KERAS_BACKEND`` is fixed when Keras is imported). For each
model, precision and batch size one predictor is built and measured twice: on a random uint8 batch already in
memory (model alone: the batch's upload, preprocessing and the model, as a shard's predict stage does them),
then through ``process_shard`` over ``--images`` camera-sized JPEGs (``--image-size``, default 1024x768;
read, decode, predict, write to Parquet), once per ``--decode`` mode. ``gpu`` rows say why they were skipped
on a machine without CUDA or torchvision. Stage seconds come from the shard's own timings; GPU utilisation
and memory are sampled (pynvml, else ``nvidia-smi``) during the end-to-end runs.

Prints one JSON line per row (every row has every field; ``status`` is ``ok``, ``skipped: ...`` or
``error: ...``), and with ``--markdown`` a table for the README. Random weights: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("read_decode", "wait", "predict", "write", "total")
FIELDS = ("date", "device", "cpus", "machine", "backend", "precision", "model", "task", "batch_size", "images",
          "image_size", "decode", "status", "model_images_per_s", "end_to_end_images_per_s", "ratio",
          "stage_seconds", "gpu_util_mean", "gpu_util_max", "gpu_mem_mib_max", "build_seconds", "versions")


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (1024, 768)) -> list[str]:
    """``count`` distinct camera-like JPEGs of ``size`` = (width, height): ``bench_run``'s, listed."""
    from bench_run import make_jpegs as make  # scripts/ is on the path of a script run from it

    make(folder, count, size)
    return sorted(str(p) for p in folder.glob("*.jpg"))


def _list(text: str, kind: type = str) -> list[Any]:
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def _image_size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=_list, default=["MobileNetV2"], help="comma-separated (default MobileNetV2)")
    ap.add_argument("--batch-size", type=lambda t: _list(t, int), default=[32], help="comma-separated (default 32)")
    ap.add_argument("--backend", type=_list, default=[os.environ.get("KERAS_BACKEND", "tensorflow")],
                    help="tensorflow, jax, torch, comma-separated (default $KERAS_BACKEND or tensorflow)")
    ap.add_argument("--precision", type=_list, default=["float32"], help="float32, float16, bfloat16, comma-separated")
    ap.add_argument("--decode", type=_list, default=["fast", "gpu"], help="fast, keras, gpu (default fast,gpu)")
    ap.add_argument("--task", default="classify")
    ap.add_argument("--images", type=int, default=512, help="JPEG files per end-to-end run (default 512)")
    ap.add_argument("--image-size", type=_image_size, default=(1024, 768), metavar="WxH", help="default 1024x768")
    ap.add_argument("--images-dir", help="use the JPEGs of this folder (default: generate them in a temporary one)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table of the rows")
    ap.add_argument("--in-process", action="store_true", help="run the first --backend here, no subprocess "
                    "(KERAS_BACKEND must match)")
    return ap.parse_args(argv)


# --- one backend, in this process -------------------------------------------------------------------------


class GpuSampler:
    """GPU utilisation (%) and memory used (MiB) every ``interval`` seconds in a thread, through pynvml or
    ``nvidia-smi``; nothing where neither is there."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read = _nvml_reader() or _smi_reader()

    def __enter__(self) -> GpuSampler:
        if self._read is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample = self._read() if self._read else None
            if sample:
                self.samples.append(sample)

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_mem_mib_max": None}
        util = [u for u, _ in self.samples]
        return {"gpu_util_mean": round(float(np.mean(util)), 1), "gpu_util_max": max(util),
                "gpu_mem_mib_max": max(m for _, m in self.samples)}


def _nvml_reader() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no pynvml, no driver, no GPU: try nvidia-smi
        return None

    def read() -> tuple[float, float]:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
        return float(rates.gpu), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

    return read


def _smi_reader() -> Any:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None

    def read() -> tuple[float, float] | None:
        out = subprocess.run([smi, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, timeout=10)
        try:
            util, mem = out.stdout.strip().splitlines()[0].split(",")
            return float(util), float(mem)
        except (IndexError, ValueError):
            return None

    return read


def device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    return f"cpu ({os.cpu_count()} cores)"


def model_feed(predictor: Any, x: np.ndarray) -> Any:
    """A uint8 host batch as the shard pipeline hands it to ``predict`` (through ``preprocess``, outside the timing)."""
    return predictor.preprocess(x)


def _versions() -> dict[str, str]:
    import keras

    out = {"keras": keras.__version__, "python": platform.python_version()}
    for name in ("tensorflow", "jax", "torch", "torchvision"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    return out


def run_backend(args: argparse.Namespace, uris: list[str], backend: str) -> Iterator[dict[str, Any]]:
    """Every row of one backend (the one this process's Keras runs on)."""
    import keras

    from workers.contract import ModelSpec
    from workers.errors import ConfigError
    from workers.models.loader import build_predictor

    if keras.backend.backend() != backend:
        raise SystemExit(f"bench: --in-process runs on Keras's backend {keras.backend.backend()!r}, not {backend!r} "
                         f"(set KERAS_BACKEND={backend})")
    base = {"date": datetime.date.today().isoformat(), "device": device_name(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "backend": backend, "task": args.task, "images": len(uris),
            "image_size": "x".join(map(str, args.image_size))}
    for model in args.model:
        for precision in args.precision:
            for batch_size in args.batch_size:
                row = dict.fromkeys(FIELDS) | base | {"model": model, "precision": precision,
                                                      "batch_size": batch_size}
                spec = ModelSpec(name=model, weights="none", task=args.task, batch_size=batch_size,
                                 precision=precision)
                try:
                    t0 = time.perf_counter()
                    predictor = build_predictor(spec)
                    row["build_seconds"] = round(time.perf_counter() - t0, 2)
                    row["model_images_per_s"] = round(model_only(predictor, batch_size, len(uris)), 1)
                    row["versions"] = _versions()
                except Exception as exc:  # a row that says why, and the next configuration
                    for decode in args.decode:
                        yield row | {"decode": decode, "status": _error(exc)}
                    continue
                for decode in args.decode:
                    try:
                        yield row | {"decode": decode} | end_to_end(predictor, spec, decode, uris, row)
                    except ConfigError as exc:
                        yield row | {"decode": decode, "status": f"skipped: {_why(str(exc))}"}
                    except Exception as exc:  # a row that says why, and the next configuration
                        yield row | {"decode": decode, "status": _error(exc)}
                del predictor  # the next configuration's model gets the device memory
                keras.backend.clear_session()
                gc.collect()


def _error(exc: BaseException) -> str:
    """One line: TensorFlow's errors put "in user code:" first and the message last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"error: {type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def _why(message: str) -> str:
    if "CUDA" in message:
        return "no CUDA"
    if "PyTorch and torchvision" in message:
        return "no torch/torchvision"
    return message


def model_only(predictor: Any, batch_size: int, images: int) -> float:
    h, w = predictor.input_hw
    x = np.random.default_rng(0).integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)
    feed = model_feed(predictor, x)
    for _ in range(3):  # compile and warm up
        predictor.predict(feed)
    n = max(5, images // batch_size)
    start = time.perf_counter()
    for _ in range(n):
        predictor.predict(feed)
    return n * batch_size / (time.perf_counter() - start)


def end_to_end(predictor: Any, spec: Any, decode: str, uris: list[str], row: dict[str, Any]) -> dict[str, Any]:
    from workers.contract import OutputSpec, ShardTask
    from workers.pipeline import process_shard

    spec = dataclasses.replace(spec, decode=decode)
    with tempfile.TemporaryDirectory(prefix="bench-out-") as out:
        warm = ShardTask("bench-warm", 0, uris[:2 * spec.batch_size], spec, OutputSpec(path=f"{out}/warm"))
        process_shard(warm, predictor)  # the decode path's first use (CUDA context, nvJPEG handles)
        task = ShardTask("bench", 0, uris, spec, OutputSpec(path=f"{out}/run"))
        with GpuSampler() as sampler:
            result = process_shard(task, predictor)
    e2e = result.images / result.timings["total"]
    model = row["model_images_per_s"]
    return {"status": "ok" if not result.errors else f"ok ({result.errors} error rows)",
            "end_to_end_images_per_s": round(e2e, 1), "ratio": round(e2e / model, 3) if model else None,
            "stage_seconds": {k: round(result.timings.get(k, 0.0), 3) for k in STAGES}, **sampler.summary()}


# --- the matrix: one subprocess per backend ------------------------------------------------------------------


def child_rows(args: argparse.Namespace, argv: list[str], backend: str, images_dir: str) -> Iterator[dict[str, Any]]:
    """Run this script for one backend in a subprocess; its JSON lines, or error rows for what it did not say."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *_without(argv, "--backend", "--images-dir", "--markdown"),
           "--backend", backend, "--images-dir", images_dir, "--in-process"]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    planned = {(m, p, b, d) for m in args.model for p in args.precision for b in args.batch_size for d in args.decode}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                planned.discard((row["model"], row["precision"], row["batch_size"], row["decode"]))
                yield row
        proc.wait()
        err.seek(0)
        tail = [line for line in err.read().splitlines() if line.strip()][-1:] or [f"exit status {proc.returncode}"]
    for model, precision, batch_size, decode in sorted(planned):
        yield dict.fromkeys(FIELDS) | {"backend": backend, "model": model, "precision": precision,
                                       "batch_size": batch_size, "decode": decode,
                                       "status": f"error: {tail[0].strip()}"[:300]}


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--markdown":
            continue
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| backend | precision | model | batch | decode | model alone (img/s) | end to end (img/s) | ratio "
             "| read+decode / wait / predict / write (s) | GPU util mean/max (%) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        stages = r.get("stage_seconds") or {}
        stage_text = " / ".join(f"{stages[k]:.2f}" for k in STAGES[:4]) if stages else ""
        util = f"{r['gpu_util_mean']:.0f} / {r['gpu_util_max']:.0f}" if r.get("gpu_util_mean") is not None else ""
        cells = [r["backend"], r["precision"], r["model"], r["batch_size"], r["decode"],
                 r.get("model_images_per_s") or "", r.get("end_to_end_images_per_s") or "", r.get("ratio") or "",
                 stage_text, util, r["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    made = None
    if args.images_dir:
        uris = sorted(str(p) for p in Path(args.images_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        uris = uris[:args.images]
    else:
        made = tempfile.mkdtemp(prefix="bench-jpegs-")
        uris = make_jpegs(Path(made), args.images, args.image_size)
    rows: list[dict[str, Any]] = []
    try:
        for backend in args.backend[:1] if args.in_process else args.backend:
            if args.in_process:
                produced = run_backend(args, uris, backend)
            else:
                produced = child_rows(args, argv, backend, str(Path(uris[0]).parent))
            for row in produced:
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
