"""Numbers in messages and flags: ``1 row``, ``2 rows``; sizes like ``512M`` or ``1.5GiB``."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    """Bytes from ``512M``, ``2G``, ``1.5GiB``, ``800kB`` or a plain number (binary units, as ``sort -S`` and
    Docker's ``--memory`` read them); ``ConfigError`` naming ``flag`` otherwise."""
    from workers.errors import ConfigError

    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):].removesuffix("ib").removesuffix("b") if raw[len(number):] not in ("b",) else "b"
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{flag} takes a size like 512M, 2G or 1.5GiB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{flag} must be a positive size, got {text!r}")
    return int(value)
