"""docker-compose.yml's Redis wiring run for real, without Docker (the dev box has no engine): the secret files
``infra/redis/make-secrets.sh`` makes, the redis service's own command (the ACL file rendered from those files,
then redis-server), its healthcheck, and the worker, producer, exporter and Flower services as their own Redis
users with each service's environment and secrets from the file. Container paths are mapped to folders here;
the one other change is where Redis listens and keeps its files. A job runs end to end, Flower answers only
with the credentials from its secret file, and Redis refuses nothing on the way."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from tests.conftest import BIN, ROOT, batchinfer, free_port, start_probe_worker, stop_process, submit_probe, wait_until
from tests.probe_model import make_images

COMPOSE = ROOT / "docker-compose.yml"
MAKE_SECRETS = ROOT / "infra" / "redis" / "make-secrets.sh"
NAMESPACE = "nightly"  # BATCHINFER_NAMESPACE as the operator would export it before `docker compose up`
USERS = ("admin", "producer", "worker", "reader", "flower")
# compose's interpolation: `$$` is a literal `$`; ${NAME}, ${NAME:-default}, ${NAME:?error}
VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        if variables.get(name):
            return variables[name]
        assert op != ":?", f"compose would stop: {arg}"
        return arg if op == ":-" else ""
    return VARIABLE.sub(value, text)


class Stack:
    """The compose project in a folder: ``./secrets`` from make-secrets.sh, each service's mounts mapped to
    folders here (``paths``), its strings interpolated and mapped (``text``), the Redis service running."""

    def __init__(self, project: Path) -> None:
        self.project, self.port = project, free_port()
        subprocess.run(["sh", str(MAKE_SECRETS)], cwd=project, check=True, capture_output=True)
        self.compose = yaml.safe_load(COMPOSE.read_text())
        self.services = self.compose["services"]
        self.variables = {"BATCHINFER_NAMESPACE": NAMESPACE}
        self.redis_pid = 0

    def paths(self, name: str) -> dict[str, Path]:
        """Container path -> host path: the service's secrets (as compose mounts them, at /run/secrets/<name>),
        bind mounts, named volumes and tmpfs."""
        service, run = self.services[name], self.project / "run" / name
        secrets = run / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        for secret in service.get("secrets", []):
            shutil.copy(self.project / self.compose["secrets"][secret]["file"], secrets / secret)
        out = {"/run/secrets": secrets}
        for volume in service.get("volumes", []):
            src, dst, *_ = str(volume).split(":")
            out[dst] = (ROOT / src).resolve() if src.startswith(".") else self.project / "volumes" / src
        for i, tmpfs in enumerate(service.get("tmpfs", [])):
            out[tmpfs] = run / f"tmpfs{i}"
        for path in out.values():
            if self.project in path.parents:  # the named volumes and tmpfs; bind mounts are the repository's
                path.mkdir(parents=True, exist_ok=True)
        if name == "redis":  # listen on loopback, keep the data here; every other directive as infra/redis.conf
            conf = run / "redis.conf"
            here = {"port": str(self.port), "bind": "127.0.0.1", "dir": str(out["/data"])}
            conf.write_text(re.sub(r"^(port|bind|dir) .*$", lambda m: f"{m[1]} {here[m[1]]}",
                                   (ROOT / "infra" / "redis.conf").read_text(), flags=re.M))
            out["/usr/local/etc/redis/redis.conf"] = conf
        return out

    def text(self, name: str, text: str) -> str:
        text = interpolate(text, self.variables).replace("redis:6379", f"127.0.0.1:{self.port}")
        for dst, src in sorted(self.paths(name).items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![\w./-]){re.escape(dst)}(?=/|\s|$|\")", str(src), text)
        return text

    def env(self, name: str) -> dict[str, str]:
        return {k: self.text(name, str(v)) for k, v in self.services[name].get("environment", {}).items()}

    def script(self, name: str) -> str:
        """A `sh -c` service's script, mapped."""
        assert self.services[name]["entrypoint"] == ["sh", "-c"]
        (script,) = self.services[name]["command"]
        return self.text(name, script)

    def client(self, user: str) -> redis.Redis:
        password = (self.project / "secrets" / f"redis_{user}_password").read_text()
        return redis.Redis(port=self.port, username=user, password=password, socket_timeout=10)


