"""``batchinfer serve``: the index (if any), the service and uvicorn on one socket, bound before anything loads
so a taken port is one line at once; the model then loads while ``/healthz`` already answers."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

from workers.errors import ConfigError
from workers.serve.service import ServeConfig, Service

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or ``ConfigError`` (port taken, address not on this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def serve(config: ServeConfig, index: Any = None, log_level: str = "warning") -> int:
    """Run until SIGINT/SIGTERM (in-flight requests finish); 1 if the model could not be loaded."""
    try:
        import uvicorn

        from workers.serve.app import create_app
    except ImportError as exc:
        raise ConfigError(f"batchinfer serve needs {exc.name}: pip install 'keras-batch-inference[serve]'") from None
    config = config.checked()
    if not loopback(config.host) and not config.token:
        print(f"batchinfer: warning: listening on {config.host} without BATCHINFER_API_TOKEN: anyone who can "
              "reach this port can use the model", file=sys.stderr)
    sock = bind(config.host, config.port)
    service = Service(config, index=index)
    server: Any = None

    def loaded() -> None:
        if service.load_error is not None:
            server.should_exit = True
        else:
            print(f"batchinfer: ready: {service.predictor.model_name} on http://{host}:{port}", file=sys.stderr,
                  flush=True)

    app = create_app(service, on_loaded=loaded)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=30))
    host, port = sock.getsockname()[:2]
    print(f"batchinfer: serving {service.spec.model_path or service.spec.name} ({service.spec.task}) on "
          f"http://{host}:{port} — loading the model; GET /readyz says when it is ready", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if service.load_error is not None:
        raise ConfigError(f"the model could not be loaded: {service.load_error}")
    return 0
