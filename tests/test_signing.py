"""Signed messages (``BATCHINFER_SIGNING_*``, Celery's ``auth`` serializer): a real signing worker runs the job
its trusted producer signs, and refuses what a host without a trusted key sends it — an unsigned submit, a key
it does not trust, a forged signature, a remote-control shutdown — with the reason in its log and nothing run.
Pickle is refused with signing off and on, signed or not: the marker its payload would create never appears."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.certs import certificates
from tests.conftest import (
    BIN,
    ROOT,
    Worker,
    assert_one_line_error,
    batchinfer,
    start_probe_worker,
    submit_probe,
    wait_until,
)
from tests.probe_model import make_images
from workers.contract import TASK_NAME
from workers.errors import ConfigError
from workers.signing import Signing

QUEUE = "batchinfer"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """RSA keys and certificates: a producer's and a worker's from one CA, both in the folder of trusted
    certificates; a rogue's from another CA, trusted by itself only. Also each one's environment."""
    folder = tmp_path_factory.mktemp("signing")
    ours = certificates(folder / "ours", {"producer": [], "worker": []}, rsa=True)
    rogue = certificates(folder / "rogue", {"rogue": []}, rsa=True, ca_name="someone else's CA")
    trusted, rogue_trusts = folder / "trusted", folder / "rogue-trusts"
    for store, certs in ((trusted, [ours["producer"], ours["worker"]]), (rogue_trusts, [rogue["rogue"]])):
        store.mkdir()
        for cert in certs:
            shutil.copy(cert, store)

    def env(cert: Path, key: Path, store: Path) -> dict[str, str]:
        return {"BATCHINFER_SIGNING_KEY": str(key), "BATCHINFER_SIGNING_CERT": str(cert),
                "BATCHINFER_SIGNING_CERTS": str(store)}

    return {**ours, **rogue, "trusted": trusted,
            "producer_env": env(ours["producer"], ours["producer_key"], trusted),
            "worker_env": env(ours["worker"], ours["worker_key"], trusted),
            "rogue_env": env(rogue["rogue"], rogue["rogue_key"], rogue_trusts), "no_key_env": {}}


def _fresh_db(redis_url: str, db: int) -> str:
    """A database of the session's redis-server for one worker's broker and job state, emptied."""
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def signed(redis_url: str, keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Worker]]:
    """(broker URL, worker): a probe worker that signs and accepts only signed messages."""
    url = _fresh_db(redis_url, 7)
    worker = start_probe_worker(url, tmp_path_factory.mktemp("signed-worker"), "signed", **keys["worker_env"])
    yield url, worker
    worker.stop()


@pytest.fixture(scope="module")
def unsigned(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Worker]]:
    """(broker URL, worker): a worker as configured by default, signing off."""
    url = _fresh_db(redis_url, 8)
    worker = start_probe_worker(url, tmp_path_factory.mktemp("unsigned-worker"), "unsigned")
    yield url, worker
    worker.stop()


def refusals(worker: Worker, reason: str) -> int:
    """Log records (not traceback lines) of messages the worker refused for ``reason``."""
    return sum(1 for line in worker.text().splitlines() if line.startswith("[") and reason in line)


def wait_for_refusals(worker: Worker, reason: str, before: int, count: int = 1, marker: Path | None = None) -> None:
    """Until the worker has logged ``count`` more refusals; stops early if the ``marker`` of a pickle appears."""
    wait_until(lambda: refusals(worker, reason) >= before + count or (marker and marker.exists()), 30,
               f"the worker to refuse: {reason}")
    assert not (marker and marker.exists()), "the worker unpickled the message"


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.parquet")) if folder.exists() else []


# --- the README's promise: a signed job runs, an unsigned or untrusted one does not ---------------------------


def test_a_signed_job_runs_end_to_end(signed, keys, probe, tmp_path):
    url, worker = signed
    make_images(tmp_path / "imgs", 6)
    job_id = submit_probe(tmp_path / "imgs", probe, url, shard_size=4, env=keys["producer_env"])
    batchinfer("collect", job_id, "--output", str(tmp_path / "rows.parquet"), "--wait", "--timeout", "120",
               broker=url)
    rows = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert sorted(Path(r["uri"]).name for r in rows) == [f"img{i:04d}.png" for i in range(6)]
    assert all(r["error"] is None and r["label"] is not None for r in rows)
    assert "Can't decode message body" not in worker.text() and "invalid task" not in worker.text()


@pytest.mark.parametrize("who, reason", [
    ("no_key", "Refusing to deserialize untrusted content of type json"),  # JSON: what a host without a key sends
    ("rogue", 'Unknown certificate: b"someone else'),  # signed, by a certificate the worker does not trust
])
def test_a_submit_without_a_trusted_key_runs_nothing(signed, keys, probe, tmp_path, who, reason):
    import redis

    url, worker = signed
    make_images(tmp_path / "imgs", 6)
    before = refusals(worker, reason)
    job_id = submit_probe(tmp_path / "imgs", probe, url, shard_size=4, env=keys[f"{who}_env"])
    wait_for_refusals(worker, reason, before, count=2)  # both shards' messages, dropped
    assert redis.Redis.from_url(url).llen(QUEUE) == 0
    status = batchinfer("status", job_id, broker=url).stdout
    # the job state stays as submitted: its shards wait for a message a worker accepts (see the README's
    # "Signed messages" for what a worker's recovery does with them after a lease period)
    assert "0/2 done, 0 running, 2 pending, 0 failed" in status
    assert outputs(tmp_path / "out") == []
    assert f"job {job_id} shard-" not in worker.text()  # what a worker logs when it processes a shard


def test_the_limit_recovery_re_publishes_what_the_job_state_holds(redis_url, keys, probe, tmp_path):
    """Signing authenticates messages, not the job state (the README's "Signed messages", its limits): a submit
    without a key leaves its shards pending in Redis, and after two lease periods a worker's recovery takes
    them for lost messages and enqueues them again, signed with its own key. Whoever can write the job state
    gets work run; Redis ACLs keep such hosts away from it. A fix would make this test fail: update the README."""
    url = _fresh_db(redis_url, 10)
    short = {"BATCHINFER_LEASE_SECONDS": "2", "BATCHINFER_HEARTBEAT_SECONDS": "1"}
    worker = start_probe_worker(url, tmp_path, "recovering", **short, **keys["worker_env"])
    try:
        make_images(tmp_path / "imgs", 3)
        job_id = submit_probe(tmp_path / "imgs", probe, url, shard_size=4, env=short)
        batchinfer("collect", job_id, "--output", str(tmp_path / "rows.parquet"), "--wait", "--timeout", "60",
                   broker=url)
    finally:
        worker.stop()
    assert refusals(worker, "Refusing to deserialize untrusted content of type json") == 1
    assert "1 pending shards have no message in the queue; enqueuing them again" in worker.text()
    assert len(pq.read_table(tmp_path / "rows.parquet")) == 3


# --- messages made by hand: a forged signature, pickle outside and inside the envelope ---------------------------


class Marker:
    """Unpickling this creates the folder ``path``: the proof that a worker loaded a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.path),)


