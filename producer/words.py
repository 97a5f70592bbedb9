"""Counts in messages: ``1 row``, ``2 rows``, ``0 rows``."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"
