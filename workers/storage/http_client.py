"""The process's HTTP client for http(s) sources: one urllib3 pool, its retry policy, and urllib3's
errors as the per-image ``OSError`` the rows show (``workers.storage.http`` reads through it).

- **One connection pool per process** (``urllib3.PoolManager``), made on first use (so after the Celery
  pool forks, never at import) and shared by the pipeline's I/O threads: it keeps
  ``BATCHINFER_IO_THREADS`` connections per host alive. TLS certificates are verified (system CAs).
- **Retries**: ``BATCHINFER_HTTP_RETRIES`` (default 3) each for connections that fail, reads that time
  out or break, and 429/500/502/503/504 answers, with exponential backoff (the first retry at once, then
  1 s, 2 s, ...) or the server's ``Retry-After``; every wait is capped at ``BATCHINFER_HTTP_TIMEOUT`` so a
  throttling host cannot hold a shard past its time limit. TLS errors are not retried.
- **Redirects**: at most ``BATCHINFER_HTTP_MAX_REDIRECTS`` (default 5), to http(s) URLs only (and, when
  ``BATCHINFER_ALLOWED_ROOTS`` is set, under those roots: ``workers.confine``).
- Requests say ``User-Agent: batchinfer/<version>`` and ``Accept-Encoding: identity`` (images are
  compressed already, and the size recorded is then the file's). No credentials are sent, and urllib3's
  log records (retries, redirects) show URLs without ``user:password@`` and with the query cut to
  ``?...``: a pre-signed URL's signature is a credential.

404/410 become ``FileNotFoundError``, 401/403 ``PermissionError``, and the rest (other statuses, timeouts,
refused connections, DNS, TLS, too many redirects) ``OSError`` whose ``strerror`` is the row's text:
``timed out after 10s``.
"""

from __future__ import annotations

import errno
import http
import logging
import os
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationValueError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    ResponseError,
    SSLError,
    URLSchemeUnknown,
)
from urllib3.util import Retry, Timeout

from workers import __version__
from workers.confine import ANYWHERE, OUTSIDE, Roots
from workers.settings import Settings

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self
    from urllib3.connectionpool import ConnectionPool

SCHEMES = ("http", "https")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BACKOFF_FACTOR = 0.5  # urllib3 waits 0, 2 x 0.5, 4 x 0.5, ... seconds before successive retries
HEADERS = {"User-Agent": f"batchinfer/{__version__}", "Accept-Encoding": "identity"}


class RedirectOutside(HTTPError):
    """A redirect to a URL outside ``BATCHINFER_ALLOWED_ROOTS``: not followed."""


class CappedRetry(Retry):
    """urllib3's ``Retry`` that waits at most ``wait_max`` seconds, ``Retry-After`` included (a server
    asking for an hour would otherwise hold the reading thread, and the shard, that long), and follows
    redirects to http(s) URLs only (urllib3 would try ``file:///etc/passwd`` as a host-less URL), under
    ``roots`` (``BATCHINFER_ALLOWED_ROOTS``) when they are set."""

    def __init__(self, *args: Any, wait_max: float = 10.0, roots: Roots = ANYWHERE, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wait_max, self.roots = wait_max, roots

    def new(self, **kwargs: Any) -> Self:  # each retry makes a new object: pass the cap on
        return super().new(wait_max=self.wait_max, roots=self.roots, **kwargs)

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.wait_max)

    def increment(self, method: str | None = None, url: str | None = None,
                  response: urllib3.BaseHTTPResponse | None = None, error: Exception | None = None,
                  _pool: ConnectionPool | None = None, _stacktrace: TracebackType | None = None) -> Self:
        location = response.get_redirect_location() if response is not None and error is None else None
        scheme = urlsplit(location).scheme.lower() if location else ""
        if scheme and scheme not in SCHEMES and response is not None:
            response.drain_conn()
            response.release_conn()
            raise URLSchemeUnknown(scheme)
        if location and response is not None and not self.roots.contains(urljoin(url or "", location)):
            response.drain_conn()
            response.release_conn()
            raise RedirectOutside(location)
        return super().increment(method, url, response, error, _pool, _stacktrace)


def make_retry(settings: Settings) -> CappedRetry:
    """The retry policy of the module docstring."""
    n = settings.http_retries
    return CappedRetry(
        total=None, connect=n, read=n, status=n, other=0, redirect=settings.http_max_redirects,
        status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET", "HEAD"}), backoff_factor=BACKOFF_FACTOR,
        backoff_max=settings.http_timeout, backoff_jitter=0.25, raise_on_status=False, raise_on_redirect=True,
        wait_max=settings.http_timeout, roots=settings.allowed_roots,
    )


