"""Sources: folders scanned recursively, ``s3://`` prefixes and manifest files, streamed as image URIs.

Nothing here builds a list of all URIs: folders are walked lazily (one folder's names at a time, sorted),
object stores are listed one page (1000 keys) at a time while the shards are being enqueued, and
manifests are read as they go (``producer.manifests``). A web server cannot be listed: an http(s) source
is an image URL or a manifest of URLs.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from producer.manifests import MANIFEST_EXTENSIONS, read_manifest_rows, web_path
from workers.errors import ConfigError, ShardError, SourceError
from workers.storage import BACKENDS, is_remote, is_web, scheme_of, storage_for

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


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

    Within each folder, files come sorted by name (code point order: ``B.jpg`` before ``a.jpg``), then
    its subfolders in name order: the same output order on every filesystem and whatever order the files
    were created in. Only one folder's image names are held at a time (a folder of a million files takes
    under 100 MB while it is sorted), never the whole tree. Hidden entries are skipped and a symlink loop
    is walked once.
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
        files: list[str] = []
        subfolders: list[str] = []
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
                        subfolders.append(entry.name)
                    elif is_image_name(entry.name):
                        files.append(entry.name)
        except OSError:
            return
        for name in sorted(files):
            path = os.path.join(folder, name)
            if filters.accepts(os.path.relpath(path, root)):
                yield path
        for name in sorted(subfolders):
            yield from visit(os.path.join(folder, name))

    yield from visit(root)


def remote_kind(uri: str) -> str:
    """``image``, ``manifest`` or ``prefix`` (a folder), from the key's name alone: listing decides the rest.

    ``s3://bucket``, ``s3://bucket/photos/`` and ``s3://bucket/photos`` are all prefixes (folders). An
    http(s) URL that is neither an image nor a manifest is a ``page``: a web server cannot be listed.
    """
    if is_web(uri):
        path = web_path(uri)
        if is_image_name(path):
            return "image"
        return "manifest" if path.lower().endswith(MANIFEST_EXTENSIONS) else "page"
    key = uri.split("://", 1)[1].partition("/")[2]
    if not key or key.endswith("/"):
        return "prefix"
    if is_image_name(key):
        return "image"
    return "manifest" if key.lower().endswith(MANIFEST_EXTENSIONS) else "prefix"


def walk_prefix(uri: str, filters: Filters = Filters()) -> Iterator[str]:
    """Image objects below a folder-like prefix of an object store, streamed page by page.

    Keys come in the store's order (S3: by key, so stable). As in folders, hidden path parts (``.x``)
    are skipped and the filters see the key below the prefix. A listing that fails (no such bucket,
    access denied, endpoint down) raises ``SourceError``.
    """
    return (found for found, _ in walk_prefix_info(uri, filters))


def walk_prefix_info(uri: str, filters: Filters = Filters()) -> Iterator[tuple[str, Any]]:
    """``walk_prefix`` with each object's ``FileInfo`` (size, LastModified, ETag) from the listing."""
    scheme, _, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    prefix = f"{scheme}://{bucket}/{key if not key or key.endswith('/') else key + '/'}"
    try:
        for found, info in storage_for(prefix).list_info(prefix):
            rel = found[len(prefix):]
            if not rel or rel.endswith("/") or any(part.startswith(".") for part in rel.split("/")):
                continue  # folder markers and hidden entries
            if is_image_name(rel) and filters.accepts(rel):
                yield found, info
    except (OSError, ShardError, ConfigError) as exc:
        raise SourceError(str(exc)) from exc


def check_sources(sources: Iterable[str]) -> None:
    """Fail before anything is enqueued if a source is missing or of an unknown kind.

    Object-store and http(s) sources are only checked for form here: their first listing page (or the
    manifest's first line) is read before the job is created, and a missing bucket or URL fails there.
    """
    for source in sources:
        if is_remote(source):
            scheme = scheme_of(source)
            if scheme not in BACKENDS:
                known = ", ".join(f"{s}://" for s in BACKENDS if s != "file")
                raise SourceError(f"{source}: {scheme}:// sources are not supported (paths, file:// and {known})")
            if is_web(source):
                kind = remote_kind(source)
                if not urlsplit(source).hostname:
                    raise SourceError(f"{source}: no host name ({scheme}://HOST/PATH)")
                if kind == "page":
                    raise SourceError(_not_listable(source))
                continue
            if not source.split("://", 1)[1].split("/", 1)[0]:
                raise SourceError(f"{source}: no bucket name ({scheme}://BUCKET/PREFIX)")
            continue
        path = source[7:] if source.startswith("file://") else source
        if not os.path.exists(path):
            raise SourceError(f"{source}: no such file or folder")
        if os.path.isfile(path) and not (is_image_name(path) or path.lower().endswith(MANIFEST_EXTENSIONS)):
            raise SourceError(f"{source}: not a folder, image or manifest (.txt, .csv, .parquet)")


def _not_listable(source: str) -> str:
    return (f"{source}: an http(s) source must be an image URL or a manifest of URLs (.txt, .csv, .parquet); "
            "a web server cannot be listed like a folder")


class Entry(NamedTuple):
    """One image of the sources: its URI, the values of the kept manifest columns (``()`` without
    ``--keep-columns``) and, when asked for, the version of the file (``FileInfo``: size, mtime, ETag)."""

    uri: str
    values: tuple[Any, ...] = ()
    info: Any = None


def source_kind(source: str) -> tuple[str, str]:
    """``(kind, path)``: ``folder`` or ``prefix`` (walked), ``image`` or ``manifest``; ``path`` is the
    source without ``file://``."""
    if is_remote(source):
        return remote_kind(source), source
    path = source[7:] if source.startswith("file://") else source
    if os.path.isdir(path):
        return "folder", path
    return ("image" if is_image_name(path) else "manifest"), path


def iter_uris(sources: Iterable[str], filters: Filters = Filters()) -> Iterator[str]:
    """Every image URI of every source, in order, lazily."""
    for entry in iter_entries(sources, filters):
        yield entry.uri


def iter_entries(sources: Iterable[str], filters: Filters = Filters(), keep: Sequence[tuple[str, str]] = (),
                 stat: bool = False) -> Iterator[Entry]:
    """Every image of every source as an ``Entry``, in order, lazily.

    ``keep``: the manifest columns whose values come with each URI (``(name, Arrow type)`` pairs; only CSV
    and Parquet manifests have columns, which ``producer.keep`` checks before any work). ``stat``: with
    the version of each file, from the S3 listing where it comes with it, else a stat (S3: a HEAD).
    """

    def version(uri: str) -> Any:
        return storage_for(uri).stat(uri)

    for source in sources:
        kind, path = source_kind(source)
        if kind == "page":
            raise SourceError(_not_listable(source))
        if kind == "prefix":
            for uri, info in walk_prefix_info(path, filters):
                yield Entry(uri, (), info if stat else None)
        elif kind == "folder":
            for uri in walk_folder(path, filters):
                yield Entry(uri, (), version(uri) if stat else None)
        elif kind == "image":
            uri = path if is_remote(path) else os.path.abspath(path)
            yield Entry(uri, (), version(uri) if stat else None)
        else:
            for uri, values in read_manifest_rows(path, keep):
                if filters.accepts(uri):
                    yield Entry(uri, values, version(uri) if stat else None)
