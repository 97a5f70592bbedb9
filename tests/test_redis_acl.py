"""Least-privilege Redis users: the ACL file ``infra/redis/render-acl.sh`` makes from ``infra/redis/users.acl.in``
loaded by a real redis-server, a whole job run as those users (a real worker with gossip, mingle and remote
control on, the Redis sink, status, collect, report, the exporter, `celery control shutdown`), not one command refused
on the way (``ACL LOG`` stays empty), and what each user must not do refused: FLUSHALL, CONFIG, another
deployment's keys and channels, a reader's writes, a producer's consuming, Flower's job state."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from tests.conftest import BIN, ROOT, batchinfer, free_port, start_probe_worker, stop_process, wait_until
from tests.probe_model import make_images

RENDER = ROOT / "infra" / "redis" / "render-acl.sh"
USERS = ("admin", "producer", "worker", "reader", "flower")
NS, OTHER = "teama", "teamb"  # this deployment's namespace, and another team's on the same server


class AclRedis:
    """A redis-server with the rendered users; ``url(user)`` names the user and holds no password (each
    component reads it from ``BATCHINFER_REDIS_PASSWORD_FILE``, as from a mounted secret)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.secrets = folder / "secrets"
        self.secrets.mkdir()
        self.passwords = {}
        for user in USERS:
            self.passwords[user] = secrets.token_hex(16)
            (self.secrets / f"redis_{user}_password").write_text(self.passwords[user] + "\n")
        self.acl = folder / "users.acl"
        subprocess.run(["sh", str(RENDER), str(self.acl)], check=True, env={
            "PATH": os.environ["PATH"], "REDIS_SECRETS_DIR": str(self.secrets), "BATCHINFER_NAMESPACE": NS})
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--aclfile", str(self.acl), "--save", "", "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.admin = self.client("admin")
        wait_until(self._up, 20, "redis-server with ACL users")

    def _up(self) -> bool:
        try:
            return bool(self.admin.ping())
        except redis.ConnectionError:
            return False

    def url(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def env(self, user: str) -> dict[str, str]:
        return {"BATCHINFER_BROKER_URL": self.url(user), "BATCHINFER_NAMESPACE": NS,
                "BATCHINFER_REDIS_PASSWORD_FILE": str(self.secrets / f"redis_{user}_password")}

    def client(self, user: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=user, password=self.passwords[user], socket_timeout=10)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path_factory.mktemp("acl"))
    # another team's deployment on the same server: its state, its queue, its Redis-sink rows
    server.admin.zadd(f"{OTHER}:jobs", {"theirs": 1})
    server.admin.hset(f"{OTHER}:job:theirs", "spec", "{}")
    server.admin.lpush(f"{OTHER}:broker:batchinfer", "a message")
    yield server
    stop_process(server.proc, 10)


