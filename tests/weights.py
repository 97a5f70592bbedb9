"""Random but informative weights for parity tests, saved to local files (no download needed).

Freshly initialised networks hide errors: batch-norm layers start as identities, activations
shrink or blow up, and a random 1000-way classifier gives a near-uniform softmax, so wrong
preprocessing still "matches" to 1e-4. We therefore (1) seed Keras, (2) calibrate every batch-norm
layer's moving mean/variance on real photos (momentum 0, one training-mode pass) or, in a network
without batch norm (VGG), rescale each convolution so its output on the photos has unit standard
deviation, and (3) rescale the classifier (the last layer with a kernel: a Dense, or MobileNet's 1x1
convolution) so its logits on those photos, centred per class, have a standard deviation of 3, which spreads the softmax
and gives the photos different top classes. Models are built at their default size with an explicit
``input_shape``, as the worker does: ``NASNetLarge(include_top=False)`` without one builds another graph.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from workers.models.registry import get_architecture


def reference_inputs(paths: list[Path], size: int, module: str) -> np.ndarray:
    """The seeds' reference path: load_img -> img_to_array -> preprocess_input."""
    from keras.utils import img_to_array, load_img

    pre = importlib.import_module(module).preprocess_input
    x = np.stack([img_to_array(load_img(str(p), target_size=(size, size))) for p in paths])
    return pre(x)


def constructor(name: str):
    """The Keras constructor of a registry architecture."""
    arch = get_architecture(name)
    return getattr(importlib.import_module(arch.constructor_module), arch.constructor)


def _kernel_layers(model) -> list:
    return [layer for layer in model.layers if getattr(layer, "kernel", None) is not None and layer.get_weights()]


def _unit_variance(model, x: np.ndarray, layers: list) -> None:
    """Scale each layer's kernel (in order) so its output on ``x`` has a standard deviation of 1."""
    import keras

    for layer in layers:
        out = keras.ops.convert_to_numpy(keras.Model(model.input, layer.output)(x, training=False))
        weights = layer.get_weights()
        scale = 1.0 / max(float(out.std()), 1e-6)
        layer.set_weights([w * scale for w in weights])  # kernel and bias: the output scales exactly


def calibrate(model, x: np.ndarray) -> None:
    """Make a randomly initialised ``model`` informative on the photos ``x`` (see the module docstring)."""
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    classifier = _kernel_layers(model)[-1]
    if bns:
        for layer in bns:
            layer.momentum = 0.0
        model(x, training=True)  # moving statistics := statistics of these photos
        for layer in bns:
            layer.momentum = 0.99
    else:
        _unit_variance(model, x, _kernel_layers(model)[:-1])

    features = keras.ops.convert_to_numpy(keras.Model(model.input, classifier.input)(x, training=False))
    features = features.reshape(len(x), -1)
    kernel, bias = classifier.get_weights()
    logits = features @ kernel.reshape(-1, kernel.shape[-1])
    mean = logits.mean(axis=0)  # what all photos share: centring it gives each photo its own top classes
    scale = 3.0 / max(float((logits - mean).std()), 1e-6)
    classifier.set_weights([kernel * scale, (-mean * scale).astype(bias.dtype)])


def make_weights(name: str, folder: Path, photos: list[Path], seed: int = 1, full: bool = True) -> tuple[Path, Path]:
    """Save calibrated full-model and no-top weights of ``name``; return (full_path, notop_path).

    Files already in ``folder`` are reused; ``full=False`` is satisfied by the no-top file alone.
    """
    import keras

    arch = get_architecture(name)
    full_path = folder / f"{arch.name}.weights.h5"
    notop_path = folder / f"{arch.name}_notop.weights.h5"
    if notop_path.exists() and (full_path.exists() or not full):
        return full_path, notop_path
    ctor = constructor(name)
    keras.utils.set_random_seed(seed)
    shape = (arch.default_size, arch.default_size, 3)
    model = ctor(weights=None, include_top=True, input_shape=shape)
    calibrate(model, reference_inputs(photos, arch.default_size, arch.module))
    model.save_weights(str(full_path))

    notop = ctor(weights=None, include_top=False, input_shape=shape)
    for a, b in zip(model.layers, notop.layers):  # the no-top model is a prefix of the full one (layers.json)
        b.set_weights(a.get_weights())
    notop.save_weights(str(notop_path))
    return full_path, notop_path
