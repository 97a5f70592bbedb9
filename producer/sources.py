"""Sources: folders scanned recursively and manifest files, streamed as image URIs.

Nothing here builds a list of all URIs: folders are walked lazily and manifests are read line by
line or batch by batch.
"""

from __future__ import annotations

import csv
import fnmatch
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from workers.errors import SourceError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class Filters:
    """``--include`` / ``--exclude`` glob patterns, matched against the path below the source folder
    and against the file name (so ``*.png`` and ``cats/*`` both work)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def accepts(self, relpath: str) -> bool:
        name = os.path.basename(relpath)

        def hit(patterns: tuple[str, ...]) -> bool:
            return any(fnmatch.fnmatch(relpath, p) or fnmatch.fnmatch(name, p) for p in patterns)

        if self.include and not hit(self.include):
            return False
        return not hit(self.exclude)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_folder(root: str, filters: Filters = Filters()) -> Iterator[str]:
    """Image files under ``root``, recursively, streamed.

    Files come in the folder's own listing order (stable for an unchanged folder), so a folder of a
    million files is never held as one list; subfolders are visited afterwards, in name order.
    Hidden entries are skipped and a symlink loop is walked once.
    """
    root = os.path.abspath(root)
    seen: set[tuple[int, int]] = set()

    def visit(folder: str) -> Iterator[str]:
        try:
            st = os.stat(folder)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:  # a symlink back to a folder already walked
            return
        seen.add((st.st_dev, st.st_ino))
        subfolders = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()  # follows symlinks
                    except OSError:
                        continue
                    if is_dir:
                        subfolders.append(entry.path)
                    elif is_image_name(entry.name) and filters.accepts(os.path.relpath(entry.path, root)):
                        yield entry.path
        except OSError:
            return
        for sub in sorted(subfolders):
            yield from visit(sub)

    yield from visit(root)


def read_manifest(path: str) -> Iterator[str]:
    """URIs from a ``.txt`` (one per line, ``#`` comments) or a ``.csv``/``.parquet`` with a ``uri`` column.

    Relative paths are taken relative to the manifest's folder. An unreadable manifest raises
    ``SourceError`` naming it.
    """
    try:
        yield from _manifest_entries(path)
    except (UnicodeDecodeError, OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"{path}: cannot read manifest: {exc}") from exc


def _manifest_entries(path: str) -> Iterator[str]:
    base = os.path.dirname(os.path.abspath(path))

    def absolute(uri: str) -> str:
        return uri if "://" in uri or os.path.isabs(uri) else os.path.join(base, uri)

    lower = path.lower()
    if lower.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield absolute(line)
    elif lower.endswith(".csv"):
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's "CSV UTF-8" has a BOM
            reader = csv.DictReader(fh)
            if "uri" not in (reader.fieldnames or []):
                raise SourceError(f"{path}: a CSV manifest needs a 'uri' column (has {reader.fieldnames})")
            for row in reader:
                uri = (row["uri"] or "").strip()
                if uri:
                    yield absolute(uri)
    elif lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "uri" not in pf.schema_arrow.names:
            raise SourceError(f"{path}: a Parquet manifest needs a 'uri' column")
        for batch in pf.iter_batches(columns=["uri"], batch_size=10_000):
            for uri in batch.column(0).to_pylist():
                if uri and uri.strip():
                    yield absolute(uri.strip())
    else:
        raise SourceError(f"{path}: not a folder, image or manifest (.txt, .csv, .parquet)")


def check_sources(sources: Iterable[str]) -> None:
    """Fail before anything is enqueued if a source is missing or of an unknown kind."""
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            scheme = source.split("://", 1)[0]
            raise SourceError(f"{source}: {scheme}:// sources are not supported yet")
        path = source[7:] if source.startswith("file://") else source
        if not os.path.exists(path):
            raise SourceError(f"{source}: no such file or folder")
        if os.path.isfile(path) and not (is_image_name(path) or path.lower().endswith(MANIFEST_EXTENSIONS)):
            raise SourceError(f"{source}: not a folder, image or manifest (.txt, .csv, .parquet)")


def iter_uris(sources: Iterable[str], filters: Filters = Filters()) -> Iterator[str]:
    """Every image URI of every source, in order, lazily."""
    for source in sources:
        path = source[7:] if source.startswith("file://") else source
        if os.path.isdir(path):
            yield from walk_folder(path, filters)
        elif is_image_name(path):
            yield os.path.abspath(path)
        else:
            for uri in read_manifest(path):
                if filters.accepts(uri):
                    yield uri