def _command_lines(pids: list[int]) -> str:
    return " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("compose"))
    env = {"PATH": os.environ["PATH"], **stack.env("redis"),
           # where compose mounts the secrets, which render-acl.sh reads by default
           "REDIS_SECRETS_DIR": str(stack.paths("redis")["/run/secrets"])}
    proc = subprocess.Popen(["sh", "-c", stack.script("redis")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stack.redis_pid = proc.pid  # `exec redis-server`: the shell's pid is the server's
    admin = stack.client("admin")

    def up() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        try:
            return bool(admin.ping())
        except redis.ConnectionError:
            return False
    wait_until(up, 20, "the compose redis service's command")
    yield stack
    stop_process(proc, 10)


def test_make_secrets_makes_each_file_once_readable_by_the_containers(tmp_path):
    first = subprocess.run(["sh", str(MAKE_SECRETS), "s"], cwd=tmp_path, check=True, capture_output=True, text=True)
    folder = tmp_path / "s"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700, "other host users cannot reach the files"
    values = {}
    for user in USERS:
        file = folder / f"redis_{user}_password"
        values[user] = file.read_text()
        assert re.fullmatch(r"[0-9a-f]{64}", values[user]), "256 random bits, URL-safe, no newline"
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, "read by the containers' own users (redis, app)"
    assert len(set(values.values())) == len(USERS)
    assert re.fullmatch(r"admin:[0-9a-f]{64}", (folder / "flower_basic_auth").read_text())
    assert "flower_basic_auth" in first.stdout and values["admin"] not in first.stdout
    (folder / "redis_reader_password").unlink()
    subprocess.run(["sh", str(MAKE_SECRETS), "s"], cwd=tmp_path, check=True, capture_output=True)
    assert (folder / "redis_admin_password").read_text() == values["admin"], "existing secrets are kept"
    assert re.fullmatch(r"[0-9a-f]{64}", (folder / "redis_reader_password").read_text()), "missing ones made"


def test_the_redis_service_loads_only_hashes_and_its_healthcheck_passes(stack):
    acl = next((stack.paths("redis")["/run/redis"]).iterdir())
    text = acl.read_text()
    assert text.startswith("user default off") and f"~{NAMESPACE}:*" in text
    assert not any((stack.project / "secrets" / f"redis_{u}_password").read_text() in text for u in USERS)
    kind, health = stack.services["redis"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    # inside the container redis-cli's default port is the server's; here it is told the mapped one
    check = stack.text("redis", health).replace("redis-cli", f"redis-cli -p {stack.port}", 1)
    assert subprocess.run(["sh", "-c", check], capture_output=True).returncode == 0
    wrong = check.replace("redis_admin_password", "redis_reader_password")
    assert subprocess.run(["sh", "-c", wrong], capture_output=True).returncode != 0, "the check can fail"
    admin = stack.client("admin")
    assert [entry["reason"] for entry in admin.acl_log()] == ["auth"]
    admin.acl_log_reset()


@pytest.mark.parametrize(("service", "user"), [("worker", "worker"), ("producer", "producer"),
                                               ("exporter", "reader"), ("flower", "flower")])
def test_each_service_authenticates_as_its_own_user(stack, service, user):
    env = stack.env(service)
    code = ("from workers.settings import Settings; import redis; "
            "print(redis.Redis.from_url(Settings.from_env().broker_url).client_info()['user'])")
    out = subprocess.run([str(BIN / "python"), "-c", code], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == user


def test_a_job_through_the_compose_services_with_flower_behind_basic_auth(stack, probe, tmp_path):
    images = tmp_path / "images"
    make_images(images, 6)
    worker_env = stack.env("worker")
    worker = start_probe_worker(worker_env["BATCHINFER_BROKER_URL"], tmp_path, "composeworker", options=(),
                                **worker_env)
    flower_port = free_port()
    flower_log = (tmp_path / "flower.log").open("wb")
    script = stack.script("flower").replace("--port=5555", f"--port={flower_port}")
    flower = subprocess.Popen(["sh", "-c", script], cwd=ROOT, stdout=flower_log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                                   **stack.env("flower"), "FLOWER_ADDRESS": "127.0.0.1"})
    base = f"http://127.0.0.1:{flower_port}"
    user, password = (stack.project / "secrets" / "flower_basic_auth").read_text().split(":", 1)
    try:
        producer = stack.env("producer")
        job = submit_probe(images, probe, producer["BATCHINFER_BROKER_URL"], env=producer)
        reader = stack.env("exporter")
        batchinfer("collect", job, "--wait", "--timeout", "120", "--output", str(tmp_path / "rows.parquet"),
                   env=reader)
        assert "images   6/6 done" in batchinfer("status", job, env=reader).stdout

        def healthy() -> bool:
            assert flower.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
            try:
                return httpx.get(f"{base}/healthcheck", timeout=5).text == "OK"
            except httpx.TransportError:
                return False
        wait_until(healthy, 60, "Flower")
        assert httpx.get(f"{base}/", timeout=10).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(user, "wrong"), timeout=10).status_code == 401
        assert httpx.get(f"{base}/", auth=(user, password), timeout=10).status_code == 200
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200, "Prometheus scrapes it unauthenticated"

        def flower_sees(path: str, needle: str) -> bool:
            return needle in httpx.get(f"{base}{path}", auth=(user, password), timeout=30).text
        # the worker's stats come from `inspect` replies, through the namespaced reply queue
        wait_until(lambda: flower_sees("/api/workers?refresh=1", '"max-concurrency": 1'), 60, "Flower's inspect")
        inspect = subprocess.run([str(BIN / "celery"), "-A", "workers", "inspect", "ping", "--timeout", "5"],
                                 env={**os.environ, **stack.env("flower")}, capture_output=True, text=True,
                                 timeout=60, cwd=ROOT)
        assert "pong" in inspect.stdout and "composeworker@" in inspect.stdout, inspect.stdout + inspect.stderr
        commands = _command_lines([stack.redis_pid, flower.pid, worker.proc.pid])
        assert "redis-server" in commands and "flower" in commands and "worker" in commands
        for secret in (stack.project / "secrets").iterdir():
            assert secret.read_text().split(":")[-1] not in commands, f"{secret.name} on a command line"
    finally:
        stop_process(flower, 10)
        flower_log.close()
        worker.stop()
    assert stack.client("admin").acl_log() == [], "a service was refused a command"
    keys = {k.decode() for k in stack.client("admin").scan_iter(count=1000)}
    assert keys and all(k.startswith(f"{NAMESPACE}:") for k in keys), sorted(keys)[:10]
