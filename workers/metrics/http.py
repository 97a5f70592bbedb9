"""A small HTTP endpoint: ``/metrics`` (prometheus_client's WSGI app) beside a few plain routes (probes, JSON),
on the first free port of a range.

prometheus_client's ``start_http_server`` answers every path with metrics and takes a single port; a worker needs
its probes beside the metrics, and several workers on one host need a range to share.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from workers.errors import ConfigError

log = logging.getLogger(__name__)

# a route answers (status code, body): a dict is sent as JSON, a str as plain text
Route = Callable[[str], tuple[int, "dict[str, Any] | str"]]
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class Endpoint:
    """The WSGI app: ``/metrics`` from ``registry``; ``routes`` maps a path (or a prefix ending in ``/``) to a
    ``Route`` called with the rest of the path."""

    def __init__(self, registry: Any, routes: dict[str, Route] | None = None) -> None:
        self.metrics = make_wsgi_app(registry)
        self.routes = routes or {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return self._answer(start_response, 405, {"error": "only GET"})
        if path == "/metrics":
            return self.metrics(environ, start_response)
        for route, handler in self.routes.items():
            if path == route or (route.endswith("/") and path.startswith(route) and len(path) > len(route)):
                return self._answer(start_response, *handler(path[len(route):]))
        return self._answer(start_response, 404, {"error": f"no such path: {path}",
                                                  "paths": ["/metrics", *self.routes]})

    @staticmethod
    def _answer(start_response: Callable[..., Any], status: int, body: dict[str, Any] | str) -> list[bytes]:
        if isinstance(body, str):
            data, kind = (body + "\n").encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(body).encode(), "application/json"
        start_response(f"{status} {REASONS.get(status, '')}",
                       [("Content-Type", kind), ("Content-Length", str(len(data)))])
        return [data]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scrape never holds the process up at exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape is noise in a worker's log
        log.debug("%s - %s", self.address_string(), format % args)


def bind(app: Endpoint, host: str, ports: tuple[int, int], what: str = "--port") -> WSGIServer:
    """A server bound to the first free port of ``ports`` (inclusive); ``ConfigError`` when none is free."""
    low, high = ports
    last: OSError | None = None
    for port in range(low, high + 1):
        try:
            return make_server(host, port, app, server_class=_Server6 if ":" in host else _Server,
                               handler_class=_Quiet)
        except OSError as exc:
            last = exc
    where = f"port {low}" if low == high else f"any port of {low}-{high}"
    raise ConfigError(f"{what}: cannot listen on {host} {where}: {last.strerror if last else 'no port'}")


def serve_in_background(server: WSGIServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def url_of(server: WSGIServer, path: str = "/metrics") -> str:
    host, port = (str(part) for part in server.server_address[:2])
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"
