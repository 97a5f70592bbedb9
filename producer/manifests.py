"""Manifests: ``.txt`` (one URI per line), ``.csv`` and ``.parquet`` (a ``uri`` column) files of image
URIs, local, on S3 or at an http(s) URL, streamed line by line or batch by batch, with the values of the
columns that ``--keep-columns`` names. Relative entries are resolved against the manifest's place.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from workers.errors import ShardError, SourceError
from workers.storage import is_remote, is_web, storage_for

MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")


def web_path(uri: str) -> str:
    """The path of a URL, without its query (a pre-signed ``list.txt?X-Amz-Signature=…`` is a .txt)."""
    try:
        return urlsplit(uri).path
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        raise SourceError(f"{uri}: not a valid URL ({exc})") from None


def manifest_name(path: str) -> str:
    """What a manifest's kind is told from: its path, without a URL's query string."""
    return web_path(path) if is_web(path) else path


def read_manifest(path: str) -> Iterator[str]:
    """URIs from a ``.txt`` (one per line, ``#`` comments) or a ``.csv``/``.parquet`` with a ``uri`` column.

    The manifest may be local or on an object store (``s3://bucket/list.txt``). Relative paths are taken
    relative to the manifest's folder. An unreadable manifest raises ``SourceError`` naming it.
    """
    for uri, _ in read_manifest_rows(path):
        yield uri


def read_manifest_rows(path: str, keep: Sequence[tuple[str, str]] = ()) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """``(uri, values)`` for each entry of a manifest (see ``read_manifest``): ``values`` are the row's
    ``keep`` columns, ``(name, Arrow type)`` pairs: Parquet values cast to that type, CSV cells as text,
    None where the manifest has none (a null, or an empty CSV cell)."""
    try:
        yield from _manifest_entries(path, keep)
    except (UnicodeDecodeError, OSError, ValueError, ShardError) as exc:  # ArrowInvalid is a ValueError
        raise SourceError(f"{path}: cannot read manifest: {exc}") from exc


def manifest_columns(path: str) -> dict[str, Any]:
    """A CSV or Parquet manifest's columns and their Arrow types (CSV: all ``string``), from its header
    or footer alone (a Parquet manifest on S3 is downloaded for it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if manifest_name(path).lower().endswith(".csv"):
            with _text(path) as fh:
                return {name: pa.string() for name in next(csv.reader(fh), [])}
        with _seekable(path) as fh:
            return {f.name: f.type for f in pq.ParquetFile(fh).schema_arrow}
    except (UnicodeDecodeError, OSError, ValueError, ShardError) as exc:
        raise SourceError(f"{path}: cannot read manifest: {exc}") from exc


def _text(path: str) -> IO[str]:
    """The manifest as text, streamed; ``-sig``: Excel's "CSV UTF-8" starts with a BOM."""
    return io.TextIOWrapper(storage_for(path).open_read(path), encoding="utf-8-sig", newline="")


def _seekable(path: str) -> Any:
    """A seekable binary file of ``path`` (Parquet needs one): the file itself, or a spooled copy."""
    stream = storage_for(path).open_read(path)
    if stream.seekable():
        return stream
    with stream:
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(stream, spool, 1 << 20)
    spool.seek(0)
    return spool


def _manifest_entries(path: str, keep: Sequence[tuple[str, str]]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    remote, web = is_remote(path), is_web(path)
    base = path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(path))
    names = [name for name, _ in keep]

    def absolute(uri: str) -> str:
        if "://" in uri:
            return uri
        if web:  # as a browser resolves a link: "a.jpg" next to the manifest, "/a.jpg" on its host
            return urljoin(path, uri)
        if os.path.isabs(uri):
            return uri
        return f"{base}/{uri}" if remote else os.path.join(base, uri)

    def missing(have: Sequence[str]) -> None:
        gone = [name for name in names if name not in have]
        if gone:
            raise SourceError(f"{path}: no column {gone[0]!r} to keep (has {', '.join(have) or 'no columns'})")

    lower = manifest_name(path).lower()
    if lower.endswith(".txt"):
        missing([])
        with _text(path) as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield absolute(line), ()
    elif lower.endswith(".csv"):
        with _text(path) as fh:
            reader = csv.DictReader(fh)
            if "uri" not in (reader.fieldnames or []):
                raise SourceError(f"{path}: a CSV manifest needs a 'uri' column (has {reader.fieldnames})")
            missing(reader.fieldnames or [])
            for row in reader:
                uri = (row["uri"] or "").strip()
                if uri:
                    yield absolute(uri), tuple(row.get(name) or None for name in names)
    elif lower.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with _seekable(path) as fh:
            pf = pq.ParquetFile(fh)
            if "uri" not in pf.schema_arrow.names:
                raise SourceError(f"{path}: a Parquet manifest needs a 'uri' column")
            missing(pf.schema_arrow.names)
            types = [pa.type_for_alias(type_name) for _, type_name in keep]
            for batch in pf.iter_batches(columns=["uri", *names], batch_size=10_000):
                uris = batch.column(0).to_pylist()
                columns = [batch.column(i + 1).cast(t).to_pylist() for i, t in enumerate(types)]
                for uri, values in zip(uris, zip(*columns) if columns else itertools.repeat(())):
                    if uri and uri.strip():
                        yield absolute(uri.strip()), values
    else:
        raise SourceError(f"{path}: not a folder, image or manifest (.txt, .csv, .parquet)")
