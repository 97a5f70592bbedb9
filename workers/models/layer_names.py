"""Regenerate ``layers.json`` (run ``python -m workers.models.layer_names [NAME ...]``), one subprocess a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.models.registry import ARCHITECTURES, Architecture, get_architecture

PATH = Path(__file__).with_name("layers.json")

_BUILD = """
import importlib, json, sys
import keras
ctor = getattr(importlib.import_module(sys.argv[1]), sys.argv[2])
shape = (int(sys.argv[3]), int(sys.argv[3]), 3)

def shapes(model):
    out = []
    for layer in model.layers:
        ys = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        dims = [list(y.shape[1:]) for y in ys]
        out.append(dims[0] if len(dims) == 1 else dims)
    return out

full = ctor(weights=None, include_top=True, input_shape=shape)
info = {"names": [layer.name for layer in full.layers], "shapes": shapes(full), "params": full.count_params()}
keras.backend.clear_session()
notop = ctor(weights=None, include_top=False, input_shape=shape)
names = [layer.name for layer in notop.layers]
if names == info["names"][:len(names)] and shapes(notop) == info["shapes"][:len(names)]:
    info["notop"] = len(names)
else:
    info["notop"], info["notop_shapes"] = names, shapes(notop)
info["notop_params"] = notop.count_params()
info["feature_dim"] = int(notop.output.shape[-1])
print(json.dumps(info))
"""


def build_entry(arch: Architecture) -> dict:
    """Build ``arch`` (full and no-top, at its default size) in a fresh interpreter and describe it."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, arch.constructor_module, arch.constructor, str(arch.default_size)],
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_table(archs: list[Architecture], jobs: int = 2) -> dict[str, dict]:
    with ThreadPoolExecutor(jobs) as pool:
        entries = pool.map(build_entry, archs)
        return {arch.name: entry for arch, entry in zip(archs, entries)}


def main(names: list[str]) -> None:
    """All architectures, or only ``names`` merged into the existing file. A fresh interpreter per model makes
    auto-generated layer names start from zero, as in a worker that builds that model first."""
    archs = [get_architecture(n) for n in names] or list(ARCHITECTURES.values())
    table = json.loads(PATH.read_text()) if names and PATH.exists() else {}
    table.update(build_table(archs))
    ordered = {a.name: table[a.name] for a in ARCHITECTURES.values() if a.name in table}
    PATH.write_text(json.dumps(ordered, separators=(",", ":")) + "\n")
    for name in (a.name for a in archs):
        entry = ordered[name]
        prefix = "prefix" if isinstance(entry["notop"], int) else "NOT a prefix"
        print(f"{name}: {len(entry['names'])} layers, no-top {prefix}, {entry['params']:,} params")
    print(f"wrote {PATH} ({PATH.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
