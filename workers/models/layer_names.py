"""Regenerate ``layers.json``: the layer names of every registered architecture, built fresh.

Run ``python -m workers.models.layer_names`` after adding an architecture. Each model is built in its
own subprocess so auto-generated names start from zero, as in a worker that builds it first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from workers.models.registry import ARCHITECTURES

_BUILD = """
import importlib, json, sys
import keras
mod = importlib.import_module(sys.argv[1])
ctor = getattr(mod, sys.argv[2])
out = {}
for top in (True, False):
    keras.backend.clear_session()
    model = ctor(weights=None, include_top=top)
    out["full" if top else "notop"] = [layer.name for layer in model.layers]
print(json.dumps(out))
"""


def build_table() -> dict[str, dict[str, list[str]]]:
    table = {}
    for arch in ARCHITECTURES.values():
        proc = subprocess.run(
            [sys.executable, "-c", _BUILD, arch.module, arch.constructor],
            check=True, capture_output=True, text=True,
        )
        table[arch.name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return table


if __name__ == "__main__":
    path = Path(__file__).with_name("layers.json")
    path.write_text(json.dumps(build_table(), indent=0) + "\n")
    print(f"wrote {path}")
