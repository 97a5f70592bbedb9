"""Operations: a worker's Prometheus metrics on BATCHINFER_METRICS_PORT and `batchinfer exporter`'s job and queue
metrics, scraped over HTTP from real processes during and after real jobs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BIN, Worker, assert_one_line_error, free_port, start_probe_worker, stop_process, wait_until
from workers.errors import ConfigError
from workers.redis_jobstore import RedisJobStore

STAGES = ("read_decode", "wait", "predict", "write")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    status, text = get(url)
    assert status == 200, text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- one worker with metrics, on a queue of its own, for the module ---------------------------------------


@pytest.fixture(scope="module")
def queue() -> str:
    return f"metrics-{free_port()}"


@pytest.fixture(scope="module")
def metrics_worker(redis_url: str, queue: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, str]]:
    port = free_port()
    folder = tmp_path_factory.mktemp("metrics-worker")
    w = start_probe_worker(redis_url, folder, "metered", BATCHINFER_METRICS_PORT=str(port), BATCHINFER_QUEUE=queue,
                           PROBE_SLEEP="0.25")
    yield w, f"http://127.0.0.1:{port}"
    w.stop()


@pytest.fixture(scope="module")
def exporter(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `batchinfer exporter` process."""
    port = free_port()
    log = tmp_path_factory.mktemp("exporter") / "exporter.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "batchinfer"), "exporter", "--port", str(port), "--broker", redis_url],
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: proc.poll() is not None or _answers(url + "/healthz"), 30, "exporter")
    assert proc.poll() is None, log.read_text()
    yield url
    stop_process(proc, 10)
    assert proc.returncode == 0, log.read_text()  # SIGTERM is a clean stop