def run(acl_redis: AclRedis, user: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return batchinfer(*args, env=acl_redis.env(user), check=check)


def test_the_rendered_file_holds_hashes_and_no_password(acl_redis):
    text = acl_redis.acl.read_text()
    assert not any(password in text for password in acl_redis.passwords.values())
    assert text.startswith("user default off"), "no unauthenticated access"
    assert len([line for line in text.splitlines() if line.startswith("user ")]) == 6
    assert f"~{NS}:*" in text and "@NS@" not in text and "#" + "@" not in text
    assert oct(acl_redis.acl.stat().st_mode & 0o777) == "0o600", "readable by the server's user only"


def test_a_whole_job_as_least_privilege_users(acl_redis, probe, tmp_path):
    images = tmp_path / "images"
    make_images(images, 10)
    worker = start_probe_worker(acl_redis.url("worker"), tmp_path, "aclworker", options=(), **{
        **acl_redis.env("worker"), "BATCHINFER_HEARTBEAT_SECONDS": "1", "BATCHINFER_LEASE_SECONDS": "5"})
    exporter_port = free_port()
    exporter = subprocess.Popen([str(BIN / "batchinfer"), "exporter", "--port", str(exporter_port)],
                                env={**os.environ, **acl_redis.env("reader")}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        common = ("--model-path", str(probe), "--preprocess", "none", "--batch-size", "2", "--shard-size", "4")
        parquet_job = run(acl_redis, "producer", "submit", str(images), *common, "--output",
                          str(tmp_path / "out")).stdout.split()[-1]
        redis_job = run(acl_redis, "producer", "submit", str(images), *common, "--sink", "redis").stdout.split()[-1]
        for job in (parquet_job, redis_job):
            run(acl_redis, "reader", "collect", job, "--wait", "--timeout", "120", "--output",
                str(tmp_path / f"{job}.parquet"))
            assert pq.read_table(tmp_path / f"{job}.parquet").num_rows == 10
            assert "images   10/10 done" in run(acl_redis, "reader", "status", job).stdout
        assert parquet_job in run(acl_redis, "reader", "jobs").stdout
        run(acl_redis, "reader", "report", redis_job, "--output", str(tmp_path / "report.html"))
        assert (tmp_path / "report.html").stat().st_size > 1000

        def scraped() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/metrics", timeout=5) as response:
                    return b"batchinfer_state_up 1.0" in response.read()
            except OSError:
                return False
        wait_until(scraped, 60, "the exporter reading the job state as the reader")

        assert "no failed shards" in run(acl_redis, "producer", "retry", parquet_job, check=False).stderr
        run(acl_redis, "producer", "delete", redis_job, "--rows")
        assert not acl_redis.admin.keys(f"{NS}:job:{redis_job}*")

        # remote control through the namespaced pidbox channel, as Flower sends it: the worker obeys
        subprocess.run([str(BIN / "celery"), "-A", "workers", "control", "shutdown", "--timeout", "1"],
                       env={**os.environ, **acl_redis.env("flower")}, capture_output=True, timeout=60, cwd=ROOT)
        wait_until(lambda: worker.proc.poll() is not None, 60, "the worker shut down by remote control")
    finally:
        exporter.terminate()
        exporter.wait(10)
        worker.stop()
    log = acl_redis.admin.acl_log()
    assert log == [], f"commands refused on the way: {log}"
    assert "NoPermission" not in worker.text() and "NOPERM" not in worker.text()
    assert not acl_redis.admin.keys("batchinfer*") and not acl_redis.admin.keys("_kombu*"), \
        "every key of the deployment is under its namespace"
    assert acl_redis.admin.exists(f"{OTHER}:jobs") and acl_redis.admin.llen(f"{OTHER}:broker:batchinfer") == 1


REFUSED_TO_ALL = [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "appendonly", "no"),
                  ("KEYS", "*"), ("MONITOR",), ("SCRIPT", "FLUSH"), ("FUNCTION", "FLUSH"),
                  ("CLIENT", "KILL", "TYPE", "normal"), ("ACL", "LIST"), ("SHUTDOWN",),
                  ("GET", f"{OTHER}:jobs"), ("ZRANGE", f"{OTHER}:jobs", "0", "-1"), ("HGETALL", f"{OTHER}:job:theirs"),
                  ("LPUSH", f"{OTHER}:broker:batchinfer", "x"), ("RPOP", f"{OTHER}:broker:batchinfer"),
                  ("PUBLISH", f"{OTHER}:broker:/0.celery.pidbox", "x"), ("GET", "unprefixed")]


@pytest.mark.parametrize("user", ["producer", "worker", "reader", "flower"])
def test_no_user_but_admin_can_flush_configure_or_reach_another_deployment(acl_redis, user):
    client = acl_redis.client(user)
    for command in REFUSED_TO_ALL:
        with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions"):
            client.execute_command(*command)
            raise AssertionError(f"{user} may {' '.join(command)}")
    assert acl_redis.admin.exists(f"{OTHER}:jobs") and acl_redis.admin.llen(f"{OTHER}:broker:batchinfer") == 1


@pytest.mark.parametrize(("user", "command"), [
    ("reader", ("HSET", f"{NS}:job:x", "a", "1")),           # readers only read
    ("reader", ("DEL", f"{NS}:jobs")),
    ("reader", ("EVAL", "return 1", "0")),
    ("reader", ("PUBLISH", f"{NS}:broker:/0.celery.pidbox", "x")),
    ("producer", ("BRPOP", f"{NS}:broker:batchinfer", "1")),  # a producer does not consume shards
    ("producer", ("PUBLISH", f"{NS}:broker:/0.celery.pidbox", "x")),  # ... nor send remote control
    ("flower", ("HGETALL", f"{NS}:job:x")),                   # Flower sees the broker, not the job state
    ("flower", ("ZRANGE", f"{NS}:jobs", "0", "-1")),
])
def test_each_role_is_refused_what_it_does_not_need(acl_redis, user, command):
    with pytest.raises(redis.exceptions.NoPermissionError):
        acl_redis.client(user).execute_command(*command)


def test_each_role_may_do_its_job(acl_redis):
    assert acl_redis.client("reader").hgetall(f"{NS}:job:none") == {}
    assert acl_redis.client("producer").lpush(f"{NS}:broker:probe", "x") == 1
    assert acl_redis.client("worker").brpop([f"{NS}:broker:probe"], 1) == (f"{NS}:broker:probe".encode(), b"x")
    assert acl_redis.client("flower").llen(f"{NS}:broker:batchinfer") == 0


def test_a_missing_password_file_stops_the_rendering(tmp_path):
    (tmp_path / "redis_admin_password").write_text("x")
    result = subprocess.run(["sh", str(RENDER), str(tmp_path / "users.acl")], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "REDIS_SECRETS_DIR": str(tmp_path)})
    assert result.returncode == 2 and "redis_producer_password" in result.stderr
    assert not (tmp_path / "users.acl").exists()


