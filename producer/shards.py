"""A job's sources -> numbered shard lists, lazily: duplicates skipped, fixed-size shards (or, for an
incremental run, shards to process and carry shards)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

from producer.dedupe import Dedupe
from producer.sources import Entry, Filters, iter_entries
from workers.contract import ShardList

if TYPE_CHECKING:
    from producer.incremental import Previous

T = TypeVar("T")


def shards(uris: Iterable[T], size: int) -> Iterator[tuple[int, list[T]]]:
    """Yield (shard_id, chunk) with ``size`` items per chunk; consumes the input lazily."""
    if size < 1:
        raise ValueError("shard size must be at least 1")
    it = iter(uris)
    shard_id = 0
    while chunk := list(islice(it, size)):
        yield shard_id, chunk
        shard_id += 1


def shard_list(entries: Sequence[Entry], names: Sequence[str], carry: dict[str, Any] | None = None) -> ShardList:
    """A shard's list from its entries: the URIs and, column by column, the kept values."""
    columns = {name: [e.values[i] for e in entries] for i, name in enumerate(names)}
    return ShardList([e.uri for e in entries], columns, carry)


class ShardStream:
    """``(shard_id, ShardList)`` for every shard of a job's sources, an iterator.

    Entries come from ``producer.sources`` with the values of the ``keep`` columns (``(name, Arrow type)``
    pairs), through the duplicate filter when there is more than one source (``producer.dedupe``), into
    shards of ``size``, or with ``previous`` into shards to process and carry shards
    (``producer.incremental.split``). ``duplicates``: URIs skipped so far; ``empty()`` looks ahead one shard.
    """

    def __init__(self, sources: Sequence[str], filters: Filters, size: int,
                 keep: Sequence[tuple[str, str]] = (), previous: Previous | None = None) -> None:
        self.dedupe = Dedupe() if len(sources) > 1 else None
        entries: Iterable[Entry] = iter_entries(sources, filters, keep, stat=previous is not None)
        if self.dedupe is not None:
            entries = self.dedupe.filter(entries)
        names = [name for name, _ in keep]
        if previous is not None:
            from producer.incremental import split

            self._shards = split(entries, previous, size, names)
        else:
            self._shards = ((i, shard_list(chunk, names)) for i, chunk in shards(entries, size))
        self._ahead: list[tuple[int, ShardList]] = []

    @property
    def duplicates(self) -> int:
        return self.dedupe.skipped if self.dedupe is not None else 0

    def empty(self) -> bool:
        """True when the sources have no image at all (reads the first shard, which ``next`` then returns)."""
        if not self._ahead:
            self._ahead = list(islice(self._shards, 1))
        return not self._ahead

    def __iter__(self) -> ShardStream:
        return self

    def __next__(self) -> tuple[int, ShardList]:
        if self._ahead:
            return self._ahead.pop()
        return next(self._shards)
