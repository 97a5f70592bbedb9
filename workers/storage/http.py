"""http(s) sources: image and manifest URLs read through urllib3, as img2dataset downloads them.

The connection pool, retries, redirects and error texts are ``workers.storage.http_client``'s. Here:

- **Limits**: ``BATCHINFER_HTTP_TIMEOUT`` seconds (default 10) to connect and between bytes received,
  and six times that for a whole body (a server trickling a byte at a time is cut off too); an image
  larger than ``BATCHINFER_HTTP_MAX_BYTES`` (default 50 MiB) is refused from its Content-Length, or cut
  off as soon as it grows past the limit (manifests are streamed and have no limit).
- **Versions**: each body's size, ``Last-Modified`` and ``ETag`` (for incremental runs), and ``stat`` by
  one HEAD request.

Every error is per image: each URL may be on another host, so a host that is down, slow or refusing is
that image's error row, never the whole shard's (unlike S3, where one endpoint serves every object). The
store is read-only: writing or listing raises ``ConfigError``.
"""

from __future__ import annotations

import email.utils
import errno
import io
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, NoReturn

import urllib3
from urllib3.exceptions import HTTPError

from workers.errors import ConfigError
from workers.settings import Settings
from workers.storage.base import FileInfo
from workers.storage.http_client import client, convert, status_error

_CHUNK = 1 << 16
DOWNLOAD_TIMEOUTS = 6  # a whole body may take this many BATCHINFER_HTTP_TIMEOUTs (the timeout is per read)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_modified(value: str | None) -> int | None:
    """A Last-Modified header as µs since the epoch (UTC); None when absent or unreadable."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=timezone.utc)
    return (when - _EPOCH) // timedelta(microseconds=1)


def parse_etag(value: str | None) -> str | None:
    """A strong ETag without its quotes (as S3's are stored); a weak one (``W/"..."``) as it is."""
    if value and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value or None


def _info(headers: Any, size: int) -> FileInfo:
    return FileInfo(size, parse_modified(headers.get("Last-Modified")), parse_etag(headers.get("ETag")))


def _finish(response: urllib3.BaseHTTPResponse, whole: bool) -> None:
    """Give the connection back to the pool; one with an unread body is closed first."""
    if not whole:
        response.close()
    response.release_conn()


class ResponseBody(io.RawIOBase):
    """A response body as a raw binary stream whose errors are ``OSError`` (manifests are read through it)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, uri: str, settings: Settings) -> None:
        super().__init__()
        self.response, self.uri, self.settings = response, uri, settings

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self.response.read(len(buffer))
        except HTTPError as exc:
            raise convert(exc, self.uri, self.settings) from exc
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            _finish(self.response, whole=False)
        super().close()


class HttpStorage:
    """Reads ``http://`` and ``https://`` URLs; read-only. Pass ``settings`` to configure it (tests)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = Settings.from_env()
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        return self._settings

    def _send(self, method: str, uri: str) -> urllib3.BaseHTTPResponse:
        """The response to ``method uri`` after retries and redirects, its body not read yet."""
        pool, retry = client(self.settings)
        try:
            # retries passed per request: the pool manager follows redirects only with the policy it is given
            return pool.request(method, uri, preload_content=False, retries=retry)
        except HTTPError as exc:
            raise convert(exc, uri, self.settings) from exc

    def _get(self, uri: str) -> urllib3.BaseHTTPResponse:
        response = self._send("GET", uri)
        if not 200 <= response.status < 300:
            _finish(response, whole=False)
            raise status_error(response.status, response.reason, uri, self.settings.http_retries)
        return response

    def read(self, uri: str) -> bytes:
        return self.read_info(uri)[0]

    def read_info(self, uri: str) -> tuple[bytes, FileInfo]:
        """The body and the version it came from (its size, Last-Modified and ETag)."""
        limit = self.settings.http_max_bytes
        too_large = OSError(errno.EFBIG, f"response larger than {limit} bytes", uri)
        response = self._get(uri)
        whole = False
        try:
            length = (response.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > limit:
                raise too_large
            chunks: list[bytes] = []
            size = 0
            deadline = time.monotonic() + DOWNLOAD_TIMEOUTS * self.settings.http_timeout
            for chunk in response.stream(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large
                if time.monotonic() > deadline:  # a trickle that never trips the per-read timeout
                    raise OSError(errno.ETIMEDOUT, f"download took longer than {DOWNLOAD_TIMEOUTS} x "
                                  f"{self.settings.http_timeout:g}s", uri)
                chunks.append(chunk)
            whole = True
        except HTTPError as exc:
            raise convert(exc, uri, self.settings) from exc
        finally:
            _finish(response, whole)
        return b"".join(chunks), _info(response.headers, size)

    def open_read(self, uri: str) -> BinaryIO:
        """A binary stream of the body (not seekable), for manifests read line by line; no size limit."""
        return io.BufferedReader(ResponseBody(self._get(uri), uri, self.settings), _CHUNK)

    def stat(self, uri: str) -> FileInfo | None:
        """One HEAD request; None when the URL cannot be seen or does not say its size."""
        try:
            response = self._send("HEAD", uri)
        except OSError:
            return None
        _finish(response, whole=True)
        length = (response.headers.get("Content-Length") or "").strip()
        if not 200 <= response.status < 300 or not length.isdigit():
            return None
        return _info(response.headers, int(length))

    def exists(self, uri: str) -> bool:
        response = self._send("HEAD", uri)
        _finish(response, whole=True)
        if 200 <= response.status < 300:
            return True
        error = status_error(response.status, response.reason, uri, self.settings.http_retries)
        if isinstance(error, FileNotFoundError):
            return False
        raise error

    def list(self, prefix: str) -> Iterator[str]:
        raise ConfigError(f"{prefix}: an http(s) URL cannot be listed like a folder; give a manifest "
                          "(.txt, .csv, .parquet) of image URLs")

    def _read_only(self, uri: str) -> NoReturn:
        raise ConfigError(f"{uri}: http(s) URLs are read-only; write outputs to a folder or s3://")

    def open_atomic(self, uri: str) -> NoReturn:
        self._read_only(uri)

    def check_writable(self, uri: str, folder: bool) -> NoReturn:
        self._read_only(uri)

    def open_stream(self, uri: str) -> NoReturn:
        self._read_only(uri)