def publish(url: str, body: Any, task_id: str, serializer: str | None = None, signer: Any = None) -> None:
    """A task message for ``TASK_NAME`` published with kombu, as a host with Redis access could: serialized
    with ``serializer``, or already an ``auth`` envelope made by ``signer``."""
    from kombu import Connection

    headers = {"lang": "py", "task": TASK_NAME, "id": task_id, "root_id": task_id, "parent_id": None,
               "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
               "argsrepr": "()", "kwargsrepr": "{}", "origin": "test"}
    options: dict[str, Any] = {"serializer": serializer}
    if signer is not None:
        body, options = signer.serialize(body), {"content_type": "application/data", "content_encoding": "utf-8"}
    with Connection(url) as conn:
        conn.Producer().publish(body, exchange="", routing_key=QUEUE, headers=headers, **options)


def signer(key: Path, cert: Path, store: Path, inner: str = "json") -> Any:
    """Celery's own SecureSerializer with this key and certificate, its body serialized with ``inner``."""
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    return SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()), FSCertStore(str(store)),
                            "sha256", serializer=inner)


@pytest.mark.parametrize("mode", ["unsigned", "signed"])
def test_a_pickle_message_is_refused(request, mode, tmp_path):
    url, worker = request.getfixturevalue(mode)
    marker, task_id = tmp_path / "pickle-ran", str(uuid.uuid4())
    reason = "Refusing to deserialize untrusted content of type pickle"
    before = refusals(worker, reason)
    publish(url, ((Marker(marker),), {}, {}), task_id, serializer="pickle")
    wait_for_refusals(worker, reason, before, marker=marker)
    assert f"[{task_id}] received" not in worker.text()


