"""Redis over TLS: a real redis-server listening only on ``--tls-port``, with a throwaway CA made here that signs
its certificate and a client certificate it demands (``tls-auth-clients yes``). A whole job runs through it:
submit, a real worker, the Redis sink, status and collect."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.certs import certificates
from tests.conftest import assert_one_line_error, batchinfer, free_port, start_probe_worker, stop_process, wait_until
from tests.probe_model import make_images


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """(rediss:// URL, the client's environment) of a redis-server that speaks only TLS."""
    from cryptography import x509

    folder = tmp_path_factory.mktemp("tls")
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    certs = certificates(folder, {"server": loopback, "client": [x509.DNSName("worker")]})
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", "0", "--tls-port", str(port), "--bind",
         "127.0.0.1", "--tls-cert-file", str(folder / "server.crt"), "--tls-key-file", str(folder / "server.key"),
         "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "yes", "--save", "", "--appendonly", "no",
         "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"BATCHINFER_REDIS_SSL_CA_CERTS": str(certs["ca"]), "BATCHINFER_REDIS_SSL_CERTFILE": str(certs["client"]),
           "BATCHINFER_REDIS_SSL_KEYFILE": str(certs["client_key"])}
    url = f"rediss://127.0.0.1:{port}/0"

    def up() -> bool:
        from workers.redis_conn import RedisTLS, redis_client

        try:
            return bool(redis_client(url, RedisTLS.from_env(env), socket_timeout=2).ping())
        except Exception:
            return False

    wait_until(up, 20, "redis-server with TLS")
    yield url, env
    stop_process(proc, 10)


def test_a_whole_job_over_tls(tls_redis, probe, tmp_path):
    url, env = tls_redis
    make_images(tmp_path / "imgs", 7)
    worker = start_probe_worker(url, tmp_path, "tls", **env)
    try:
        sub = batchinfer("submit", str(tmp_path / "imgs"), "--model-path", str(probe), "--preprocess", "none",
                         "--shard-size", "3", "--sink", "redis", broker=url, env=env)
        job_id = sub.stdout.strip().splitlines()[-1]
        batchinfer("collect", job_id, "--output", str(tmp_path / "rows.parquet"), "--wait", "--timeout", "180",
                   broker=url, env=env)
        status = batchinfer("status", job_id, broker=url, env=env)
    finally:
        worker.stop()
    rows = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert sorted(Path(r["uri"]).name for r in rows) == [f"img{i:04d}.png" for i in range(7)]
    assert all(r["error"] is None and r["label"] is not None for r in rows)
    assert "3/3 done" in status.stdout
    assert "Connection reset" not in worker.text() and "SSL" not in worker.text()  # no TLS trouble on the way


@pytest.mark.parametrize("drop, needle", [
    ("BATCHINFER_REDIS_SSL_CA_CERTS", "certificate verify failed"),  # the system CAs don't know the test CA
    ("BATCHINFER_REDIS_SSL_CERTFILE", "cannot reach Redis at rediss://127.0.0.1"),  # the server wants a client cert
])
def test_tls_mistakes_are_one_line(tls_redis, cli, drop, needle):
    url, env = tls_redis
    kept = {k: v for k, v in env.items() if k != drop and not (drop.endswith("CERTFILE") and k.endswith("KEYFILE"))}
    result = cli("status", "some-job", "--broker", url, env=kept)
    assert_one_line_error(result, needle)


def test_plain_redis_to_a_tls_port_is_one_line(tls_redis, cli):
    url, env = tls_redis
    result = cli("status", "some-job", "--broker", url.replace("rediss://", "redis://"), env=env)
    assert_one_line_error(result, "cannot reach Redis at redis://127.0.0.1")


def test_tls_settings_are_checked_up_front(cli, tmp_path):
    from workers.errors import ConfigError
    from workers.redis_conn import RedisTLS

    assert RedisTLS.from_env({}).redis_kwargs() == {"ssl_cert_reqs": "required"}
    with pytest.raises(ConfigError, match="BATCHINFER_REDIS_SSL_CERT_REQS must be one of required, optional, none"):
        RedisTLS.from_env({"BATCHINFER_REDIS_SSL_CERT_REQS": "maybe"})
    (tmp_path / "k.pem").write_text("x")
    with pytest.raises(ConfigError, match="needs BATCHINFER_REDIS_SSL_CERTFILE"):
        RedisTLS.from_env({"BATCHINFER_REDIS_SSL_KEYFILE": str(tmp_path / "k.pem")})
    result = cli("jobs", env={"BATCHINFER_REDIS_SSL_CA_CERTS": str(tmp_path / "missing.pem")})
    assert_one_line_error(result, f"BATCHINFER_REDIS_SSL_CA_CERTS: cannot read {tmp_path / 'missing.pem'}")