def _answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def submit(folder: Path, probe: Path, redis_url: str, queue: str, out: Path, shard_size: int = 4) -> str:
    env = {**os.environ, "BATCHINFER_BROKER_URL": redis_url, "BATCHINFER_QUEUE": queue}
    proc = subprocess.run(
        [str(BIN / "batchinfer"), "submit", str(folder), "--model-path", str(probe), "--preprocess", "none",
         "--batch-size", "2", "--shard-size", str(shard_size), "--output", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def finished(redis_url: str, job_id: str) -> bool:
    job = RedisJobStore.from_url(redis_url).get_job(job_id)
    return job is not None and job.finished


# --- the worker ----------------------------------------------------------------------------------------------


def test_worker_metrics_count_the_job_images_errors_and_stages(metrics_worker, mixed_folder, probe, redis_url,
                                                               queue, tmp_path):
    worker, base = metrics_worker
    folder, expected = mixed_folder
    errors = sum(1 for e in expected.values() if e is not None)
    total = len(expected)
    assert get(base + "/healthz")[0] == 200
    wait_until(lambda: get(base + "/readyz")[0] == 200, 30, "readiness")
    before = scrape(base + "/metrics")  # the worker may have run an earlier test's job

    def delta(name: str, **labels: str) -> float:
        return value(scrape(base + "/metrics"), name, **labels) - value(before, name, **labels)

    job_id = submit(folder, probe, redis_url, queue, tmp_path / "out")
    seen_during = wait_until(lambda: (lambda n: n if 0 < n < total else None)(
        delta("batchinfer_images_total", status="ok") + delta("batchinfer_images_total", status="error")),
        120, "images counted while the job runs", interval=0.05)
    assert 0 < seen_during < total
    wait_until(lambda: finished(redis_url, job_id), 180, "the job")
    shards = math.ceil(total / 4)
    # the task shell counts a shard once its attempt returns, just after the job state says it is done
    wait_until(lambda: delta("batchinfer_shards_total", state="done") == shards, 30, "the last shard counted")

    after = scrape(base + "/metrics")
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert d[("batchinfer_images_total", frozenset({("status", "ok")}))] == total - errors
    assert d[("batchinfer_images_total", frozenset({("status", "error")}))] == errors
    assert d[("batchinfer_shards_total", frozenset({("state", "done")}))] == shards
    assert d[("batchinfer_shard_seconds_count", frozenset())] == shards
    batches = (total // 4) * 2 + math.ceil(total % 4 / 2)  # shards of 4, batches of 2
    assert d[("batchinfer_batch_size_count", frozenset())] == batches
    assert d[("batchinfer_batch_size_sum", frozenset())] == total
    for stage in STAGES:  # every batch timed in every stage (write: each batch plus each shard's commit)
        count = d[("batchinfer_stage_seconds_count", frozenset({("stage", stage)}))]
        assert count == (batches + shards if stage == "write" else batches), stage
        assert d[("batchinfer_stage_seconds_sum", frozenset({("stage", stage)}))] >= 0
    # the probe sleeps 0.25 s per batch inside the model: predict holds that time
    assert d[("batchinfer_stage_seconds_sum", frozenset({("stage", "predict")}))] >= 0.25 * batches * 0.9
    loads = [v for (name, _), v in after.items() if name == "batchinfer_model_load_seconds_count"]
    assert sum(loads) >= 1
    assert value(after, "batchinfer_worker_resident_memory_bytes") > 50e6  # a process with Keras in it


def test_metrics_survive_a_killed_pool_process(metrics_worker, mixed_folder, probe, redis_url, queue, tmp_path):
    """Counters recorded by a pool child that is SIGKILLed stay counted (their files outlive it); its gauges
    go, and the replacement child's come."""
    worker, base = metrics_worker
    before = scrape(base + "/metrics")
    ok_before = value(before, "batchinfer_images_total", status="ok")
    children = Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    wait_until(lambda: Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()
               not in ([], children), 60, "a new pool process")
    after = scrape(base + "/metrics")
    assert value(after, "batchinfer_images_total", status="ok") == ok_before
    assert value(after, "batchinfer_worker_resident_memory_bytes") == 0  # the dead child's gauge is gone
    folder, expected = mixed_folder
    job_id = submit(folder, probe, redis_url, queue, tmp_path / "out")
    wait_until(lambda: finished(redis_url, job_id), 180, "the job on the new pool process")
    final = scrape(base + "/metrics")
    ok = sum(1 for e in expected.values() if e is None)
    assert value(final, "batchinfer_images_total", status="ok") == ok_before + ok
    assert value(final, "batchinfer_worker_resident_memory_bytes") > 50e6


def test_a_taken_metrics_port_is_one_line(redis_url, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "BATCHINFER_BROKER_URL": redis_url, "BATCHINFER_METRICS_PORT": str(port)}
        proc = subprocess.run([str(BIN / "celery"), "-A", "workers", "worker", "--concurrency", "1",
                               "--without-gossip", "--without-mingle"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "batchinfer worker: error" in line]
    assert lines == [f"batchinfer worker: error: BATCHINFER_METRICS_PORT: cannot listen on 0.0.0.0 port {port}: "
                     "Address already in use"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_port_range_takes_the_first_free_port():
    """Several workers on one host share a range: each takes the first port free, and none left is an error."""
    from prometheus_client import CollectorRegistry

    from workers.metrics.http import Endpoint, bind

    app = Endpoint(CollectorRegistry())
    first = bind(app, "127.0.0.1", (0, 0))
    low = first.server_address[1]
    servers = [first]
    try:
        with pytest.raises(ConfigError, match=rf"--port: cannot listen on 127.0.0.1 any port of {low}-{low + 3}"):
            for _ in range(4):
                servers.append(bind(app, "127.0.0.1", (low, low + 3)))
        ports = [s.server_address[1] for s in servers]
        assert ports == sorted(set(ports)) and ports[0] == low and ports[-1] <= low + 3 and len(ports) >= 2
    finally:
        for server in servers:
            server.server_close()


def test_metrics_port_settings():
    from workers.settings import Settings

    assert Settings.from_env({}).metrics_ports is None
    assert Settings.from_env({"BATCHINFER_METRICS_PORT": "9808"}).metrics_ports == (9808, 9808)
    assert Settings.from_env({"BATCHINFER_METRICS_PORT": "9808-9815"}).metrics_ports == (9808, 9815)
    for bad in ("http", "9808-", "0", "9815-9808", "70000"):
        with pytest.raises(ConfigError, match="BATCHINFER_METRICS_PORT"):
            Settings.from_env({"BATCHINFER_METRICS_PORT": bad})


def test_a_bad_metrics_port_is_one_line_for_any_command(cli):
    result = cli("jobs", env={"BATCHINFER_METRICS_PORT": "nine"})
    assert_one_line_error(result, "BATCHINFER_METRICS_PORT must be a port")


# --- the exporter --------------------------------------------------------------------------------------------


def test_exporter_follows_queue_depth_and_job_progress(exporter, metrics_worker, mixed_folder, probe, redis_url,
                                                       queue, tmp_path):
    folder, expected = mixed_folder
    total, errors = len(expected), sum(1 for e in expected.values() if e is not None)
    shards = math.ceil(total / 2)
    job_id = submit(folder, probe, redis_url, queue, tmp_path / "out", shard_size=2)
    seen: list[tuple[float, float, float, float]] = []  # (depth, queued, running, images done)

    def observe() -> bool:
        m = scrape(exporter + "/metrics")
        done = value(m, "batchinfer_job_shards", job=job_id, state="done")
        depth = value(m, "batchinfer_queue_depth", queue=queue)
        # one job on this queue: its depth is every shard not finished, whenever we look
        assert depth == shards - done - value(m, "batchinfer_job_shards", job=job_id, state="failed")
        assert depth == value(m, "batchinfer_queue_shards", queue=queue, state="queued") + value(
            m, "batchinfer_queue_shards", queue=queue, state="running")
        images = value(m, "batchinfer_job_images", job=job_id, state="ok") + value(
            m, "batchinfer_job_images", job=job_id, state="error")
        seen.append((depth, value(m, "batchinfer_queue_shards", queue=queue, state="queued"),
                     value(m, "batchinfer_queue_shards", queue=queue, state="running"), images))
        return depth == 0

    wait_until(observe, 240, "the queue to drain", interval=0.2)
    depths = [s[0] for s in seen]
    assert depths == sorted(depths, reverse=True) and len(set(depths)) >= 3  # it went down, step by step
    assert any(s[2] == 1 for s in seen)  # a running shard counted in the depth (what keeps its worker alive)
    assert any(0 < s[3] < total for s in seen)  # images moved while the job ran
    m = scrape(exporter + "/metrics")
    assert value(m, "batchinfer_job_images", job=job_id, state="ok") == total - errors
    assert value(m, "batchinfer_job_images", job=job_id, state="error") == errors
    assert value(m, "batchinfer_job_images", job=job_id, state="pending") == 0
    assert value(m, "batchinfer_job_shards", job=job_id, state="done") == shards
    assert value(m, "batchinfer_job_finished_timestamp_seconds", job=job_id) > 0
    assert value(m, "batchinfer_job_images_per_second", job=job_id) > 0
    assert value(m, "batchinfer_queue_workers", queue=queue) == 1
    assert value(m, "batchinfer_state_up") == 1
    info = [dict(labels) for (name, labels), v in m.items() if name == "batchinfer_job_info" and v == 1]
    mine = [i for i in info if i["job"] == job_id]
    assert mine and mine[0]["queue"] == queue and mine[0]["state"] == "done" and mine[0]["task"] == "classify"
    status, body = get(f"{exporter}/queue/{queue}")
    assert status == 200 and json.loads(body) == {"queue": queue, "queued": 0, "running": 0, "depth": 0,
                                                  "workers": 1}


def test_exporter_queue_json_counts_a_waiting_job(exporter, probe, redis_url, tmp_path):
    """A queue nobody consumes: every shard queued, none running; the depth an autoscaler starts from."""
    from tests.probe_model import make_images

    lonely = f"lonely-{free_port()}"
    make_images(tmp_path / "imgs", 5)
    job_id = submit(tmp_path / "imgs", probe, redis_url, lonely, tmp_path / "out", shard_size=2)
    status, body = get(f"{exporter}/queue/{lonely}")
    assert status == 200 and json.loads(body) == {"queue": lonely, "queued": 3, "running": 0, "depth": 3,
                                                  "workers": 0}
    m = scrape(exporter + "/metrics")
    assert value(m, "batchinfer_broker_messages", queue=lonely) == 3
    assert ("batchinfer_job_eta_seconds", frozenset({("job", job_id)})) not in m  # no rate yet: no ETA
    assert value(m, "batchinfer_job_images", job=job_id, state="pending") == 5
    subprocess.run([str(BIN / "batchinfer"), "cancel", job_id, "--broker", redis_url], check=True,
                   capture_output=True)
    assert json.loads(get(f"{exporter}/queue/{lonely}")[1])["depth"] == 0  # a cancelled job's shards never start
    assert get(f"{exporter}/nothing")[0] == 404


def test_exporter_without_redis_says_so_and_keeps_serving(tmp_path):
    port, dead = free_port(), free_port()
    proc = subprocess.Popen([str(BIN / "batchinfer"), "exporter", "--port", str(port), "--broker",
                             f"redis://127.0.0.1:{dead}/0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: proc.poll() is not None or _answers(url + "/healthz"), 30, "exporter")
        m = scrape(url + "/metrics")
        assert value(m, "batchinfer_state_up") == 0
        status, body = get(url + "/queue/batchinfer")
        assert status == 503 and "cannot read the job state" in json.loads(body)["error"]
    finally:
        stop_process(proc, 10)


def test_exporter_port_taken_is_one_line(cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("exporter", "--port", str(taken.getsockname()[1]))
    assert_one_line_error(result, "--port: cannot listen on 127.0.0.1 port", "Address already in use")
