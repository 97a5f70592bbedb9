"""Stress ``batchinfer collect``: run it many times on one job, on a loaded machine, and count aborts.

    PYTHONPATH=. .venv/bin/python scripts/collect_loop.py --runs 200 --burn 3 [--s3] [--allow-partial] [--probe]

It starts its own ``redis-server`` on a free port (and with ``--s3`` moto's S3 server), writes a job of
``--shards`` Parquet shards through the real ``ParquetSink`` and job store (with ``--allow-partial`` one
shard is left pending), starts ``--burn`` CPU-burning processes beside it, then runs ``batchinfer
collect`` as a subprocess ``--runs`` times. ``--probe`` runs instead a process that reads the shards
with collect's reader and exits at once, the narrowest window for the abort below. A run fails when it
exits non-zero, dies of a signal (SIGABRT: -6, or 134 in a shell) or says ``terminate called``; the
summary is one JSON line and the exit status is 1 when any run failed.

The abort (issue 10): "collected N rows", then "terminate called without an active exception".
``read_shard`` gave Arrow an ``io.BytesIO`` for every non-local shard (for local ones too before
1724b04). Arrow's Parquet scan releases its source and read buffers on its own pool threads after
``read_table`` returns; releasing those Python objects takes the GIL, and a thread that asks for it
while the interpreter finalizes is ended by ``pthread_exit`` inside a C++ destructor, so the forced
unwind hits ``noexcept`` and calls ``std::terminate``. Core dump: pool thread, ``~PyBuffer`` <-
``~ReadRangeCache::LazyImpl`` <- ``~FileReaderImpl``, ``PyGILState_Ensure`` -> ``take_gil`` ->
``pthread_exit`` -> ``_Unwind_ForcedUnwind`` -> ``__gxx_personality_v0`` -> ``std::terminate``, while
the main thread is in ``Py_FinalizeEx``. Now non-local bytes are copied into Arrow's own memory.

Measured 2026-11-24 on the 2-core development machine, other engineers' tests running too:

    code       options                                         runs  aborted
    fdb98f3    --probe --burn 3                                 200    6 (-6, "terminate called ...")
    this fix   --probe --burn 3                                 200    0
    fdb98f3    --s3 --burn 3                                    300    0
    fdb98f3    --s3 --probe --burn 3                            200    0
    1724b04^   --allow-partial --burn 2                         300    0
    1724b04^   --allow-partial --burn 2 --burn-kind numpy       200    0
    this fix   --s3 --burn 3                                    200    0
    this fix   --allow-partial --burn 3                         200    0

The whole command never aborted here, not even with the old code: between its last read and its exit it
still writes, joins and runs its exit handlers, which nearly always gives Arrow's threads time to finish.
It did abort in CI and on a busier machine. The probe shows the same abort, with the same backtrace,
in about one run in thirty (real S3 adds the same kind of delay, hence 0 of 200 there).
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JOB = "loop-job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import redis

    server = shutil.which("redis-server")
    if server is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def make_job(url: str, output: str, shards: int, rows: int, pending: int) -> None:
    """A features job of ``shards`` shards of ``rows`` rows each, written as a worker would write them;
    the last ``pending`` shards are never run."""
    import numpy as np

    from workers.contract import ModelSpec, OutputSpec, ShardTask
    from workers.jobstate import Holder
    from workers.redis_jobstore import RedisJobStore
    from workers.schema import build_batch, output_schema, with_job_metadata
    from workers.settings import Settings
    from workers.sinks import open_sink

    dim = 64
    spec = OutputSpec(sink="parquet", path=output)
    store = RedisJobStore.from_url(url)
    store.create_job(JOB, {"model": {"task": "features"}, "output": spec.__dict__, "queue": "batchinfer"})
    schema = with_job_metadata(output_schema("features", feature_dim=dim), {"job_id": JOB, "task": "features"})
    for shard_id in range(shards):
        uris = [f"/img/{shard_id:04d}/{i:04d}.jpg" for i in range(rows)]
        store.add_shard(JOB, shard_id, uris)
        if shard_id >= shards - pending:
            continue
        holder = Holder("loop")
        store.begin(JOB, shard_id, holder, 60, 1)
        task = ShardTask(JOB, shard_id, uris, ModelSpec(task="features"), spec)
        feats = np.random.default_rng(shard_id).random((rows, dim), dtype=np.float32)
        with open_sink(task, schema, Settings()) as sink:
            sink.write(build_batch(schema, uris, [None] * rows, [(10, 20)] * rows, list(range(rows)),
                                   {"features": feats}))
        store.finish(JOB, shard_id, holder.token, {"images": rows, "errors": 0})
    store.finish_submit(JOB, shards, shards * rows)


def burn(kind: str) -> None:
    """Busy until killed: pure Python (one core), or numpy matrix products on OpenBLAS's threads, which
    spin while they wait, as a worker running a model does."""
    if kind == "numpy":
        import numpy as np

        a = np.random.default_rng(0).random((384, 384))
        while True:
            a = (a @ a) / 384
    x = 0
    while True:
        x = (x * 31 + 7) % 1_000_003


def _allow_cores() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def collect_command(output: Path, allow_partial: bool) -> list[str]:
    exe = Path(sys.executable).parent / "batchinfer"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "producer.cli"]
    return [*head, "collect", JOB, "--output", str(output), *(["--allow-partial"] if allow_partial else [])]


PROBE = """
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from workers.sinks import parquet