def test_a_pickle_signed_with_a_trusted_key_is_refused(signed, keys, tmp_path):
    """A trusted key lets a host submit jobs, not run code: the envelope names its body's type, and Celery would
    unpickle whatever a trusted signer wrapped."""
    url, worker = signed
    marker, task_id = tmp_path / "signed-pickle-ran", str(uuid.uuid4())
    reason = "Refusing signed content of type 'application/x-python-serialize'"
    before = refusals(worker, reason)
    publish(url, ((Marker(marker),), {}, {}), task_id,
            signer=signer(keys["producer_key"], keys["producer"], keys["trusted"], inner="pickle"))
    wait_for_refusals(worker, reason, before, marker=marker)
    assert f"[{task_id}] received" not in worker.text()


def test_a_forged_signature_is_refused(signed, keys):
    """Certificates are public: a rogue key can name the producer's certificate, but not sign like it."""
    url, worker = signed
    task_id = str(uuid.uuid4())
    reason = "Bad signature: not made with the key of certificate 'batchinfer test CA"
    before = refusals(worker, reason)
    publish(url, ((), {"task": {"job_id": "forged", "shard_id": 0}}, {}), task_id,
            signer=signer(keys["rogue_key"], keys["producer"], keys["trusted"]))
    wait_for_refusals(worker, reason, before)
    assert f"[{task_id}] received" not in worker.text()


# --- remote control ------------------------------------------------------------------------------------------


