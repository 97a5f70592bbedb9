"""Storage backends behind one tiny interface, chosen by URI scheme.

A backend has ``read(uri) -> bytes``, ``open_read(uri)`` (a binary stream), ``list(prefix) ->
Iterator[str]``, ``exists(uri)`` and ``open_atomic(uri)``: an object with a local ``path`` to write,
``commit()`` (the file appears at ``uri`` whole) and ``discard()``; it is also a context manager that
commits on success. Backends raise ``FileNotFoundError`` / ``PermissionError`` for one object and
``workers.errors.ShardError`` when the store itself fails (so callers never branch on the scheme).
Schemes map to lazily imported ``"module:Class"`` strings, as kombu's transport aliases do, so a
backend's heavy dependencies load only when it is used.
"""

from __future__ import annotations

import difflib
import importlib
from functools import cache
from typing import Any

BACKENDS = {
    "file": "workers.storage.local:LocalStorage",
    "s3": "workers.storage.s3:S3Storage",
}


def scheme_of(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else "file"


@cache
def _backend(scheme: str) -> Any:
    target = BACKENDS.get(scheme)
    if target is None:
        close = difflib.get_close_matches(scheme, list(BACKENDS), n=1)
        hint = f"; did you mean {close[0]}://?" if close else ""
        from workers.errors import ConfigError

        raise ConfigError(f"no storage backend for {scheme}://{hint} (known: {', '.join(BACKENDS)})")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)()


def storage_for(uri: str) -> Any:
    """The storage backend that handles ``uri`` (one shared instance per scheme and process)."""
    return _backend(scheme_of(uri))
