"""Dynamic batching measured: C concurrent clients against ``batchinfer serve``, with ``--max-batch 32`` and
``--max-batch 1`` in the same run.

    .venv/bin/python scripts/bench_serve.py                      # 32 clients, 20 s per setting, MobileNetV2
    .venv/bin/python scripts/bench_serve.py --clients 32 --seconds 30 --model ResNet50 --markdown
    .venv/bin/python scripts/bench_serve.py --input-size 128          # where a model call's fixed cost shows

Each setting is a real ``batchinfer serve`` process (random weights: the same arithmetic as real ones) on a
free port; C clients (``httpx.AsyncClient`` on one event loop in this process) each upload one photo at a
time (camera-like JPEGs of ``--size``, made from the shipped photos), back to back, for ``--seconds`` after
a warm-up. Reported per setting: requests/s, p50/p90/p99 latency, and the server's mean images per model
call (from ``/metrics``). The settings run in alternating order ``--repeat`` times (a shared machine slows
both alike); the table shows each one's median run. Prints one JSON line per run, then the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_run import make_jpegs  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace, max_batch: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [str(BIN / "batchinfer"), "serve", "--model", args.model, "--weights", "none", "--port", str(port),
           "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-images", "4"]
    if args.input_size:
        cmd += ["--input-size", str(args.input_size)]
    env = {k: v for k, v in os.environ.items() if k != "BATCHINFER_API_TOKEN"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"batchinfer serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("batchinfer serve did not become ready in 300 s")


def _batches(metrics: str) -> tuple[float, float]:
    count = total = 0.0
    for line in metrics.splitlines():
        if line.startswith("batchinfer_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("batchinfer_batch_size_sum"):
            total = float(line.split()[-1])
    return count, total


async def load(url: str, photos: list[bytes], clients: int, seconds: float, warmup: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def client_loop(i: int, until: float, record: bool) -> None:
            nonlocal errors
            n = i
            while time.perf_counter() < until:
                data = photos[n % len(photos)]
                n += clients
                t0 = time.perf_counter()
                r = await client.post("/predict", files=[("image", ("photo.jpg", data, "image/jpeg"))])
                if record:
                    if r.status_code != 200:
                        errors += 1
                    else:
                        latencies.append(time.perf_counter() - t0)

        end_warm = time.perf_counter() + warmup
        await asyncio.gather(*(client_loop(i, end_warm, False) for i in range(clients)))
        before = _batches((await client.get("/metrics")).text)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, t0 + seconds, True) for i in range(clients)))
        elapsed = time.perf_counter() - t0
        after = _batches((await client.get("/metrics")).text)
    latencies.sort()

    def pct(p: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    calls, images = after[0] - before[0], after[1] - before[1]
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "requests": len(latencies), "errors": errors,
            "images_per_call": images / calls if calls else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MobileNetV2")
    p.add_argument("--input-size", type=int, help="the model's square input size (default: its own)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, nargs="+", default=[32, 1], help="settings to compare (default 32 1)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--size", default="640x480", help="uploaded JPEGs' WIDTHxHEIGHT (default 640x480)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.gettempdir()) / f"batchinfer-bench-serve-{w}x{h}"
    make_jpegs(work, 64, (w, h))
    photos = [f.read_bytes() for f in sorted(work.glob("*.jpg"))]
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in args.max_batch}
    for r in range(args.repeat):
        order = args.max_batch if r % 2 == 0 else args.max_batch[::-1]
        for max_batch in order:
            proc, url = start_server(args, max_batch, work / f"serve-{max_batch}.log")
            try:
                result = asyncio.run(load(url, photos, args.clients, args.seconds, args.warmup))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            result = {"max_batch": max_batch, **result}
            runs[max_batch].append(result)
            print(json.dumps(result), flush=True)
    size = f" at {args.input_size}x{args.input_size}" if args.input_size else ""
    header = (f"{args.model}{size}, {args.clients} clients, {w}x{h} JPEG uploads, --max-wait-ms {args.max_wait_ms}, "
              f"{args.seconds:g} s per run, {os.cpu_count()} cores ({platform.processor() or platform.machine()})")
    rows = []
    for max_batch, results in runs.items():
        mid = sorted(results, key=lambda x: x["requests_per_s"])[len(results) // 2]
        rows.append((max_batch, mid))
    base = next((m for b, m in rows if b == 1), None)
    print(header)
    sep = "|" if args.markdown else " "
    print(sep.join(["--max-batch", "requests/s", "p50 ms", "p90 ms", "p99 ms", "images per model call", "speed-up"]))
    if args.markdown:
        print("|".join(["---"] * 7))
    for max_batch, m in rows:
        speed = f"{m['requests_per_s'] / base['requests_per_s']:.2f}x" if base else "-"
        print(sep.join([str(max_batch), f"{m['requests_per_s']:.1f}", f"{m['p50_ms']:.0f}", f"{m['p90_ms']:.0f}",
                        f"{m['p99_ms']:.0f}", f"{m['images_per_call']:.1f}", speed]))
    if any(m["errors"] for _, m in rows):
        print("some requests failed: see the JSON lines", file=sys.stderr)
        return 1

    return 0


if __name__ == "__main__":
    sys.exit(main())