class Remote:  # mem://PATH: a local file handed over as bytes, as S3's backend hands over an object
    def read(self, uri):
        return Path(uri[len("mem://"):]).read_bytes()

if sys.argv[1].startswith("mem://"):
    parquet.storage_for = lambda uri: Remote()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(parquet.read_shard, sys.argv[1:]))
"""  # collect's reads, and the interpreter's exit right after them: the narrowest window


def probe_command(shards: str, count: int) -> list[str]:
    """The probe on the job's shards; local ones as ``mem://`` (through the non-local path of ``read_shard``)."""
    from workers.sinks.parquet import shard_uri

    prefix = "" if "://" in shards else "mem://"
    return [sys.executable, "-c", PROBE, *(prefix + shard_uri(shards, i) for i in range(count))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--shards", type=int, default=20)
    p.add_argument("--rows", type=int, default=50, help="rows per shard")
    p.add_argument("--burn", type=int, default=0, help="CPU-burning processes beside the loop")
    p.add_argument("--burn-kind", choices=("python", "numpy"), default="python")
    p.add_argument("--allow-partial", action="store_true", help="leave one shard pending, collect --allow-partial")
    p.add_argument("--output", default="out.parquet", help="file name of the collected output (sets the format)")
    p.add_argument("--s3", action="store_true", help="shards in S3 (moto's server, tests/s3_server.py), as in CI")
    p.add_argument("--probe", action="store_true", help="instead of collect, a process that reads the shards with "
                   "collect's reader (local ones as a non-local backend hands them over) on 8 threads and exits "
                   "at once: the abort's window at its narrowest")
    p.add_argument("--cores", metavar="DIR", help="let failed runs dump core into DIR (core_pattern 'core')")
    p.add_argument("--stop-on-failure", action="store_true")
    args = p.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="collect-loop-"))
    redis_proc, url = start_redis(folder)
    s3 = None
    if args.s3:
        sys.path.insert(0, str(ROOT))
        from tests.s3_server import S3Server

        s3 = S3Server(folder / "s3.log", seeds=[f"loop={folder / 'empty'}"])
        (folder / "empty").mkdir()
        s3.start()
        os.environ.update(s3.env)
    burners = [multiprocessing.Process(target=burn, args=(args.burn_kind,), daemon=True) for _ in range(args.burn)]
    codes: collections.Counter[int] = collections.Counter()
    failures: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        shards = "s3://loop/shards" if s3 else str(folder / "shards")
        make_job(url, shards, args.shards, args.rows, 1 if args.allow_partial else 0)
        for b in burners:
            b.start()
        env = {**os.environ, "BATCHINFER_BROKER_URL": url,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = (probe_command(shards, args.shards - (1 if args.allow_partial else 0)) if args.probe
                   else collect_command(folder / args.output, args.allow_partial))
        cwd = Path(args.cores).resolve() if args.cores else folder
        cwd.mkdir(parents=True, exist_ok=True)
        for i in range(args.runs):
            proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
                                  preexec_fn=_allow_cores if args.cores else None)
            codes[proc.returncode] += 1
            if proc.returncode != 0 or "terminate called" in proc.stderr:
                failures.append({"run": i, "rc": proc.returncode, "stderr": proc.stderr[-2000:]})
                print(f"run {i}: exit {proc.returncode}\n{proc.stderr[-2000:]}", file=sys.stderr)
                if args.stop_on_failure:
                    break
            if (i + 1) % 50 == 0:
                print(f"{i + 1} runs, {len(failures)} failed", file=sys.stderr, flush=True)
    finally:
        for b in burners:
            b.kill()
        if s3 is not None:
            s3.stop()
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"runs": sum(codes.values()), "failed": len(failures), "exit_codes": dict(codes),
                      "burners": f"{args.burn} {args.burn_kind}", "allow_partial": args.allow_partial, "s3": args.s3,
                      "probe": args.probe, "shards": args.shards, "seconds": round(time.monotonic() - started, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
