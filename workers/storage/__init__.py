"""Storage backends behind one tiny interface, chosen by URI scheme.

A backend has ``read(uri) -> bytes``, ``open_read(uri)`` (a binary stream), ``list(prefix) ->
Iterator[str]``, ``exists(uri)``, ``check_writable(uri, folder)`` (``ConfigError`` unless an output can be
written there: checked before any work) and ``open_atomic(uri)``: an object with a local ``path`` to write,
``commit()`` (the file appears at ``uri`` whole) and ``discard()``; it is also a context manager that
commits on success. Backends raise ``FileNotFoundError`` / ``PermissionError`` for one object and
``workers.errors.ShardError`` when the store itself fails (so callers never branch on the scheme);
a read-only store (http) raises ``ConfigError`` from the writing methods.
Schemes map to lazily imported ``"module:Class"`` strings, as kombu's transport aliases do, so a
backend's heavy dependencies load only when it is used.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from workers.plugins import load

BACKENDS = {
    "file": "workers.storage.local:LocalStorage",
    "s3": "workers.storage.s3:S3Storage",
    "http": "workers.storage.http:HttpStorage",
    "https": "workers.storage.http:HttpStorage",
}
WEB_SCHEMES = ("http", "https")


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else "file"


def is_remote(uri: str) -> bool:
    """An object-store or web URI (``s3://…``, ``https://…``) rather than a local path or ``file://`` URI."""
    return scheme_of(uri) != "file"


def is_web(uri: str) -> bool:
    """An ``http://`` or ``https://`` URL."""
    return scheme_of(uri) in WEB_SCHEMES


@cache
def _backend(scheme: str) -> Any:
    return load(BACKENDS, scheme, "storage scheme", "{}://")()


def storage_for(uri: str) -> Any:
    """The storage backend that handles ``uri`` (one shared instance per scheme and process)."""
    return _backend(scheme_of(uri))


def check_writable(uri: str, folder: bool = False) -> None:
    """``ConfigError`` unless ``uri`` can be written as an output file (or, with ``folder``, a folder)."""
    storage_for(uri).check_writable(uri, folder)
