"""Random but informative weights for parity tests, saved to local files (no download needed).

Freshly initialised networks hide errors: batch-norm layers start as identities, activations
shrink or blow up, and a random 1000-way classifier gives a near-uniform softmax, so wrong
preprocessing still "matches" to 1e-4. We therefore (1) seed Keras, (2) calibrate every batch-norm
layer's moving mean/variance on real photos (momentum 0, one training-mode pass), and (3) rescale the
classifier so its logits on those photos have a standard deviation of 3, which spreads the softmax.
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


def make_weights(name: str, folder: Path, photos: list[Path], seed: int = 1) -> tuple[Path, Path]:
    """Save calibrated full-model and no-top weights of ``name``; return (full_path, notop_path)."""
    import keras

    arch = get_architecture(name)
    full_path = folder / f"{arch.name}.weights.h5"
    notop_path = folder / f"{arch.name}_notop.weights.h5"
    if full_path.exists() and notop_path.exists():
        return full_path, notop_path
    ctor = getattr(importlib.import_module(arch.module), arch.constructor)
    keras.utils.set_random_seed(seed)
    model = ctor(weights=None, include_top=True)
    x = reference_inputs(photos, arch.default_size, arch.module)

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)  # moving statistics := statistics of these photos
    for layer in bns:
        layer.momentum = 0.99

    head = model.layers[-1]
    penultimate = keras.Model(model.inputs, model.layers[-2].output)(x, training=False)
    kernel, bias = head.get_weights()
    logits = np.asarray(penultimate) @ kernel
    kernel = kernel * (3.0 / max(float(logits.std()), 1e-6))
    head.set_weights([kernel, np.zeros_like(bias)])
    model.save_weights(str(full_path))

    notop = ctor(weights=None, include_top=False)
    for a, b in zip(model.layers, notop.layers):
        b.set_weights(a.get_weights())
    notop.save_weights(str(notop_path))
    return full_path, notop_path
