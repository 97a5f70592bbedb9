"""A search index's folder on disk: its files and ``index.json``, written whole (a temporary folder renamed
into place, or on S3 uploaded with ``index.json`` last), and the model spec a features job's metadata records.

    index.json     kind, metric, column, dim, count, error rows skipped, build parameters (nprobe, recall),
                   the model spec and weights fingerprint of the job that made the vectors, its metadata
    ids.parquet    one row per id, in id order: uri and the features output's own extra (kept) columns
    vectors.f32    flat: the float32 vectors, row after row (memory-mapped when loaded from a local folder)
    index.faiss    the compressed kinds: a FAISS IVF index with its direct map (id -> vector)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from workers.contract import ModelSpec
from workers.errors import ConfigError
from workers.storage import is_remote, storage_for

INDEX_VERSION = 1
INFO, IDS = "index.json", "ids.parquet"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DIR_MODE = 0o777 & ~_umask()  # read once, at import, as workers.storage.local does


def spec_from_metadata(meta: dict[str, Any]) -> ModelSpec:
    """The ``ModelSpec`` that made a job's rows: ``model_spec`` when the metadata has it, else rebuilt
    from its fields (model or model_path, weights, task, layers, pooling, input size, decode, precision,
    preprocessing family, which equals the architecture's own when that is what ran)."""
    if meta.get("model_spec"):
        return ModelSpec.from_dict(meta["model_spec"])
    model_path = meta.get("model_path")
    values: dict[str, Any] = {
        "task": meta.get("task") or "features", "layers": meta.get("layers") or (),
        "pooling": meta.get("pooling") or "avg", "input_shape": meta.get("input_size"),
        "decode": meta.get("decode") or "fast", "precision": meta.get("precision") or "float32",
        "top_k": meta.get("top_k_requested") or meta.get("top_k") or 5, "model_path": model_path,
    }
    family = meta.get("preprocess")
    if model_path:
        values["preprocess"] = family
    else:
        from workers.models.preprocess import preprocess_family

        values["name"] = meta.get("model") or ModelSpec.name
        values["weights"] = meta.get("weights") or "imagenet"
        own = preprocess_family(None, values["name"])
        values["preprocess"] = None if family in (None, own) else family
    return ModelSpec.from_dict(values)


def local_path(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def check_output(path: str) -> None:
    """``ConfigError`` unless ``path`` can become an index folder: new, empty, or an index to replace."""
    if is_remote(path):
        storage_for(path).check_writable(path.rstrip("/") + "/", True)
        return
    folder = local_path(path)
    if os.path.isfile(folder):
        raise ConfigError(f"--output {path} is a file; name a folder for the index")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.isfile(os.path.join(folder, INFO)):
        raise ConfigError(f"--output {path} is a folder that holds something else than an index; name a new one")
    storage_for(path).check_writable(path, True)


@contextlib.contextmanager
def staging(path: str) -> Any:
    """A temporary local folder to write an index into: beside a local ``path`` (so a rename publishes it),
    in the temp dir for S3. Removed on error; ``publish(folder, path)`` moves it into place."""
    parent = os.path.dirname(os.path.abspath(local_path(path).rstrip("/"))) if not is_remote(path) else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    base = os.path.basename(local_path(path).rstrip("/")) or "index"
    folder = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: str, path: str) -> None:
    """Move a complete index folder to ``path``: a rename locally (an older index there is set aside
    first, then removed); on S3 each file is uploaded, ``index.json`` last (replacing an index in place on S3
    is not atomic: a reader may meet old and new files together, so publish a new prefix instead)."""
    if not is_remote(path):
        final = local_path(path).rstrip("/")
        parent = os.path.dirname(os.path.abspath(final))
        old = None
        if os.path.exists(final):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old.", dir=parent)
            os.rename(final, os.path.join(old, "index"))
        os.chmod(folder, _DIR_MODE)  # mkdtemp makes 0700; give the index the usual mode
        os.rename(folder, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return
    storage = storage_for(path)
    names = sorted(os.listdir(folder), key=lambda n: n == INFO)
    for name in names:
        with open(os.path.join(folder, name), "rb") as src, storage.open_stream(join(path, name)) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


def join(path: str, name: str) -> str:
    return path.rstrip("/") + "/" + name


def read_local(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def make_info(kind: str, metric: str, dim: int, count: int, params: dict[str, Any], *, column: str = "features",
              model_spec: ModelSpec | dict[str, Any] | None = None, weights_fingerprint: str | None = None,
              **more: Any) -> dict[str, Any]:
    """``index.json``'s content."""
    if isinstance(model_spec, ModelSpec):
        model_spec = dataclasses.asdict(model_spec)
    return {"version": INDEX_VERSION, "kind": kind, "metric": metric, "column": column, "dim": dim,
            "count": count, "model_spec": model_spec, "weights_fingerprint": weights_fingerprint,
            "params": params, **more}


def write_info(folder: str, info: dict[str, Any]) -> None:
    with open(os.path.join(folder, INFO), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1, sort_keys=True, default=list)
