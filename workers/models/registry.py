"""Architecture registry: one entry per ``keras.applications`` model, importable without TensorFlow.

Adding an architecture is one ``Architecture(...)`` line plus its layer names in ``layers.json``
(regenerate with ``python -m workers.models.layer_names``).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from workers.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """Static facts about one architecture.

    ``preprocess`` names the ImageNet preprocessing family: ``caffe`` (BGR, mean subtracted),
    ``tf`` (scaled to [-1, 1]), ``torch`` (scaled to [0, 1], mean/std normalised) or ``none``
    (the model preprocesses inside itself).
    """

    name: str
    module: str
    default_size: int
    min_size: int
    preprocess: str

    @property
    def constructor(self) -> str:
        return self.name


ARCHITECTURES: dict[str, Architecture] = {
    a.name.lower(): a
    for a in [
        Architecture("MobileNetV2", "keras.applications.mobilenet_v2", 224, 32, "tf"),
        Architecture("ResNet50", "keras.applications.resnet50", 224, 32, "caffe"),
        Architecture("InceptionV3", "keras.applications.inception_v3", 299, 75, "tf"),
        Architecture("VGG16", "keras.applications.vgg16", 224, 32, "caffe"),
        Architecture("DenseNet121", "keras.applications.densenet", 224, 32, "torch"),
    ]
}


def get_architecture(name: str) -> Architecture:
    """Look an architecture up by case-insensitive name; unknown names suggest the closest."""
    arch = ARCHITECTURES.get(name.lower())
    if arch is None:
        names = [a.name for a in ARCHITECTURES.values()]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        if not close:
            close = difflib.get_close_matches(name.lower(), list(ARCHITECTURES), n=1, cutoff=0.5)
            close = [ARCHITECTURES[c].name for c in close]
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint} (known: {', '.join(names)})")
    return arch


@lru_cache(maxsize=1)
def _layer_table() -> dict[str, dict[str, list[str]]]:
    text = resources.files("workers.models").joinpath("layers.json").read_text()
    return json.loads(text)


def layer_names(arch: Architecture, include_top: bool) -> list[str]:
    """Layer names of the model as a fresh process builds it (auto-named layers included)."""
    return _layer_table()[arch.name]["full" if include_top else "notop"]


def resolve_layer(arch: Architecture, layer: str) -> tuple[int, bool]:
    """Map a layer name to (index, needs_top) so the worker can find it by position.

    Keras numbers auto-named layers with a process-wide counter, so the same layer gets a
    different name in a worker that built another model first; the index is stable.
    """
    notop = layer_names(arch, include_top=False)
    if layer in notop:
        return notop.index(layer), False
    full = layer_names(arch, include_top=True)
    if layer in full:
        return full.index(layer), True
    close = difflib.get_close_matches(layer, full, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"{arch.name} has no layer {layer!r}.{hint} Valid layers: {', '.join(full)}"
    )
