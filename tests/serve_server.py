"""A real `batchinfer serve` process on a free port, for the serving and search tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from tests.conftest import BIN, ROOT, free_port, stop_process, wait_until


class Server:
    """``batchinfer serve ARGS --port FREE``; ``url``, ``client()`` (with the token, if any), ``text()``."""

    def __init__(self, *args: str, log: Path, token: str | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token, self.log = token, log
        full_env = {**os.environ, **(env or {})}
        full_env.pop("BATCHINFER_API_TOKEN", None)
        if token:
            full_env["BATCHINFER_API_TOKEN"] = token
        self._fh = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([str(BIN / "batchinfer"), "serve", *args, "--port", str(self.port)],
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)

    def wait_ready(self, timeout: float = 240) -> Server:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"batchinfer serve exited {self.proc.returncode}:\n{self.text()[-3000:]}")
            try:
                return httpx.get(self.url + "/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout, "batchinfer serve to be ready", interval=0.25)
        return self

    def client(self, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 120), **kwargs)

    def text(self) -> str:
        return self.log.read_text()

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, 30)
        self._fh.close()
