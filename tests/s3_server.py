"""A real S3 endpoint for the tests: moto's S3 server in a process of its own, on a free loopback port.

Run as ``python -m tests.s3_server --port P [--seed BUCKET/PREFIX=DIR]... [--fill BUCKET/PREFIX=N]...``,
it loads its content *before* it accepts connections, then serves until terminated: ``--seed`` copies a
local folder's files (an empty folder just creates the bucket), ``--fill`` creates N one-byte objects
``PREFIX000000.jpg`` … (20,000 of them in half a second, where PUTs over HTTP take a minute). Moto keeps
nothing across restarts, so a restarted server gets its seeds again and comes back whole at once.

``S3Server`` drives that process (``start``, ``stop``, ``restart``) and gives the environment a client
needs: ``AWS_ENDPOINT_URL`` and dummy credentials (boto3 reads both natively; nothing is patched).
The session fixture ``s3_endpoint`` is one such server, with no content.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _parse_target(spec: str) -> tuple[str, str, str]:
    target, _, value = spec.partition("=")
    bucket, _, prefix = target.partition("/")
    return bucket, prefix, value


def serve(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", action="append", default=[], metavar="BUCKET/PREFIX=DIR")
    parser.add_argument("--fill", action="append", default=[], metavar="BUCKET/PREFIX=N")
    args = parser.parse_args(argv)

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import make_server

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    def bucket(name: str) -> None:
        if name not in backend.buckets:
            backend.create_bucket(name, "us-east-1")

    for spec in args.seed:
        name, prefix, folder = _parse_target(spec)
        bucket(name)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                backend.put_object(name, prefix + path.relative_to(folder).as_posix(), path.read_bytes())
    for spec in args.fill:
        name, prefix, count = _parse_target(spec)
        bucket(name)
        for i in range(int(count)):
            backend.put_object(name, f"{prefix}{i:06d}.jpg", b"x")

    server = make_server("127.0.0.1", args.port, DomainDispatcherApplication(create_backend_app), threaded=True,
                         request_handler=MotoRequestHandler)
    print("ready", flush=True)
    server.serve_forever()


class S3Server:
    """One ``python -m tests.s3_server`` process; its port stays the same across restarts."""

    def __init__(self, log: Path, seeds: Sequence[str] = (), fills: Sequence[str] = ()) -> None:
        from tests.conftest import free_port

        self.log, self.seeds, self.fills = log, list(seeds), list(fills)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs: the endpoint and dummy credentials, via boto3's usual variables."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_RETRY_MODE": "standard",
            "AWS_MAX_ATTEMPTS": "2",  # a dead endpoint fails an attempt in about a second
        }

    def start(self, seeds: Sequence[str] = ()) -> S3Server:
        from tests.conftest import wait_until

        args = [f"--seed={s}" for s in [*self.seeds, *seeds]] + [f"--fill={f}" for f in self.fills]
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.s3_server", "--port", str(self.port), *args],
                                         cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or b"ready" in self.log.read_bytes(), 60, "the S3 server")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited: {self.log.read_text(errors='replace')[-3000:]}")
        self.log.write_bytes(b"")  # the next start waits for its own "ready"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            from tests.conftest import stop_process

            stop_process(self.proc, 10)
        self.proc = None

    def restart(self, seeds: Sequence[str] = ()) -> None:
        """Stop and start again on the same port: moto forgets everything but the seeds."""
        self.stop()
        self.start(seeds)

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, aws_access_key_id="test", aws_secret_access_key="test",
            region_name="us-east-1", config=Config(max_pool_connections=16, s3={"addressing_style": "path"}))


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 HTTP endpoint (moto's server, a subprocess) for the whole test session."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3.log").start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_endpoint: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """This process and the commands it runs use the test endpoint; the S3 client is made afresh."""
    import os

    import workers.storage
    from workers.storage.s3_client import ENDPOINT_ENV

    for name in list(os.environ):
        if name.startswith("AWS_") or name == ENDPOINT_ENV:
            monkeypatch.delenv(name)
    for name, value in s3_endpoint.env.items():
        monkeypatch.setenv(name, value)
    workers.storage._backend.cache_clear()
    yield s3_endpoint
    workers.storage._backend.cache_clear()


if __name__ == "__main__":
    serve()
