"""Which architecture a weights file belongs to, from its parameter count alone (no TensorFlow).

Every architecture's parameter count, with and without its classifier, is in ``layers.json`` and no
two are equal, so summing the sizes of the arrays in a ``.h5`` / ``.weights.h5`` file (or the weights
inside a ``.keras`` archive) names the model it was saved from. That turns Keras's wall of shape
mismatches into one line: "this file holds ResNet50 weights, not MobileNetV2's: use --model ResNet50".
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import Any

from workers.errors import ConfigError
from workers.models.registry import ARCHITECTURES, model_info


@dataclass(frozen=True)
class Match:
    name: str  # the architecture
    include_top: bool  # saved with its classifier


def is_weights_file(path: str) -> bool:
    """HDF5 (.weights.h5, .h5), a zip (.keras) or a PyTorch state dict (a zip, or pickled by old torch)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return head.startswith(b"\x89HDF\r\n\x1a\n") or zipfile.is_zipfile(path) or path.endswith((".pth", ".pt"))


def parameter_count(path: str) -> int | None:
    """The number of values stored in a Keras weights file, or None if it is not one (or unreadable)."""
    try:
        import h5py
    except ImportError:  # pragma: no cover - Keras depends on it
        return None

    def count(handle: Any) -> int:
        group = handle["model_weights"] if "model_weights" in handle else handle  # a Keras 2 model file
        total = 0

        def visit(_: str, obj: Any) -> None:
            nonlocal total
            if isinstance(obj, h5py.Dataset) and obj.shape:
                size = 1
                for dim in obj.shape:
                    size *= int(dim)
                total += size

        group.visititems(visit)
        return total

    try:
        if zipfile.is_zipfile(path):  # a .keras archive: its weights are model.weights.h5
            with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as inner, h5py.File(inner) as h:
                return count(h)
        with h5py.File(path, "r") as handle:
            return count(handle)
    except (OSError, KeyError, ValueError):
        return None


def identify(path: str) -> list[Match]:
    """The architectures (with or without classifier) whose parameter count the file has."""
    n = parameter_count(path)
    if not n:
        return []
    found = []
    for arch in ARCHITECTURES.values():
        try:
            info = model_info(arch)
        except ConfigError:  # no facts recorded for it
            continue
        if info.get("params") == n:
            found.append(Match(arch.name, True))
        if info.get("notop_params") == n:
            found.append(Match(arch.name, False))
    return found


def describe(match: Match) -> str:
    return f"{match.name} weights {'with' if match.include_top else 'without'} the classifier"


def mismatch(path: str, arch_name: str, include_top: bool) -> str | None:
    """One line saying why ``path`` cannot be ``arch_name``'s weights and what to do, or None when the
    file may well fit (same architecture, or nothing known about it)."""
    found = identify(path)
    if not found:
        return None
    mine = [m for m in found if m.name == arch_name]
    if mine:
        if include_top and not any(m.include_top for m in mine):
            return (f"{path} holds {arch_name} weights without the classifier: it can extract features "
                    "(--task features) but not classify")
        return None
    other = found[0]
    return (f"{path} holds {describe(other)}, not {arch_name}'s: use --model {other.name} "
            f"(or the weights file of {arch_name})")
