"""What every storage backend's ``open_atomic`` returns: a local temporary file and its fate."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class FileInfo:
    """What identifies a version of a file: size, modification time (µs since the epoch, UTC) and, on
    object stores and web servers, the ETag. An incremental run reuses a row when all of them are
    unchanged; ``modified`` is None when the store does not say (a web server without Last-Modified),
    and such a row is never reused."""

    size: int
    modified: int | None
    etag: str | None = None


class PendingFile:
    """A local temporary ``path`` to write; ``commit()`` publishes it whole, ``discard()`` drops it.

    Subclasses implement ``commit``. As a context manager it commits on success, discards on error.
    """

    def __init__(self, prefix: str, folder: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        os.close(fd)

    def commit(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class StreamedFile:
    """A binary file object to write a large output through, published whole on success.

    ``with backend.open_stream(uri) as fh:`` — the default goes through ``open_atomic`` (a local
    temporary file, then rename or upload); S3 overrides it with a multipart upload that sends parts as
    they fill, so nothing is staged on local disk.
    """

    def __init__(self, pending: PendingFile) -> None:
        self.pending = pending
        self.fh = open(pending.path, "wb")

    def __enter__(self) -> object:
        return self.fh

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.fh.close()
        if exc_type is None:
            self.pending.commit()
        else:
            self.pending.discard()
