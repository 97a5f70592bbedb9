"""Read the tensors of a PyTorch state-dict checkpoint (``.pth``) with numpy only; PyTorch is not needed.

    >>> tensors = read_state_dict("efficientnet-lite0.pth")
    >>> tensors["_conv_stem.weight"].shape
    (32, 3, 3, 3)

Both of PyTorch's serialization formats are read:

- the legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``, PyTorch < 1.6): a magic
  number, a protocol version and system info (three small pickles), the object pickle, the pickled list of
  storage keys, then each storage's raw bytes prefixed by its element count (8 bytes, little-endian);
- the zip format (PyTorch >= 1.6): ``<archive>/data.pkl`` and one entry ``<archive>/data/<key>`` per storage.

Pickles run code when they are loaded, so the unpickler here only resolves the few names a state dict
needs (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, the typed storage classes) and
refuses every other global with ``CheckpointError``: a checkpoint that names ``os.system`` or a model class
is rejected, never executed. Tensor views are bounds-checked before ``as_strided`` so a crafted file
cannot read outside its storage.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np

from workers.errors import ConfigError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class CheckpointError(ConfigError):
    """The file is not a state dict this reader can load safely (or is not a checkpoint at all)."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    def __init__(self, name: str) -> None:
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _StorageRef:
    """A storage whose bytes come after the object pickle (legacy format), resolved once they are read."""

    def __init__(self, key: str, dtype: np.dtype, view: tuple[int, int] | None) -> None:
        self.key, self.dtype, self.view = key, dtype, view


class _TensorRef:
    def __init__(self, storage: _StorageRef, args: tuple[Any, ...]) -> None:
        self.storage, self.args = storage, args

    def resolve(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        data = storages.get(self.storage.key)
        if data is None:
            raise CheckpointError(f"storage {self.storage.key} is missing from the checkpoint")
        if self.storage.view is not None:
            offset, size = self.storage.view
            data = data[offset:offset + size]
        return _rebuild_tensor(data, *self.args)


def _rebuild_tensor(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    *_: Any) -> Any:
    """``torch._utils._rebuild_tensor_v2``: a copy of a view of ``storage``, checked against its bounds."""
    if isinstance(storage, _StorageRef):
        return _TensorRef(storage, (offset, size, stride))
    if not isinstance(storage, np.ndarray):
        raise CheckpointError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"invalid tensor geometry: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise CheckpointError(f"tensor of size {size} at offset {offset} overruns its storage of {storage.size}")
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False).copy()


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data  # ``torch._utils._rebuild_parameter``: a Parameter is just its tensor here


def _device(name: Any, *_: Any) -> str:
    return str(name)


# Each lookup makes a fresh object: pickle's BUILD opcode can set attributes on whatever find_class returned,
# and must not be able to alter this module's functions or storage types for later loads.
_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a C type: its attributes are read-only
    ("torch._utils", "_rebuild_tensor_v2"): lambda: partial(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: partial(_rebuild_parameter),
    ("torch", "device"): lambda: partial(_device),
    **{("torch", name): partial(_StorageType, name) for name in STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of a plain state dict and refuses all others.

    ``read_storage(key, dtype)`` returns a storage's bytes as a 1-d array (zip format); without it,
    storages become references to resolve once their bytes have been read (legacy format).
    """

    def __init__(self, file: IO[bytes], read_storage: Callable[[str, np.dtype], np.ndarray] | None = None) -> None:
        super().__init__(file)
        self._read_storage = read_storage
        self.storages: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            make = _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"refusing to load {module}.{name} from a checkpoint: only plain state dicts of tensors are "
                "supported (save model.state_dict(), not the model)"
            ) from None
        return make()

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CheckpointError(f"unsupported persistent object in checkpoint: {str(pid)[:80]}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r}")
        self.dtypes[key] = storage_type.dtype
        view = pid[5] if len(pid) > 5 else None  # legacy format, PyTorch < 0.4: a slice of a larger storage
        view = (int(view[1]), int(view[2])) if view is not None else None
        if self._read_storage is None:
            return _StorageRef(key, storage_type.dtype, view)
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, storage_type.dtype)
        data = self.storages[key]
        return data[view[0]:view[0] + view[1]] if view else data


def _tensors_only(obj: Any, storages: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(obj, dict):
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        if isinstance(value, _TensorRef):
            value = value.resolve(storages or {})
        if isinstance(value, np.ndarray):
            out[str(name)] = value
    return out


def _read_legacy(f: IO[bytes]) -> dict[str, np.ndarray]:
    header = RestrictedUnpickler(f)
    if header.load() != LEGACY_MAGIC:
        raise CheckpointError("not a PyTorch checkpoint (bad magic number)")
    protocol = header.load()
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported legacy checkpoint protocol {protocol}")
    sys_info = header.load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise CheckpointError("big-endian checkpoints are not supported")
    unpickler = RestrictedUnpickler(f)
    obj = unpickler.load()
    keys = RestrictedUnpickler(f).load()
    storages = {}
    for key in map(str, keys):
        dtype = unpickler.dtypes.get(key)
        if dtype is None:
            raise CheckpointError(f"storage {key} is not referenced by the checkpoint")
        (count,) = struct.unpack("<q", f.read(8))
        data = f.read(count * dtype.itemsize) if count >= 0 else b""
        if count < 0 or len(data) != count * dtype.itemsize:
            raise CheckpointError("the checkpoint is truncated or corrupt")
        storages[key] = np.frombuffer(data, dtype)
    return _tensors_only(obj, storages)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise CheckpointError("big-endian checkpoints are not supported")

        def read_storage(key: str, dtype: np.dtype) -> np.ndarray:
            if f"{prefix}data/{key}" not in names:
                raise CheckpointError(f"storage {key} is missing from {path}")
            return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)

        return _tensors_only(RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), read_storage).load())


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state-dict file, by name, as numpy arrays (copies, independent of the file).

    Entries that are not tensors are dropped. Raises ``CheckpointError`` for files that are not a
    state dict or that reference anything beyond tensors and storages.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        with open(path, "rb") as f:
            return _read_legacy(f)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, zipfile.BadZipFile, ValueError, TypeError, KeyError,
            IndexError, AttributeError, OverflowError) as exc:  # malformed input, whatever the opcode tripped on
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
