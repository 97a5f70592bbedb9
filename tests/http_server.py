"""A real web server for the tests: ``http.server`` in a process of its own, on a free loopback port.

Run as ``python -m tests.http_server --port P --root DIR``: it serves DIR's files (GET and HEAD, with
Content-Length, ETag and Last-Modified, keep-alive) and a route for each case a crawl meets::

    /missing            404                          /private        403
    /slow               the photo, after 3 s (past the tests' 1 s timeout)
    /redirect           302 to /photos/cat.jpg       /loop           302 to itself, forever
    /to-file            302 to file:///etc/passwd    /page.html      an HTML page (200, text/html)
    /big                1,000,000 bytes, Content-Length given; /big-chunked the same, chunked
    /trickle            60 bytes, one every 0.25 s (never idle for a timeout, but 15 s in all)
    /flaky/NAME         503 the first time NAME is asked, then /photos/cat.jpg
    /throttled/NAME     429 "Retry-After: 3600" the first time NAME is asked, then /photos/cat.jpg
    /down/NAME          503, always
    /agent              the request's User-Agent, as text
    /hits/PATH          how many requests PATH has had, as text

``HttpServer`` drives that process (``start``, ``stop``); ``url`` is its base URL.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import mimetypes
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
BIG = 1_000_000
SLOW_SECONDS = 3
TRICKLE_BYTES = 60  # one byte every 0.25 s: 15 s, each read well within the timeout


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's pool reuses connections
    root: Path
    hits: Counter[str] = Counter()
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self.route(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self.route(head=True)

    def route(self, head: bool) -> None:
        path = urlsplit(self.path).path
        with self.lock:
            self.hits[path] += 1
            first = self.hits[path] == 1
        if path == "/missing":
            self.send(404, b"no such image", "text/plain", head)
        elif path == "/private":
            self.send(403, b"forbidden", "text/plain", head)
        elif path == "/slow":
            time.sleep(SLOW_SECONDS)
            self.static("/photos/cat.jpg", head)
        elif path == "/redirect":
            self.send(302, b"", "text/plain", head, {"Location": "/photos/cat.jpg"})
        elif path == "/loop":
            self.send(302, b"", "text/plain", head, {"Location": "/loop"})
        elif path == "/to-file":
            self.send(302, b"", "text/plain", head, {"Location": "file:///etc/passwd"})
        elif path == "/page.html":
            self.send(200, b"<!doctype html><html><body><img src='/photos/cat.jpg'></body></html>", "text/html", head)
        elif path == "/big":
            self.send(200, b"\0" * BIG, "image/jpeg", head)
        elif path == "/big-chunked":
            self.chunked(b"\0" * BIG, head)
        elif path == "/trickle":
            self.chunked(b"\0" * TRICKLE_BYTES, head, pause=0.25, size=1)
        elif path.startswith("/flaky/") and first:
            self.send(503, b"busy", "text/plain", head)
        elif path.startswith("/throttled/") and first:
            self.send(429, b"slow down", "text/plain", head, {"Retry-After": "3600"})
        elif path.startswith(("/flaky/", "/throttled/")):
            self.static("/photos/cat.jpg", head)
        elif path.startswith("/down/"):
            self.send(503, b"down", "text/plain", head)
        elif path == "/agent":
            self.send(200, self.headers.get("User-Agent", "").encode(), "text/plain", head)
        elif path.startswith("/hits/"):
            with self.lock:
                count = self.hits[path[len("/hits"):]]
            self.send(200, str(count).encode(), "text/plain", head)
        else:
            self.static(path, head)

    def static(self, path: str, head: bool) -> None:
        file = (self.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            self.send(404, b"not found", "text/plain", head)
            return
        body = file.read_bytes()
        headers = {"ETag": f'"{hashlib.sha1(body).hexdigest()[:16]}"',
                   "Last-Modified": email.utils.formatdate(file.stat().st_mtime, usegmt=True)}
        self.send(200, body, mimetypes.guess_type(file.name)[0] or "application/octet-stream", head, headers)

    def send(self, status: int, body: bytes, ctype: str, head: bool, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for name, value in {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:  # the client gave up (timeout, size limit): nothing to do
            self.close_connection = True

    def chunked(self, body: bytes, head: bool, pause: float = 0.0, size: int = 1 << 14) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if head:
                return
            for i in range(0, len(body), size):
                part = body[i:i + size]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                if pause:
                    self.wfile.flush()
                    time.sleep(pause)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog (5) refuses a burst of parallel reads
    daemon_threads = True


def serve(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    Handler.root = args.root.resolve()
    server = Server(("127.0.0.1", args.port), Handler)
    print("ready", flush=True)
    server.serve_forever()


class HttpServer:
    """One ``python -m tests.http_server`` process serving ``root``."""

    def __init__(self, root: Path, log: Path) -> None:
        from tests.conftest import free_port

        self.root, self.log = root, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HttpServer:
        from tests.conftest import wait_until

        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.http_server", "--port", str(self.port), "--root", str(self.root)],
                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or b"ready" in self.log.read_bytes(), 30, "the web server")
        if self.proc.poll() is not None:
            raise RuntimeError(f"the web server exited: {self.log.read_text(errors='replace')[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            from tests.conftest import stop_process

            stop_process(self.proc, 10)
        self.proc = None

    def hits(self, path: str) -> int:
        """How many requests ``path`` has had (asked over HTTP, as any client would)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/hits{path}", timeout=10) as response:
            return int(response.read())


if __name__ == "__main__":
    serve()
