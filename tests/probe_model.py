"""A tiny model whose custom layer misbehaves on cue, so failure tests break real worker processes honestly.

The worker loads it with ``BATCHINFER_CUSTOM_OBJECTS=tests.probe_model:CUSTOM_OBJECTS`` (an operator-
registered layer, as in production). Its ``Probe`` layer runs Python on every batch:
- ``PROBE_SLEEP=S``: each batch takes S seconds longer (a slow shard, to kill or stop mid-way);
- ``PROBE_POISON=FILE``: while FILE exists, a batch holding a magenta image (255, 0, 255) SIGKILLs its own
  process, as the kernel's OOM killer would for an image that blows the container's memory.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

MAGENTA = (255, 0, 255)


def _probe(x: np.ndarray) -> np.ndarray:
    delay = float(os.environ.get("PROBE_SLEEP") or 0)
    if delay:
        time.sleep(delay)
    poison = os.environ.get("PROBE_POISON")
    if poison and os.path.exists(poison):
        means = x.reshape(len(x), -1, 3).mean(axis=1)
        if np.any((means[:, 0] > 250) & (means[:, 1] < 5) & (means[:, 2] > 250)):
            os.kill(os.getpid(), signal.SIGKILL)
    return x


def _layer_class():
    import keras

    @keras.saving.register_keras_serializable(package="probe")
    class Probe(keras.layers.Layer):
        def call(self, x):
            import tensorflow as tf

            y = tf.numpy_function(_probe, [x], tf.float32, stateful=True)
            y.set_shape(x.shape)
            return y

    return Probe


Probe = _layer_class()
CUSTOM_OBJECTS = {"Probe": Probe}


def save(path: Path) -> Path:
    """A 32x32 classifier with the probe in front; ``--preprocess none`` lets it see raw pixels."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = Probe()(inputs)
    x = keras.layers.Rescaling(1 / 255.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x)).save(path)
    return path


def make_images(folder: Path, count: int, poison_at: int | None = None) -> list[Path]:
    """``count`` small solid-colour PNGs (distinct colours, never magenta) and one magenta at ``poison_at``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        colour = MAGENTA if i == poison_at else (i * 37 % 200, 60 + i * 11 % 150, i * 5 % 120)
        path = folder / f"img{i:04d}.png"
        Image.new("RGB", (40, 40), colour).save(path)
        paths.append(path)
    return paths