def celery_cli(*args: str, url: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``celery -A workers ...`` with this environment (and none of the test run's ``BATCHINFER_*``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full = {k: v for k, v in os.environ.items() if not k.startswith("BATCHINFER_")}
    full.update(env, BATCHINFER_BROKER_URL=url, PYTHONPATH=path)
    return subprocess.run([str(BIN / "celery"), "-A", "workers", *args], capture_output=True, text=True, env=full,
                          timeout=60, cwd=ROOT)


def test_remote_control_needs_a_trusted_key(signed, keys):
    """`celery inspect` with the producer's key gets the worker's signed answer; `celery control shutdown` from a
    host without a key is refused, and the worker carries on."""
    url, worker = signed
    node = f"signed@{socket.gethostname()}"
    reason = "Refusing to deserialize untrusted content of type json"
    before = refusals(worker, reason)
    shutdown = celery_cli("control", "shutdown", "--destination", node, "--timeout", "1", url=url, env={})
    wait_for_refusals(worker, reason, before)
    assert "No nodes replied" in shutdown.stderr
    ping = celery_cli("inspect", "ping", "--destination", node, "--timeout", "10", url=url, env=keys["producer_env"])
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr
    assert worker.proc.poll() is None


# --- the settings: all three or none, files that can be read, a key Celery can use -----------------------------


@pytest.mark.parametrize("given, error", [
    ({"BATCHINFER_SIGNING_KEY": "k"}, "BATCHINFER_SIGNING_CERT and BATCHINFER_SIGNING_CERTS are not set"),
    ({"BATCHINFER_SIGNING_KEY": "k", "BATCHINFER_SIGNING_CERTS": "t"}, ": BATCHINFER_SIGNING_CERT is not set"),
    ({"BATCHINFER_SIGNING_KEY_PASSWORD": "pw"}, "BATCHINFER_SIGNING_KEY_PASSWORD is set but BATCHINFER_SIGNING_KEY"),
])
def test_signing_is_all_three_variables_or_none(given, error):
    assert not Signing.from_env({}).on
    with pytest.raises(ConfigError, match=error):
        Signing.from_env(given)


def test_unreadable_signing_files_are_named(keys, tmp_path):
    env = keys["producer_env"]
    assert Signing.from_env(env).on
    with pytest.raises(ConfigError, match=f"BATCHINFER_SIGNING_KEY: cannot read {tmp_path}/missing.key"):
        Signing.from_env({**env, "BATCHINFER_SIGNING_KEY": str(tmp_path / "missing.key")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"BATCHINFER_SIGNING_CERTS: no certificates at {tmp_path}/empty"):
        Signing.from_env({**env, "BATCHINFER_SIGNING_CERTS": str(tmp_path / "empty")})


def _load_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        Signing.from_env(env).serializer()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_keys_and_certificates_celery_cannot_use_are_one_line(keys, tmp_path):
    from cryptography.hazmat.primitives import serialization

    env = keys["producer_env"]
    Signing.from_env(env).serializer()  # the good ones load
    ec = certificates(tmp_path / "ec", {"ec": []})
    assert "Non-RSA" in _load_error({**env, "BATCHINFER_SIGNING_KEY": str(ec["ec_key"])})
    assert "is not the key of BATCHINFER_SIGNING_CERT" in _load_error(
        {**env, "BATCHINFER_SIGNING_KEY": str(keys["rogue_key"])})
    assert "must hold this host's own certificate" in _load_error(
        {**env, "BATCHINFER_SIGNING_KEY": str(keys["rogue_key"]), "BATCHINFER_SIGNING_CERT": str(keys["rogue"])})
    mixed = tmp_path / "mixed"
    shutil.copytree(keys["trusted"], mixed)
    shutil.copy(keys["producer_key"], mixed / "producer.key")  # a key in the folder of certificates
    assert _load_error({**env, "BATCHINFER_SIGNING_CERTS": str(mixed)}).startswith(
        f"BATCHINFER_SIGNING_CERTS: {mixed}/producer.key: Invalid certificate")
    old = certificates(tmp_path / "old", {"old": []}, rsa=True, days=-1)
    expired = tmp_path / "expired"
    shutil.copytree(keys["trusted"], expired)
    shutil.copy(old["old"], expired / "old.crt")
    assert _load_error({**env, "BATCHINFER_SIGNING_CERTS": str(expired)}) == (
        f"BATCHINFER_SIGNING_CERTS: {expired}/old.crt has expired (remove it from the trusted certificates)")
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    locked = tmp_path / "locked.key"
    key = load_pem_private_key(keys["producer_key"].read_bytes(), None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    assert "not given" in _load_error({**env, "BATCHINFER_SIGNING_KEY": str(locked)})
    assert "Incorrect password" in _load_error({**env, "BATCHINFER_SIGNING_KEY": str(locked),
                                                "BATCHINFER_SIGNING_KEY_PASSWORD": "wrong"})
    Signing.from_env({**env, "BATCHINFER_SIGNING_KEY": str(locked), "BATCHINFER_SIGNING_KEY_PASSWORD": "secret"}
                     ).serializer()
    assert "secret" not in repr(Signing.from_env({**env, "BATCHINFER_SIGNING_KEY_PASSWORD": "secret"}))


def test_the_celery_config_signs_tasks_and_control_not_events(keys):
    from workers.app import celery_config
    from workers.settings import Settings

    settings = Settings.from_env(keys["worker_env"])
    config = celery_config(settings, env={})
    assert config["task_serializer"] == "auth" and config["accept_content"] == ["auth"]
    assert config["security_digest"] == "sha256" and config["security_cert_store"] == str(keys["trusted"])
    assert config["event_serializer"] == "json"
    assert celery_config(Settings(), env={})["accept_content"] == ["json"]  # off: as before
    with pytest.raises(ConfigError, match="cannot be changed while BATCHINFER_SIGNING_KEY is set"):
        celery_config(settings, env={"BATCHINFER_CELERY_ACCEPT_CONTENT": '["auth", "json"]'})


def test_a_key_celery_cannot_use_stops_submit_in_one_line(cli, keys, redis_url, tmp_path):
    """Checked when the app is first configured, before the job is created."""
    url = _fresh_db(redis_url, 9)
    make_images(tmp_path / "imgs", 2)
    ec = certificates(tmp_path / "ec", {"ec": []})
    env = {**keys["producer_env"], "BATCHINFER_SIGNING_KEY": str(ec["ec_key"]), "BATCHINFER_BROKER_URL": url}
    result = cli("submit", str(tmp_path / "imgs"), "--model", "resnet50", "--output", str(tmp_path / "out"), env=env)
    assert_one_line_error(result, f"BATCHINFER_SIGNING_KEY: {ec['ec_key']}: Invalid private key", "Non-RSA")
    import redis

    assert redis.Redis.from_url(url).keys("*") == []
