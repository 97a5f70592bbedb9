"""Local filesystem storage: plain paths and ``file://`` URIs."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from workers.errors import ConfigError
from workers.storage.base import FileInfo, PendingFile, StreamedFile


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def to_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


class AtomicFile(PendingFile):
    """A local temporary path that becomes ``final`` on ``commit()`` and vanishes on ``discard()``."""

    def __init__(self, final: str) -> None:
        self.final = final
        folder = os.path.dirname(os.path.abspath(final))
        os.makedirs(folder, exist_ok=True)
        super().__init__(prefix="." + os.path.basename(final) + ".", folder=folder)

    def commit(self) -> None:
        os.chmod(self.path, _FILE_MODE)  # mkstemp makes 0600; give the result the usual mode
        os.replace(self.path, self.final)


class LocalStorage:
    """Reads, lists and atomically writes local files."""

    def read(self, uri: str) -> bytes:
        with open(to_path(uri), "rb") as fh:
            return fh.read()

    def read_info(self, uri: str) -> tuple[bytes, FileInfo]:
        """The bytes and the version they were read from (``fstat`` of the open file)."""
        with open(to_path(uri), "rb") as fh:
            st = os.fstat(fh.fileno())
            return fh.read(), FileInfo(st.st_size, st.st_mtime_ns // 1000)

    def stat(self, uri: str) -> FileInfo | None:
        try:
            st = os.stat(to_path(uri))
        except OSError:
            return None
        return FileInfo(st.st_size, st.st_mtime_ns // 1000)

    def open_read(self, uri: str) -> BinaryIO:
        return open(to_path(uri), "rb")

    def list(self, prefix: str) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(to_path(prefix)):
            dirnames.sort()
            for name in sorted(filenames):
                yield os.path.join(dirpath, name)

    def exists(self, uri: str) -> bool:
        return os.path.exists(to_path(uri))

    def remove_stale(self, uri: str) -> int:
        """Delete temporary files that killed writers of ``uri`` left behind; return how many."""
        final = to_path(uri)
        folder, name = os.path.split(os.path.abspath(final))
        removed = 0
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
                removed += 1
        return removed

    def check_writable(self, uri: str, folder: bool) -> None:
        """``ConfigError`` unless ``uri`` can be written as a folder (``folder``) or as a file.

        A folder that does not exist yet counts as its nearest existing parent, which must be a folder
        this process can create files in: a file created and removed there proves it (``os.access``
        cannot see read-only mounts, and root passes it anyway).
        """
        path = os.path.abspath(to_path(uri))
        if not folder:
            if os.path.isdir(path):
                raise ConfigError(f"{uri} is a folder: name a file in it, e.g. {os.path.join(uri, 'results.parquet')}")
            path = os.path.dirname(path)
        existing = path
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"cannot write to {uri}: {existing} is a file, not a folder")
        try:
            fd, probe = tempfile.mkstemp(prefix=".batchinfer-write-check-", dir=existing)
        except OSError as exc:
            raise ConfigError(f"cannot write to {uri}: {existing} is not writable ({exc.strerror})") from exc
        os.close(fd)
        os.unlink(probe)

    def open_stream(self, uri: str) -> StreamedFile:
        """A binary file to write ``uri`` through (temporary name, renamed on success)."""
        return StreamedFile(self.open_atomic(uri))

    def open_atomic(self, uri: str) -> AtomicFile:
        """Write to a hidden temporary name in the same folder; ``commit()`` renames it over ``uri``."""
        return AtomicFile(to_path(uri))
