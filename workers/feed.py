"""Read and decode ahead of the model: one thread pool per process, shards fed through it back to back.

The pool lives as long as the process (a worker's, or ``batchinfer run``'s), so a shard never waits for
threads to start. Loads run at most ``prefetch`` batches ahead of the model, counted across shards
(bounded memory). A shard announced as next (``Feeder.announce``: ``batchinfer run`` knows its next
shard) takes the places its predecessor no longer needs once that one's last batch is in flight, so
the next shard's first batches decode while the current shard's last ones run on the model.

Per image, a failure is data (``Loaded.error``); a storage that fails as a whole (``ShardError``,
``ConfigError``) fails that shard only, and its remaining loads fail fast instead of each retrying.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from PIL import Image

from workers.confine import ANYWHERE, OUTSIDE, Roots
from workers.decode import DECODERS, Decoded, keep_encoded
from workers.errors import ConfigError, DecodeError, ShardError
from workers.storage import storage_for
from workers.storage.base import FileInfo

PREFETCH = 2  # batches in flight beyond the one the model is given
PRIME_BYTES = 256 << 20  # decoded images ``Feeder.prime`` may hold before the model takes them


@dataclass
class Loaded:
    """One image read and decoded, or the reason it could not be."""

    uri: str
    image: Decoded | None
    error: str | None
    seconds: float
    info: FileInfo | None = None  # the version of the file that was read (size, mtime, ETag)


def load(uri: str, decode: Callable[[bytes, tuple[int, int]], Decoded], size: tuple[int, int]) -> Loaded:
    """Read and decode one image; any failure of the image becomes its error row.

    A storage that fails as a whole (no such bucket, bad credentials, endpoint down) raises
    ``ShardError`` instead, which fails the shard rather than writing one error row per image.
    """
    start = time.perf_counter()
    try:
        data, info = storage_for(uri).read_info(uri)
    except FileNotFoundError:
        return Loaded(uri, None, "file not found", time.perf_counter() - start)
    except OSError as exc:
        return Loaded(uri, None, f"cannot read: {exc.strerror or exc}", time.perf_counter() - start)
    return from_bytes(uri, data, decode, size, info, start)


def from_bytes(uri: str, data: bytes, decode: Callable[[bytes, tuple[int, int]], Decoded], size: tuple[int, int],
               info: FileInfo | None = None, start: float | None = None) -> Loaded:
    """Decode bytes already in memory (an upload to the HTTP service); a failure is the image's error."""
    start = time.perf_counter() if start is None else start
    try:
        image = decode(data, size)
    except DecodeError as exc:
        return Loaded(uri, None, str(exc), time.perf_counter() - start, info)
    return Loaded(uri, image, None, time.perf_counter() - start, info)


class ShardLoads:
    """One shard's images in batches: those submitted to the pool (in order) and those still to submit."""

    def __init__(self, key: tuple[Any, ...], uris: Sequence[str], batch_size: int,
                 load_one: Callable[[str], Loaded]) -> None:
        self.key, self.uris, self.batch_size = key, uris, batch_size
        self._load_one = load_one
        self.next = 0  # the first URI not yet submitted
        self.pending: deque[list[Future[Loaded]]] = deque()
        self.broken: list[ShardError | ConfigError] = []

    @property
    def all_submitted(self) -> bool:
        return self.next >= len(self.uris)

    def submit_batch(self, pool: Executor) -> None:
        chunk = self.uris[self.next:self.next + self.batch_size]
        self.pending.append([pool.submit(self._load, uri) for uri in chunk])
        self.next += len(chunk)

    def _load(self, uri: str) -> Loaded:
        if self.broken:  # the storage already failed as a whole: fail fast instead of retrying every image
            raise self.broken[0]
        try:
            return self._load_one(uri)
        except (ShardError, ConfigError) as exc:
            self.broken.append(exc)
            raise

    def cancel(self) -> None:
        """Drop what nobody will use: queued loads never start (running ones finish, unread)."""
        for futures in self.pending:
            for f in futures:
                f.cancel()
        self.pending.clear()
        self.next = len(self.uris)


Load = Callable[[str, Callable[[bytes, tuple[int, int]], Decoded], tuple[int, int]], Loaded]


def shard_loads(task: Any, size: tuple[int, int], load_image: Load = load, roots: Roots = ANYWHERE) -> ShardLoads:
    """The loads of ``task`` (a ``ShardTask``) decoded at ``size`` = (height, width); an image outside
    ``roots`` (``BATCHINFER_ALLOWED_ROOTS``) is not read, its row says so."""
    decode = keep_encoded if task.model.decode == "gpu" else DECODERS[task.model.decode]
    key = (task.job_id, task.shard_id, task.model.decode, tuple(size), task.model.batch_size, roots)

    def load_one(uri: str) -> Loaded:
        if not roots.contains(uri):
            return Loaded(uri, None, OUTSIDE, 0.0)
        return load_image(uri, decode, size)

    return ShardLoads(key, task.uris, task.model.batch_size, load_one)


