"""``batchinfer models`` and ``batchinfer layers``: the registry's static facts as tables, without TensorFlow."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from workers.models.registry import ARCHITECTURES, get_architecture, layer_table, model_info


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _shape(shape: tuple) -> str:
    if shape and isinstance(shape[0], list):  # a layer with several outputs
        return ", ".join(_shape(tuple(s)) for s in shape)
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: set[int]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join(cells).rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    """One line per architecture: input size, parameters, feature size, preprocessing, minimum size."""
    rows = []
    for arch in ARCHITECTURES.values():
        info = model_info(arch)
        rows.append((arch.name, str(arch.default_size), _millions(info["params"]), str(info["feature_dim"]),
                     arch.preprocess, str(arch.min_size)))
    _print_table(("model", "input", "params", "features", "preprocess", "min_input"), rows, right={1, 2, 3, 5})
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    """Index, name and output shape (at the default input size) of every layer, for ``--layer``."""
    arch = get_architecture(args.model)
    top = bool(getattr(args, "top", False))
    rows = [(str(i), name, _shape(shape)) for i, name, shape in layer_table(arch, include_top=top)]
    _print_table(("index", "layer", "output_shape"), rows, right={0})
    what = "with the classifier" if top else "without the classifier (--top adds it)"
    print(f"{arch.name} {what}: {len(rows)} layers at {arch.default_size}x{arch.default_size}; "
          "shapes exclude the batch axis", file=sys.stderr)
    return 0