def test_a_namespace_that_is_a_pattern_is_refused(tmp_path, cli):
    result = subprocess.run(["sh", str(RENDER), str(tmp_path / "users.acl")], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "BATCHINFER_NAMESPACE": "*"})
    assert result.returncode == 2 and "BATCHINFER_NAMESPACE" in result.stderr
    bad = cli("status", "x", env={"BATCHINFER_NAMESPACE": "team*"})
    assert bad.returncode == 2 and "BATCHINFER_NAMESPACE" in bad.stderr and "Traceback" not in bad.stderr


def test_the_password_file_completes_urls_without_a_password(tmp_path):
    from workers.errors import ConfigError
    from workers.settings import Settings

    secret = tmp_path / "pw"
    secret.write_text("p@ss/word\n")
    settings = Settings.from_env({"BATCHINFER_BROKER_URL": "redis://worker@h:6379/0",
                                  "BATCHINFER_REDIS_URL": "redis://sink:own@h2/1",
                                  "BATCHINFER_REDIS_PASSWORD_FILE": str(secret)})
    assert settings.broker_url == settings.state_url == "redis://worker:p%40ss%2Fword@h:6379/0"
    assert settings.redis_sink_url == "redis://sink:own@h2/1", "a URL's own password wins"
    assert redis.connection.parse_url(settings.broker_url)["password"] == "p@ss/word"
    for bad, needle in ((tmp_path / "missing", "cannot read"), (tmp_path, "cannot read")):
        with pytest.raises(ConfigError, match=needle):
            Settings.from_env({"BATCHINFER_REDIS_PASSWORD_FILE": str(bad)})
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        Settings.from_env({"BATCHINFER_REDIS_PASSWORD_FILE": str(tmp_path / "empty")})


def test_the_namespace_moves_the_broker_keys_only_when_set():
    from workers.app import celery_config
    from workers.settings import Settings

    default = Settings.from_env({})
    assert default.namespace == "batchinfer" and default.broker_prefix == ""
    assert "global_keyprefix" not in celery_config(default, {})["broker_transport_options"]
    team = Settings.from_env({"BATCHINFER_NAMESPACE": "teama"})
    assert team.namespace == "teama"
    assert celery_config(team, {})["broker_transport_options"]["global_keyprefix"] == "teama:broker:"
