"""Shared fixtures: a real redis-server, real `celery -A workers worker` subprocesses, image folders."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.s3_server import s3, s3_endpoint  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "tests" / "data" / "photos"
BIN = Path(sys.executable).parent
# argparse names the subcommand
ERROR_LINE = re.compile(r"^batchinfer( (run|submit|status|collect|index|search))?: error: ")
NOBODY = 65534  # the unprivileged user a test runs a command as, when the tests run as root


def script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def redis_answers(client) -> bool:
    """Whether a Redis server answers a ping yet (still starting or loading its data: not yet)."""
    import redis

    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole test session."""
    import redis

    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    wait_until(lambda: redis_answers(client), 20, "redis-server")
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url: str):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return client


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate, then kill if it does not exit within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Worker:
    """A `celery -A workers worker` subprocess with its log file, in a process group of its own (so a test
    can kill the whole worker, main process and pool child, as a lost node would be)."""

    def __init__(self, broker: str, log: Path, cwd: Path, extra_env: dict[str, str] | None = None,
                 name: str | None = None, options: tuple[str, ...] = ("--without-gossip", "--without-mingle")) -> None:
        env = {**os.environ, "BATCHINFER_BROKER_URL": broker, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.log = log
        self.name = name or f"test-{free_port()}"
        self.fh = open(log, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "celery"), "-A", "workers", "worker", "--loglevel", "INFO", "--concurrency", "1",
             "--hostname", f"{self.name}@%h", *options],
            cwd=cwd, env=env, stdout=self.fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(lambda: self.proc.poll() is not None or b" ready." in self.log.read_bytes(), 90, "worker")
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited: {self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the main process and its pool child at once: the node is gone."""
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.fh.close()

    def stop(self) -> None:
        stop_process(self.proc, 30)
        if self.proc.returncode is not None:
            import signal

            with contextlib.suppress(ProcessLookupError):  # a pool child left behind
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.fh.close()


@pytest.fixture(scope="module")
def worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One real worker for a test module, started outside the repository (the installed package)."""
    folder = tmp_path_factory.mktemp("worker")
    w = Worker(redis_url, folder / "worker.log", cwd=folder)
    yield w
    w.stop()


def batchinfer(*args: str, broker: str | None = None, check: bool = True, timeout: float = 600,
               cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `batchinfer` command line like a user would (``env``: extra variables)."""
    env = {**os.environ, **(env or {})}
    if broker:
        env["BATCHINFER_BROKER_URL"] = broker
    proc = subprocess.run([str(BIN / "batchinfer"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"batchinfer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def submit(*args: str, broker: str) -> str:
    """`batchinfer submit ...`; the job id is the last line of stdout."""
    return batchinfer("submit", *args, broker=broker).stdout.strip().splitlines()[-1]


def collect(job_id: str, output, *, broker: str, timeout: int = 600, check: bool = True):
    """`batchinfer collect JOB --output FILE --wait`."""
    return batchinfer("collect", job_id, "--output", str(output), "--wait", "--timeout", str(timeout),
                      broker=broker, check=check)


def check_rows(frame, prefix: str, expected: dict[str, str | None]) -> None:
    """One row per input, keyed by the URI below ``prefix``; an error exactly where ``expected`` has one."""
    import pandas as pd

    assert len(frame) == len(expected), "one row per input"
    assert frame["uri"].is_unique
    rows = {uri[len(prefix):]: err for uri, err in zip(frame["uri"], frame["error"])}
    assert sorted(rows) == sorted(expected)
    for name, want in expected.items():
        got = rows[name]
        if want is None:
            assert pd.isna(got), f"{name}: unexpected error {got}"
        else:
            assert got and want in got.lower(), f"{name}: expected an error containing {want!r}, got {got!r}"


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    """Real photos mixed with hostile and tricky files; returns (folder, {name: expected error or None})."""
    from tests.images import make_image_folder

    folder = tmp_path_factory.mktemp("mixed")
    expected = make_image_folder(folder / "odd")
    expected = {f"odd/{k}": v for k, v in expected.items()}
    for photo in sorted(PHOTOS.iterdir()):
        shutil.copy(photo, folder / photo.name)
        expected[photo.name] = None
    return folder, expected


class RedisServer:
    """A real redis-server with the persistence ``infra/redis.conf`` ships (AOF, fsync every second) on a
    fixed port and folder, so a test can kill -9 it and start it again with its data."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        import redis

        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: redis_answers(client), 20, "redis-server")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe model of ``tests/probe_model.py``, saved once (a layer that sleeps or crashes on cue)."""
    from tests import probe_model

    return probe_model.save(tmp_path_factory.mktemp("probe") / "probe.keras")


def start_probe_worker(broker: str, folder: Path, name: str, options: tuple[str, ...] | None = None,
                       **env: str) -> Worker:
    """A worker named ``name`` that can load the probe model (its layer registered by the operator);
    ``options``: its command line's options (default: no gossip, no mingle)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    extra = {"PYTHONPATH": path, "BATCHINFER_CUSTOM_OBJECTS": "tests.probe_model:CUSTOM_OBJECTS", **env}
    more = {} if options is None else {"options": options}
    return Worker(broker, folder / f"{name}.log", cwd=folder, extra_env=extra, name=name, **more)


def submit_probe(folder: Path, probe: Path, broker: str, *extra: str, shard_size: int = 4,
                 env: dict[str, str] | None = None) -> str:
    """`batchinfer submit` of ``folder`` with the probe model, 2 images per batch; returns the job id."""
    sub = batchinfer("submit", str(folder), "--model-path", str(probe), "--preprocess", "none", "--batch-size", "2",
                     "--shard-size", str(shard_size), "--output", str(folder.parent / "out"), *extra, broker=broker,
                     env=env)
    return sub.stdout.strip().splitlines()[-1]


# --- the command line as a user types it, proving no model is loaded ------------------------------------


@pytest.fixture(scope="session")
def no_tf_path() -> Iterator[str]:
    """A folder of ``tensorflow`` and ``keras`` stubs that fail when imported, first on the path of a command
    that must not load a model. World-readable, so a command run as ``nobody`` sees it too."""
    stubs = Path(tempfile.mkdtemp(prefix="batchinfer-no-tf-"))
    stubs.chmod(0o755)
    for name in ("tensorflow", "keras"):
        (stubs / name).mkdir(mode=0o755)
        (stubs / name / "__init__.py").write_text(
            f"raise ImportError('{name} must not be imported by this command')\n", encoding="utf-8")
    yield str(stubs)
    shutil.rmtree(stubs, ignore_errors=True)


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINFER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH")) if p)
    return env


def unprivileged() -> list[str]:
    """The prefix that runs a command as ``nobody`` when the tests run as root (root writes anywhere)."""
    if os.geteuid() != 0:
        return []
    return [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]


@contextlib.contextmanager
def reachable_by_nobody() -> Iterator[None]:
    """Let ``nobody`` reach the checkout and its ``.venv`` for one command: CI clones into ``mktemp -d``
    (mode 0700), so the folders above them get the others' search bit (``o+x``, no listing) until it ends."""
    changed = []
    for start in (ROOT, Path(sys.prefix)):
        for folder in [start, *start.parents]:
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)


@pytest.fixture
def cli(no_tf_path):
    """``cli(*args, env=..., unprivileged=False)``: ``python -m producer.cli`` with the stubs first on its path."""
    def run(*args: str, timeout: float = 30, env: dict[str, str] | None = None,
            as_nobody: bool = False) -> subprocess.CompletedProcess:
        started = time.monotonic()
        prefix = unprivileged() if as_nobody else []
        with reachable_by_nobody() if prefix else contextlib.nullcontext():
            result = subprocess.run([*prefix, sys.executable, "-m", "producer.cli", *args], cwd=ROOT,
                                    env={**_env(no_tf_path), **(env or {})}, capture_output=True, text=True,
                                    timeout=timeout)
        result.elapsed = time.monotonic() - started  # type: ignore[attr-defined]
        return result

    return run


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A failed command that said why in exactly one ``batchinfer: error:`` line, with no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert ERROR_LINE.match(line), line
    for needle in needles:
        assert needle in line, line
    return line
