"""`collect` exits cleanly: Arrow is never handed Python memory, and no reader thread outlives it.

The abort this guards against ("terminate called without an active exception", exit 134, after
"collected N rows"): Arrow's Parquet scan releases its source and read buffers on its own threads
after ``read_table`` returns; when those were Python objects (``io.BytesIO`` of an S3 object), the
release takes the GIL, and a thread that does so while the interpreter is exiting ends inside a C++
destructor. ``scripts/collect_loop.py`` is the long stress run; these tests are the fast guard.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.collect import collect, get_job, shard_tables
from scripts.collect_loop import JOB, make_job, probe_command
from tests.conftest import ROOT, batchinfer
from workers.contract import OutputSpec
from workers.redis_jobstore import RedisJobStore
from workers.sinks import parquet


def _new_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before]


class _Remote:
    """A storage backend that is not the local disk (as S3): it hands out the bytes of a local file."""

    def __init__(self) -> None:
        self.data = b""

    def read(self, uri: str) -> bytes:
        self.data = Path(uri.split("://", 1)[1]).read_bytes()
        return self.data


def test_remote_shards_reach_arrow_as_arrow_memory(tmp_path, monkeypatch):
    path = tmp_path / "shard-000000.parquet"
    table = pa.table({"uri": [f"/img/{i}.jpg" for i in range(100)], "score": [i / 100 for i in range(100)]})
    pq.write_table(table, path)
    remote = _Remote()
    monkeypatch.setattr(parquet, "storage_for", lambda uri: remote)

    source = parquet._source(f"mem://{path}")
    assert isinstance(source, pa.BufferReader)
    held = sys.getrefcount(remote.data) - 2  # less ours: the attribute and the call's argument
    assert held == 0, "Arrow must not keep the Python bytes (or a BytesIO over them) alive"
    assert parquet.read_shard(f"mem://{path}").equals(table)
    assert parquet.read_schema(f"mem://{path}") == table.schema
    assert parquet._source(str(path)) == str(path), "local files are read in place"


def test_reading_remote_shards_then_exiting_at_once_never_aborts(tmp_path):
    """``collect_loop.py --probe`` in small: before the fix about 1 run in 30 aborted on 2 busy cores."""
    for i in range(8):
        pq.write_table(pa.table({"uri": [f"/img/{i}/{j}.jpg" for j in range(200)], "x": list(range(200))}),
                       tmp_path / f"shard-{i:06d}.parquet")
    command = probe_command(str(tmp_path), 8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run(_: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)

    with ThreadPoolExecutor(3) as pool:  # three at once: the load that makes the race show
        runs = list(pool.map(run, range(24)))
    bad = [(r.returncode, r.stderr[-500:]) for r in runs if r.returncode or "terminate called" in r.stderr]
    assert not bad, bad


def test_collect_of_s3_shards_exits_cleanly_every_time(s3, redis_url, redis_client, tmp_path):
    """The CI failure: shards on S3, collected to a local file, many times over."""
    s3.client().create_bucket(Bucket="exit")
    make_job(redis_url, "s3://exit/shards", shards=12, rows=50, pending=1)
    out = tmp_path / "all.parquet"
    for _ in range(8):
        proc = batchinfer("collect", JOB, "--output", str(out), "--allow-partial", broker=redis_url, check=False,
                          timeout=120)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
        assert "collected 550 rows" in proc.stderr
    assert pq.read_table(out).num_rows == 550


def test_no_reader_thread_outlives_collect(redis_url, redis_client, tmp_path):
    make_job(redis_url, str(tmp_path / "shards"), shards=12, rows=10, pending=0)
    store = RedisJobStore.from_url(redis_url)
    before = set(threading.enumerate())
    assert collect(store, JOB, str(tmp_path / "all.parquet"), progress=False) == 120
    assert _new_threads(before) == []

    # a consumer that stops early (a write error, Ctrl-C) and closes the generator: the queued reads are
    # dropped and the running ones joined then, not when the generator is collected (maybe at exit)
    job = get_job(store, JOB, shards=True)
    tables = shard_tables(job, OutputSpec.from_dict(job.spec["output"]), ahead=2)
    assert next(tables).num_rows == 10
    assert _new_threads(before)
    tables.close()
    assert _new_threads(before) == []


def test_a_write_error_stops_the_readers_before_collect_raises(redis_url, redis_client, tmp_path, monkeypatch):
    make_job(redis_url, str(tmp_path / "shards"), shards=12, rows=10, pending=0)
    store = RedisJobStore.from_url(redis_url)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("producer.collect.write_tables", broken)
    before = set(threading.enumerate())
    with pytest.raises(OSError, match="disk full") as caught:
        collect(store, JOB, str(tmp_path / "all.parquet"), progress=False)
    # the traceback keeps collect's frame alive (an uncaught error's stays in sys.last_traceback until exit)
    assert caught.tb is not None
    assert _new_threads(before) == [], "the readers are joined before the error leaves collect"
