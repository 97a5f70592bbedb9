"""Incremental runs: ``--skip-unchanged PREVIOUS_OUTPUT`` reuses the rows of images that did not change.

An image is unchanged when its URI, size and modification time (and ETag, on S3) equal those recorded in
the previous output's ``size_bytes`` / ``modified`` / ``etag`` columns, and the previous output was made
by the same model, weights and options (checked from its job metadata; a difference is refused with one
line naming it). Unchanged images are not processed: they go into *carry* shards whose spooled list names
the previous file and row of each, and a worker copies those rows, without the model, into the new
output, so the new output is complete on its own. New and changed images are processed; images gone
from the sources are absent. The previous output's index (URI -> version and place) is held in the
producer's memory: about 200 bytes per previous row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from producer.shards import shard_list
from producer.sources import Entry
from workers.contract import PREPROCESS_FAMILIES, ModelSpec, ShardList, file_fingerprint
from workers.errors import ConfigError
from workers.schema import read_job_metadata
from workers.sinks.parquet import read_schema, read_shard
from workers.storage import storage_for
from workers.storage.base import FileInfo

VERSION_COLUMNS = ["uri", "size_bytes", "modified", "etag"]


@dataclass(frozen=True)
class Carry:
    """Where an unchanged image's row is: a file of the previous output and a row in it."""

    file: str
    row: int


def previous_files(path: str, what: str = "--skip-unchanged") -> list[str]:
    """The Parquet files of a previous output: one file, or a folder's shard files (local or S3).
    ``what`` names the argument in the error when there are none."""
    storage = storage_for(path)
    if path.lower().endswith((".parquet", ".pq")) and storage.exists(path):
        return [path]
    prefix = path.rstrip("/") + "/"
    files = sorted(u for u in storage.list(prefix) if _data_file(u[len(prefix):]))
    if not files:
        raise ConfigError(f"{what} {path}: no Parquet output there")
    return files


def _data_file(rel: str) -> bool:
    return rel.endswith(".parquet") and not any(part.startswith((".", "_")) for part in rel.split("/"))


def differences(metadata: dict[str, Any], spec: ModelSpec) -> list[str]:
    """What the previous output's job metadata says that this job's model options contradict."""
    wanted: dict[str, Any] = {"task": spec.task, "layers": list(spec.layers), "decode": spec.decode,
                              "precision": spec.precision}
    metadata = {"precision": "float32", **metadata}  # written before --precision existed: float32
    if "classify" in spec.tasks:
        wanted["top_k"] = spec.top_k
    if "features" in spec.tasks:
        wanted["pooling"] = spec.pooling
    if spec.input_shape:
        wanted["input_size"] = list(spec.input_shape)
    if spec.preprocess:
        from workers.models.preprocess import preprocess_family

        wanted["preprocess"] = preprocess_family(spec.preprocess)
        if metadata.get("preprocess") not in PREPROCESS_FAMILIES:  # written before the family was recorded
            wanted["preprocess"] = spec.preprocess
    if "top_k_requested" in metadata:
        metadata = {**metadata, "top_k": metadata["top_k_requested"]}
    if spec.model_path:
        local = spec.model_path if os.path.exists(spec.model_path) else None
        if local and os.path.isfile(local):
            wanted["weights_fingerprint"] = file_fingerprint(local)
        else:
            wanted["model_path"] = spec.model_path
    else:
        from workers.models.registry import get_architecture

        wanted["model"] = get_architecture(spec.name).name
        wanted["weights"] = spec.weights
        if spec.weights not in ("imagenet", "none") and os.path.isfile(spec.weights):
            wanted["weights_fingerprint"] = file_fingerprint(spec.weights)
            wanted.pop("weights")
    return [f"{key}={metadata.get(key)!r} there, {value!r} here" for key, value in wanted.items()
            if metadata.get(key) != value]


class Previous:
    """The previous output's index: each URI's recorded version and where its row is."""

    def __init__(self, path: str, spec: ModelSpec) -> None:
        self.path = path
        self.files = previous_files(path)
        schema = read_schema(self.files[0])
        missing = [c for c in VERSION_COLUMNS if c not in schema.names]
        if missing:
            raise ConfigError(f"--skip-unchanged {path}: it has no {', '.join(missing)} columns (made by an "
                              "older version); run once without --skip-unchanged")
        differ = differences(read_job_metadata(schema), spec)
        if differ:
            raise ConfigError(f"--skip-unchanged {path}: made with other options ({'; '.join(differ)})")
        self.schema = schema
        self.index: dict[str, tuple[int, int, str | None, int, int]] = {}
        for file_no, uri in enumerate(self.files):
            table = read_shard(uri, VERSION_COLUMNS)
            sizes = table.column("size_bytes").to_pylist()
            times = table.column("modified").cast("int64").to_pylist()
            for row, (u, size, modified, etag) in enumerate(zip(table.column("uri").to_pylist(), sizes, times,
                                                                table.column("etag").to_pylist())):
                if size is not None and modified is not None:
                    self.index[u] = (size, modified, etag, file_no, row)

    def match(self, uri: str, info: FileInfo | None) -> Carry | None:
        """Where the reusable row of ``uri`` is, if the file is unchanged since it was made."""
        if info is None:
            return None
        found = self.index.get(uri)
        if found is None:
            return None
        size, modified, etag, file_no, row = found
        if size != info.size or modified != info.modified or (info.etag or etag) and etag != info.etag:
            return None
        return Carry(self.files[file_no], row)


def split(entries: Iterable[Entry], previous: Previous | None, size: int,
          names: Sequence[str] = ()) -> Iterator[tuple[int, ShardList]]:
    """``(shard_id, ShardList)`` for the sources' entries (``Entry`` with its ``FileInfo``): shards of images to
    process and carry shards of unchanged images (``carry``: ``{"files": [...], "rows": [[file, row]]}``),
    interleaved as they fill, numbered in order. ``names``: the kept columns, whose values both kinds carry."""
    todo: list[Entry] = []
    same: list[tuple[Entry, Carry]] = []
    shard_id = 0
    for entry in entries:
        found = previous.match(entry.uri, entry.info) if previous is not None else None
        if found is None:
            todo.append(entry)
            if len(todo) == size:
                yield shard_id, shard_list(todo, names)
                shard_id, todo = shard_id + 1, []
        else:
            same.append((entry, found))
            if len(same) == size:
                yield shard_id, _carry_shard(same, names)
                shard_id, same = shard_id + 1, []
    if todo:
        yield shard_id, shard_list(todo, names)
        shard_id += 1
    if same:
        yield shard_id, _carry_shard(same, names)


def _carry_shard(items: list[tuple[Entry, Carry]], names: Sequence[str]) -> ShardList:
    files: dict[str, int] = {}
    rows = [[files.setdefault(c.file, len(files)), c.row] for _, c in items]
    return shard_list([e for e, _ in items], names, {"files": list(files), "rows": rows})