def prime_images(size: tuple[int, int], decode: str, limit_bytes: int = PRIME_BYTES) -> int:
    """How many images of ``size`` decoded by ``decode`` fit in ``limit_bytes`` (``Feeder.prime``)."""
    itemsize = 4 if decode == "keras" else 1  # keras mode decodes to float32
    return max(1, limit_bytes // (size[0] * size[1] * 3 * itemsize))


class Feeder:
    """Batches of loaded images for one shard after another, through one long-lived ``pool``.

    ``batches(task, size, roots)`` yields a shard's batches in input order; ``announce(task, size, roots)``
    names a shard that will run later in this process (in announcement order), whose loads start as soon
    as places in the prefetch window free up. ``roots`` (``Settings.allowed_roots``) is part of a shard's
    identity: loads announced under other roots are not used. ``load_image(uri, decode, size)`` reads and
    decodes one image (tests pass a fake).
    """

    def __init__(self, pool: Executor, prefetch: int = PREFETCH, load_image: Load = load) -> None:
        self.pool, self.prefetch, self._load_image = pool, prefetch, load_image
        self._announced: deque[ShardLoads] = deque()
        self._lock = threading.Lock()
        self.started_early = 0  # announced shards that were already loading when they ran
        self._gate = threading.Condition()  # while priming: one load at a time
        self._priming = False
        self._running = 0

    def announce(self, task: Any, size: tuple[int, int], roots: Roots = ANYWHERE) -> None:
        """``task`` runs after the shards running or announced now."""
        with self._lock:
            self._announced.append(shard_loads(task, size, self._load, roots))

    def prime(self, tasks: Sequence[Any], size: tuple[int, int], roots: Roots = ANYWHERE,
              limit_bytes: int = PRIME_BYTES) -> None:
        """Announce ``tasks`` (the first to run) and start loading them now, one image at a time, up to
        ``limit_bytes`` of decoded images, while the model is still being built: building it keeps about
        one core busy, and what decodes on the other is decode the model will not wait for. ``ready()``
        ends it (call it in a ``finally``: until then the pool's other threads wait). Not for ``keras``
        mode, whose decoder imports Keras."""
        budget = prime_images(size, tasks[0].model.decode, limit_bytes) if tasks else 0
        # what the loads import, imported here: the model's build imports TensorFlow meanwhile, and imports on
        # two threads at once can deadlock (Python's module locks and TensorFlow's circular imports)
        Image.init()
        for task in tasks:
            try:
                storage_for(task.uris[0])
            except Exception:  # noqa: BLE001 - no storage for it: its loads say so, where they always did
                pass
        with self._gate:
            self._priming = True
        for task in tasks:
            self.announce(task, size, roots)
        with self._lock:
            for loads in self._announced:
                while budget > 0 and not loads.all_submitted:
                    budget -= min(loads.batch_size, len(loads.uris) - loads.next)
                    loads.submit_batch(self.pool)

    def ready(self) -> None:
        """The model is built: loads run on every thread again (the end of ``prime``)."""
        with self._gate:
            self._priming = False
            self._gate.notify_all()

    def _load(self, uri: str, decode: Callable[[bytes, tuple[int, int]], Decoded], size: tuple[int, int]) -> Loaded:
        with self._gate:
            while self._priming and self._running:
                self._gate.wait()
            self._running += 1
        try:
            return self._load_image(uri, decode, size)
        finally:
            with self._gate:
                self._running -= 1
                self._gate.notify()

    def cancel_announced(self) -> None:
        """The announced shards will not run (the run stopped): stop loading them."""
        with self._lock:
            while self._announced:
                self._announced.popleft().cancel()

    def batches(self, task: Any, size: tuple[int, int],
                roots: Roots = ANYWHERE) -> Generator[list[Loaded], None, None]:
        """Yield ``task``'s loaded batches in order; stopping early cancels its loads not yet started."""
        loads = self._claim(shard_loads(task, size, self._load, roots))
        try:
            while True:
                self._top_up(loads)
                if not loads.pending:
                    return
                yield [f.result() for f in loads.pending.popleft()]
        finally:
            loads.cancel()

    def _claim(self, fresh: ShardLoads) -> ShardLoads:
        """The announced loads of this shard if there are any (those announced before it were skipped)."""
        with self._lock:
            for i, announced in enumerate(self._announced):
                if announced.key == fresh.key and announced.uris == fresh.uris:
                    for _ in range(i + 1):
                        skipped = self._announced.popleft()
                        if skipped is not announced:
                            skipped.cancel()
                    self.started_early += bool(announced.pending)
                    return announced
        return fresh

    def _top_up(self, loads: ShardLoads) -> None:
        """Keep ``prefetch`` + 1 batches in flight: this shard's first, then the announced shards' in order."""
        with self._lock:
            queue = [loads, *self._announced]
            in_flight = sum(len(q.pending) for q in queue)
            for q in queue:  # the running shard always gets a batch, whatever others hold
                while (in_flight <= self.prefetch or (q is loads and not q.pending)) and not q.all_submitted:
                    q.submit_batch(self.pool)
                    in_flight += 1


_FEEDERS: dict[int, Feeder] = {}
_FEEDERS_LOCK = threading.Lock()


def feeder(threads: int) -> Feeder:
    """This process's feeder with a pool of ``threads`` read/decode threads (``settings.io_threads``)."""
    with _FEEDERS_LOCK:
        found = _FEEDERS.get(threads)
        if found is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="batchinfer-load")
            found = _FEEDERS[threads] = Feeder(pool)
        return found


def _after_fork() -> None:
    """A forked child (a Celery pool process) inherits the feeders but not their threads: it starts anew."""
    global _FEEDERS_LOCK
    _FEEDERS.clear()
    _FEEDERS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
