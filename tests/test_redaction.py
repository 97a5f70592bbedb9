"""Passwords never reach a message or a log line, whatever form the Redis URL takes (``user:password@`` or
``?password=``); the query form works everywhere (kombu alone cannot parse it)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    assert_one_line_error,
    batchinfer,
    free_port,
    redis_answers,
    start_probe_worker,
    stop_process,
    wait_until,
)
from tests.probe_model import make_images
from workers.settings import Settings, normalized_redis_url, redact, redact_text

SECRET = "s3cr3t-Pa55word"


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://app:pw@h/0", "redis://app:***@h/0"),
    ("redis://pw@h/0", "redis://***@h/0"),  # a lone userinfo: some clients read it as the password
    ("redis://h:6379/0?password=pw&db=2", "redis://h:6379/0?password=***&db=2"),
    ("rediss://h/0?ssl_cert_reqs=required&sentinel_password=pw",
     "rediss://h/0?ssl_cert_reqs=required&sentinel_password=***"),
    ("redis://h/0?token=pw", "redis://h/0?token=***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_redact_every_url_form(url, shown):
    assert redact(url) == shown
    assert redact_text(f"cannot reach {url}: refused") == f"cannot reach {shown}: refused"


def test_the_query_password_moves_into_the_userinfo():
    assert normalized_redis_url("redis://h:1/0?password=p%40ss&db=2") == "redis://:p%40ss@h:1/0?db=2"
    assert normalized_redis_url("redis://h/0?username=app&password=pw") == "redis://app:pw@h/0"
    assert normalized_redis_url("redis://:pw@h/0") == "redis://:pw@h/0"
    env = {"BATCHINFER_BROKER_URL": "redis://h/0?password=pw"}
    settings = Settings.from_env(env)
    assert settings.broker_url == settings.state_url == settings.redis_sink_url == "redis://:pw@h/0"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server that wants a password."""
    import redis

    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--requirepass", SECRET, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path_factory.mktemp("locked"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: redis_answers(redis.Redis(port=port, password=SECRET)), 20, "redis-server")
    yield port
    stop_process(proc, 10)


def test_a_job_with_a_query_password_leaves_no_secret_in_logs(locked_redis, probe, tmp_path):
    url = f"redis://127.0.0.1:{locked_redis}/0?password={SECRET}"
    make_images(tmp_path / "imgs", 4)
    worker = start_probe_worker(url, tmp_path, "locked")
    try:
        sub = batchinfer("submit", str(tmp_path / "imgs"), "--model-path", str(probe), "--preprocess", "none",
                         "--shard-size", "2", "--output", str(tmp_path / "out"), broker=url)
        job_id = sub.stdout.strip().splitlines()[-1]
        done = batchinfer("collect", job_id, "--output", str(tmp_path / "rows.parquet"), "--wait", "--timeout",
                          "180", broker=url)
        status = batchinfer("status", job_id, broker=url)
    finally:
        worker.stop()
    assert pq.read_table(tmp_path / "rows.parquet").num_rows == 4
    log = worker.text()
    assert "transport:   redis://:**@127.0.0.1" in log  # Celery's banner, with the password masked
    for text in (log, sub.stdout, sub.stderr, done.stderr, status.stdout):
        assert SECRET not in text


@pytest.mark.parametrize("form", ["redis://:{s}@127.0.0.1:{p}/0", "redis://127.0.0.1:{p}/0?password={s}",
                                  "redis://app:{s}@127.0.0.1:{p}/0"])
def test_connection_errors_never_show_the_password(cli, form):
    dead = free_port()
    result = cli("status", "some-job", "--broker", form.format(s=SECRET, p=dead))
    line = assert_one_line_error(result, "cannot reach Redis at redis://", ":***@127.0.0.1")
    assert SECRET not in line


def test_a_wrong_password_is_one_line_without_it(cli, locked_redis):
    result = cli("status", "some-job", "--broker", f"redis://127.0.0.1:{locked_redis}/0?password=wrong-{SECRET}")
    line = assert_one_line_error(result, "cannot reach Redis at redis://:***@127.0.0.1")
    assert SECRET not in line
