"""Contract tests for the deployment files (the dev box has no Docker engine, so we parse them)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
REDIS_CONF = ROOT / "infra" / "redis.conf"
PROMETHEUS_CONF = ROOT / "infra" / "prometheus.yml"
DOCKERFILES = sorted((ROOT / "infra").glob("Dockerfile*"))

REDIS_USERS = ("admin", "producer", "worker", "reader", "flower")  # infra/redis/users.acl.in
# each client service's Redis user (README "Security": least-privilege Redis users)
SERVICE_USERS = {"worker": "worker", "producer": "producer", "exporter": "reader", "flower": "flower"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _argv(value) -> list[str]:
    """A compose command/entrypoint (string or list) as a list of words; a `sh -c` script's words too."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [w for v in value for w in shlex.split(str(v))]


def _secrets(service: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _option(argv: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in an argv."""
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def _mounts(service: dict) -> dict[str, tuple[str, list[str]]]:
    """Short-syntax volumes as {container path: (source, options)}."""
    out = {}
    for volume in service.get("volumes", []):
        src, dst, *opts = str(volume).split(":")
        out[dst] = (src, opts)
    return out


def _redis_conf() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in REDIS_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            directives.setdefault(key.lower(), []).append(value.strip())
    return directives


def test_services_exist(services):
    assert {"redis", "worker", "flower", "producer", "exporter", "prometheus"} <= set(services)


def test_redis_conf_persistence_and_noeviction(services):
    conf = _redis_conf()
    assert conf.get("appendonly") == ["yes"]
    assert conf.get("appendfsync") == ["everysec"]
    assert conf.get("maxmemory-policy") == ["noeviction"]
    assert conf.get("dir") == ["/data"]
    assert "requirepass" not in conf, "no password in the file: the users come from the ACL file"

    redis = services["redis"]
    argv = _argv(redis["command"])
    conf_path = argv[argv.index("redis-server") + 1]
    mounts = [str(v).split(":") for v in redis["volumes"]]
    assert any((ROOT / src).resolve() == REDIS_CONF and dst == conf_path for src, dst, *_ in mounts), (
        f"infra/redis.conf must be mounted at {conf_path}"
    )
    assert any(dst == "/data" for _, dst, *_ in mounts)


def test_redis_loads_the_acl_file_rendered_from_secret_files(services, compose):
    redis = services["redis"]
    argv = _argv(redis.get("entrypoint")) + _argv(redis["command"])
    assert "--requirepass" not in argv and "requirepass" not in " ".join(argv)
    mounts = _mounts(redis)
    render = next(w for w in argv if w.endswith("/render-acl.sh"))
    src, opts = mounts[render.rsplit("/", 1)[0]]
    assert (ROOT / src).resolve() == ROOT / "infra" / "redis" and opts == ["ro"]
    acl = argv[argv.index(render) + 1]
    assert argv[argv.index("--aclfile") + 1] == acl and acl.rsplit("/", 1)[0] in redis["tmpfs"], (
        "the rendered file (hashes only) lives in a tmpfs, not in a volume")
    assert _secrets(redis) == {f"redis_{user}_password" for user in REDIS_USERS}
    assert str(redis["user"]).split(":")[0] == "999", "the image's redis user, not root"
    health = " ".join(_argv(redis["healthcheck"]["test"]))
    assert "redis-cli --user admin ping" in health and "/run/secrets/redis_admin_password" in health
    assert "-a " not in health and "--pass" not in health, "the password is read by redis-cli from REDISCLI_AUTH"


def test_secret_files_come_from_make_secrets(compose):
    files = {name: spec["file"] for name, spec in compose["secrets"].items() if "file" in spec}
    made = {f"redis_{user}_password" for user in REDIS_USERS} | {"flower_basic_auth"}
    assert files == {name: f"./secrets/{name}" for name in made}
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_no_literal_password_committed():
    for path in [COMPOSE, REDIS_CONF, PROMETHEUS_CONF, ROOT / ".dockerignore", *DOCKERFILES]:
        text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        assert not re.findall(r"rediss?://[^@\s/]*:[^@\s/]*@", text), f"{path.name}: a password in a Redis URL"
        assert "requirepass" not in text and "--pass" not in text and "redis-cli -a" not in text, path.name
        assert "REDIS_PASSWORD}" not in text and "BASIC_AUTH:" not in text, f"{path.name}: a secret from a variable"


def test_worker_reserves_gpu_and_runs_celery(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or d.get("device_ids"))
        for d in devices
    )
    assert "celery -A workers worker" in " ".join(_argv(worker["command"]))
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["restart"] == "unless-stopped"
    volumes = [str(v) for v in worker["volumes"]]
    assert "./data:/data" in volumes
    assert "keras-cache:/home/app/.keras" in volumes


def test_producer_profile_and_entrypoint(services):
    producer = services["producer"]
    assert "producer" in producer["profiles"]
    assert _argv(producer["entrypoint"]) == ["batchinfer"]
    assert _argv(producer["command"])[0] == "submit"
    assert "./data:/data" in [str(v) for v in producer["volumes"]]


def test_serve_profile_needs_a_token_and_publishes_on_localhost(services):
    serve = services["serve"]
    assert "serve" in serve["profiles"] and _argv(serve["entrypoint"]) == ["batchinfer"]
    argv = _argv(serve["command"])
    assert argv[0] == "serve" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert re.match(r"^\$\{BATCHINFER_API_TOKEN:\?", _env(serve)["BATCHINFER_API_TOKEN"])
    assert [str(p) for p in serve["ports"]] == ["127.0.0.1:8000:8000"]
    assert "/readyz" in " ".join(_argv(serve["healthcheck"]["test"]))


def test_build_dockerfiles_exist_under_infra(services):
    built = {}
    for name, svc in services.items():
        if "build" not in svc:
            continue
        build = svc["build"]
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = (
            context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        ).resolve()
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        assert dockerfile.parent == ROOT / "infra", f"{name}: Dockerfile must live under infra/"
        built[name] = dockerfile.name
    assert built.get("worker") == "Dockerfile.gpu"
    assert built.get("producer") == "Dockerfile"
    assert built.get("exporter") == "Dockerfile"


def test_flower_exposes_5555(services):
    flower = services["flower"]
    container_ports = set()
    for port in flower["ports"]:
        if isinstance(port, dict):
            container_ports.add(str(port["target"]))
        else:
            container_ports.add(str(port).split("/")[0].rsplit(":", 1)[-1])
    assert "5555" in container_ports
    assert [str(p) for p in flower["ports"]] == ["127.0.0.1:5555:5555"]
    assert "--port=5555" in _argv(flower["command"])


def test_flower_runs_this_app_behind_basic_auth_from_a_secret_file(services):
    flower = services["flower"]
    assert flower["image"] == services["producer"]["image"], "the CPU image: Flower with this app's settings"
    argv = _argv(flower.get("entrypoint")) + _argv(flower["command"])
    assert argv[argv.index("celery"):argv.index("celery") + 4] == ["celery", "-A", "workers", "flower"]
    assert 'FLOWER_BASIC_AUTH=$$(cat /run/secrets/flower_basic_auth)' in argv
    assert "flower_basic_auth" in _secrets(flower) and not any(w.startswith(("--broker", "--basic")) for w in argv)


@pytest.mark.parametrize(("service", "user"), SERVICE_USERS.items())
def test_each_service_is_its_own_redis_user_with_a_password_file(services, service, user):
    env = _env(services[service])
    assert env["BATCHINFER_BROKER_URL"] == f"redis://{user}@redis:6379/0"
    assert env["BATCHINFER_REDIS_PASSWORD_FILE"] == f"/run/secrets/redis_{user}_password"
    assert f"redis_{user}_password" in _secrets(services[service])
    assert {s for s in _secrets(services[service]) if s.startswith("redis_")} == {f"redis_{user}_password"}, (
        "a service holds its own password only")
    assert env["BATCHINFER_NAMESPACE"] == services["redis"]["environment"]["BATCHINFER_NAMESPACE"]


def test_named_volumes_declared(compose):
    assert {"redis-data", "keras-cache", "prometheus-data"} <= set(compose["volumes"])


def test_worker_serves_metrics_on_the_compose_network_only(services):
    worker = services["worker"]
    port = _env(worker)["BATCHINFER_METRICS_PORT"]
    assert port == "9808" and port in [str(p) for p in worker["expose"]]
    assert "ports" not in worker, "with --scale worker=N a published port would clash; Prometheus is inside"


def test_exporter_runs_the_cli_on_the_cpu_image(services):
    exporter = services["exporter"]
    assert exporter["image"] == services["producer"]["image"] and "deploy" not in exporter  # no GPU
    argv = _argv(exporter["entrypoint"]) + _argv(exporter["command"])
    assert argv[:2] == ["batchinfer", "exporter"] and _option(argv, "--host") == "0.0.0.0"
    port = _option(argv, "--port")
    assert [str(p) for p in exporter["expose"]] == [port] and "ports" not in exporter
    assert f"127.0.0.1:{port}/healthz" in " ".join(_argv(exporter["healthcheck"]["test"]))
    assert exporter["depends_on"]["redis"]["condition"] == "service_healthy"


def test_prometheus_pinned_local_only_config_read_only(services, compose):
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), "pin a release, not latest"
    assert [str(p) for p in prometheus["ports"]] == ["127.0.0.1:9090:9090"]
    argv, mounts = _argv(prometheus["command"]), _mounts(prometheus)
    src, opts = mounts[_option(argv, "--config.file")]
    assert (ROOT / src).resolve() == PROMETHEUS_CONF and opts == ["ro"]
    assert mounts[_option(argv, "--storage.tsdb.path")][0] in compose["volumes"]


@pytest.fixture(scope="module")
def scrape_jobs() -> dict[str, dict]:
    conf = yaml.safe_load(PROMETHEUS_CONF.read_text())
    jobs = {job["job_name"]: job for job in conf["scrape_configs"]}
    assert len(jobs) == len(conf["scrape_configs"]), "duplicate job_name"
    return jobs


def _static_targets(job: dict) -> list[str]:
    return [t for group in job.get("static_configs", []) for t in group["targets"]]


def test_prometheus_scrapes_every_metrics_port(services, scrape_jobs):
    (workers,) = scrape_jobs["worker"]["dns_sd_configs"]  # every --scale replica behind the name `worker`
    assert workers["names"] == ["worker"] and workers["type"] == "A"
    assert str(workers["port"]) == _env(services["worker"])["BATCHINFER_METRICS_PORT"]
    for name in ("exporter", "serve", "flower"):  # each listens on the --port its command gives
        port = _option(_argv(services[name]["command"]), "--port")
        assert _static_targets(scrape_jobs[name]) == [f"{name}:{port}"]
    for job in scrape_jobs.values():
        for target in _static_targets(job):
            assert target.split(":")[0] in services, f"{job['job_name']}: {target} is no compose service"


def test_prometheus_reads_the_serve_token_from_a_secret(services, compose, scrape_jobs):
    auth = scrape_jobs["serve"]["authorization"]
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth, "no literal token"
    (secret,) = services["prometheus"]["secrets"]
    assert auth["credentials_file"] == f"/run/secrets/{secret.get('target', secret['source'])}"
    assert compose["secrets"][secret["source"]] == {"environment": "BATCHINFER_API_TOKEN"}
    assert secret["mode"] & 0o004, "Prometheus runs as nobody: the secret must be world-readable"


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_from_nonroot_user_and_cmd(path):
    instr = _instructions(path)
    assert instr and instr[0][0] in {"FROM", "ARG"}
    assert any(op == "FROM" for op, _ in instr)
    users = [rest for op, rest in instr if op == "USER"]
    assert users, f"{path.name}: no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{path.name}: runs as root"
    assert any(op == "RUN" and re.search(r"pip install (\.|\"\.\[[a-z,]+\]\")", rest) for op, rest in instr)
    assert ("WORKDIR", "/app") in instr
    cmd = [rest for op, rest in instr if op == "CMD"]
    assert cmd, f"{path.name}: no CMD"
    argv = json.loads(cmd[-1])
    assert argv[:4] == ["celery", "-A", "workers", "worker"]


def test_dockerfile_set_is_complete():
    assert {p.name for p in DOCKERFILES} >= {"Dockerfile", "Dockerfile.gpu"}
    assert "python:3.11-slim" in (ROOT / "infra" / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "tests/data/generated"):
        assert entry in ignore
