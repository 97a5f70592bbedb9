"""Lazy ``"module:Class"`` registries (as kombu's transport aliases): sinks and storage backends."""

from __future__ import annotations

import difflib
import importlib
from typing import Any


def load(registry: dict[str, str], name: str, what: str, shown: str = "{}") -> Any:
    """Import the class registered as ``name``; an unknown name is a ``ConfigError`` with a suggestion.

    ``shown`` formats a name in messages (e.g. ``"{}://"`` for URI schemes).
    """
    target = registry.get(name)
    if target is None:
        from workers.errors import ConfigError

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean {shown.format(close[0])}?" if close else ""
        known = ", ".join(shown.format(k) for k in registry)
        raise ConfigError(f"unknown {what} {shown.format(name)!r}{hint} (known: {known})")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