def redact(text: str) -> str:
    """A URL (or a request path) as logs may show it: no ``user:password@``, the query cut to ``?...``."""
    head, query, _ = text.partition("?")
    scheme, sep, rest = head.partition("://")
    if sep and "@" in rest.partition("/")[0]:
        head = f"{scheme}://{rest.partition('@')[2]}"
    return head + ("?..." if query else "")


class RedactUrls(logging.Filter):
    """Applies ``redact`` to the text arguments of urllib3's log records (it logs retried and redirected URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_REDACT = RedactUrls()


def make_pool(settings: Settings) -> urllib3.PoolManager:
    """A new pool manager configured from ``settings`` (see the module docstring)."""
    for name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry", "urllib3.connection"):
        logging.getLogger(name).addFilter(_REDACT)  # once: a filter already there is not added again
    return urllib3.PoolManager(
        num_pools=max(10, 4 * settings.io_threads),  # hosts whose connections are kept
        maxsize=settings.io_threads, block=False, headers=HEADERS, retries=make_retry(settings),
        timeout=Timeout(connect=settings.http_timeout, read=settings.http_timeout),
    )


_clients: dict[Settings, tuple[int, urllib3.PoolManager, CappedRetry]] = {}
_clients_lock = threading.Lock()


def client(settings: Settings) -> tuple[urllib3.PoolManager, CappedRetry]:
    """This process's pool and retry policy for ``settings``, made on first use (a forked child makes its
    own); the http:// and https:// backends share them."""
    pid = os.getpid()
    found = _clients.get(settings)
    if found is None or found[0] != pid:
        with _clients_lock:
            found = _clients.get(settings)
            if found is None or found[0] != pid:
                found = _clients[settings] = (pid, make_pool(settings), make_retry(settings))
    return found[1], found[2]


def _detail(exc: BaseException) -> str:
    cause = exc.__cause__
    return str(getattr(cause, "strerror", None) or cause or exc)


def convert(exc: HTTPError, uri: str, settings: Settings) -> OSError:
    """A urllib3 error as the ``OSError`` whose ``strerror`` is the image's error text."""
    reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
    seconds = f"{settings.http_timeout:g}s"
    if isinstance(reason, ResponseError) and "redirect" in str(reason):
        return OSError(errno.ELOOP, f"too many redirects (more than {settings.http_max_redirects})", uri)
    if isinstance(reason, NameResolutionError):
        return OSError(errno.EHOSTUNREACH, f"cannot resolve the host name: {_detail(reason)}", uri)
    if isinstance(reason, NewConnectionError):  # a ConnectTimeoutError too: test it first
        return OSError(errno.ECONNREFUSED, f"cannot connect: {_detail(reason)}", uri)
    if isinstance(reason, ConnectTimeoutError):
        return OSError(errno.ETIMEDOUT, f"connection timed out after {seconds}", uri)
    if isinstance(reason, ReadTimeoutError):
        return OSError(errno.ETIMEDOUT, f"timed out after {seconds}", uri)
    if isinstance(reason, RedirectOutside):
        return OSError(errno.EACCES, f"redirected {OUTSIDE}", uri)
    if isinstance(reason, URLSchemeUnknown):  # a redirect to file://, ftp://, ...
        return OSError(errno.EINVAL, f"unsupported URL scheme {reason.scheme}:// (only http and https)", uri)
    if isinstance(reason, LocationValueError):
        return OSError(errno.EINVAL, f"invalid URL: {reason}", uri)
    if isinstance(reason, SSLError):
        return OSError(errno.EIO, f"TLS error: {_detail(reason)}", uri)
    if isinstance(reason, ProtocolError):
        return OSError(errno.ECONNRESET, f"connection broken: {reason.args[-1] if reason.args else reason}", uri)
    return OSError(errno.EIO, f"HTTP request failed: {reason}", uri)


def status_error(status: int, reason: str | None, uri: str, retries: int = 0) -> OSError:
    """The error of a response that is not 2xx: 404 and 410 are "not found", 401 and 403 "access denied"."""
    try:
        phrase = reason or http.HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    text = f"HTTP {status} {phrase}".rstrip()
    if status in (404, 410):
        return FileNotFoundError(errno.ENOENT, f"not found ({text})", uri)
    if status in (401, 403):
        return PermissionError(errno.EACCES, f"access denied ({text})", uri)
    if status in RETRY_STATUSES and retries:
        text += f" (after {retries} retries)"
    elif 300 <= status < 400:
        text += " (redirect not followed)"
    return OSError(errno.EIO, text, uri)
