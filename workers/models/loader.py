"""Build a warm, compiled predictor from a ``ModelSpec`` (imports TensorFlow; worker side only).

The predictor runs the model through one ``tf.function`` traced for a fixed batch shape; the last
batch is padded. ``model.predict`` per batch would retrace and leak memory in a long-lived worker.
Each process keeps the most recently used predictors in a small LRU, so a worker loads a model once
and reuses it for every later shard.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from workers.contract import ModelSpec, file_fingerprint
from workers.errors import ConfigError
from workers.models.registry import Architecture, get_architecture, resolve_layer

log = logging.getLogger(__name__)
RANDOM_SEED = 0


@lru_cache(maxsize=1)
def tensorflow() -> Any:
    """Import TensorFlow once; let several processes share a GPU by growing memory on demand."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the device was already initialised by another model
            log.debug("memory growth already fixed for %s", gpu.name)
    return tf


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with the package so no download is needed."""
    text = resources.files("workers.models").joinpath("imagenet_class_index.json").read_text()
    index = json.loads(text)
    return [index[str(i)][1] for i in range(len(index))]


@dataclass
class Predictor:
    """A model ready for batches: ``preprocess`` on the host, ``predict`` on the device."""

    spec: ModelSpec
    arch: Architecture
    input_hw: tuple[int, int]
    feature_dim: int | None
    labels: list[str] | None
    fingerprint: str
    _fn: Any
    _preprocess: Any

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """The architecture's own ``preprocess_input`` on a float32 batch (may work in place)."""
        return self._preprocess(x.astype(np.float32, copy=False))

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        n, batch = len(x), self.spec.batch_size
        if n > batch:
            raise ValueError(f"batch of {n} exceeds the compiled batch size {batch}")
        if n < batch:
            pad = np.zeros((batch - n, *x.shape[1:]), dtype=np.float32)
            x = np.concatenate([x, pad])
        out = self._fn(x)
        return {name: value.numpy()[:n] for name, value in out.items()}


def keras_cache_dir() -> Path:
    """Where ``keras.utils.get_file`` keeps downloaded weights (``$KERAS_HOME/models``)."""
    return Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser()) / "models"


def _imagenet_error(arch: Architecture, exc: Exception) -> ConfigError:
    url = re.search(r"https?://\S+?\.h5", str(exc))
    fname = url.group(0).rsplit("/", 1)[-1] if url else "the weights file"
    where = f" from {url.group(0)}" if url else ""
    return ConfigError(
        f"cannot download ImageNet weights for {arch.name}{where}: place {fname} in "
        f"{keras_cache_dir()}/ or pass --weights PATH"
    )


def _build(arch: Architecture, include_top: bool, size: int, weights: str | None) -> Any:
    ctor = getattr(importlib.import_module(arch.module), arch.constructor)
    return ctor(weights=weights, include_top=include_top, input_shape=(size, size, 3))


def _copy_prefix(src: Any, dst: Any) -> None:
    """Copy weights layer by layer, by position: a no-top model is a prefix of the full one."""
    for a, b in zip(src.layers, dst.layers):
        b.set_weights(a.get_weights())


def load_model(spec: ModelSpec, arch: Architecture, size: int, include_top: bool) -> tuple[Any, str]:
    """The Keras model for ``spec`` with its weights, and a fingerprint of those weights."""
    import keras

    weights = spec.weights
    if weights == "none":
        keras.utils.set_random_seed(RANDOM_SEED)  # every worker builds the same random model
        return _build(arch, include_top, size, None), f"random:seed={RANDOM_SEED}"
    if weights == "imagenet":
        try:
            model = _build(arch, include_top, size, "imagenet")
        except ValueError as exc:
            raise ConfigError(f"{arch.name} with ImageNet weights: {exc}") from exc
        except Exception as exc:  # get_file wraps network failures in a plain Exception
            raise _imagenet_error(arch, exc) from exc
        return model, f"imagenet:keras-{keras.__version__}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file not found: {weights}")
    fingerprint = file_fingerprint(str(path))
    full = _build(arch, True, size if include_top else arch.default_size, None)
    try:
        with warnings.catch_warnings():  # a no-top file warns about the missing head before it raises
            warnings.simplefilter("ignore", UserWarning)
            full.load_weights(str(path))
    except Exception as full_exc:  # not the full model's weights: try the no-top variant
        if include_top:
            raise ConfigError(
                f"{path} does not hold {arch.name} weights with the classifier ({full_exc}); "
                "use --task features for a no-top weights file"
            ) from full_exc
        notop = _build(arch, False, size, None)
        try:
            notop.load_weights(str(path))
        except Exception as exc:
            raise ConfigError(f"{path} holds neither full nor no-top {arch.name} weights: {exc}") from exc
        return notop, fingerprint
    if include_top:
        return full, fingerprint
    notop = _build(arch, False, size, None)
    _copy_prefix(full, notop)
    return notop, fingerprint


def build_predictor(spec: ModelSpec) -> Predictor:
    tf = tensorflow()
    import keras

    arch = get_architecture(spec.name)
    if spec.task == "classify":
        size, include_top, layer_index = spec.input_size or arch.default_size, True, None
    else:
        size = spec.input_size or arch.default_size
        layer_index, include_top = resolve_layer(arch, spec.layer) if spec.layer else (None, False)
        if include_top:
            size = arch.default_size  # head layers (e.g. VGG16 fc2) exist only at the trained size
    if size < arch.min_size:
        raise ConfigError(f"{arch.name} needs an input size of at least {arch.min_size}, got {size}")
    model, fingerprint = load_model(spec, arch, size, include_top)

    if spec.task == "classify":
        classes = int(model.output.shape[-1])
        k = min(spec.top_k, classes)

        def head(x: Any) -> dict[str, Any]:
            top = tf.math.top_k(model(x, training=False), k=k)
            return {"top_k_scores": top.values, "top_k_indices": top.indices}

        labels = imagenet_labels() if classes == 1000 else [f"class_{i}" for i in range(classes)]
        feature_dim = None
    else:
        target = model.layers[layer_index].output if layer_index is not None else model.output
        body = keras.Model(model.inputs, target)
        reduce = tf.reduce_mean if spec.pooling == "avg" else tf.reduce_max

        def head(x: Any) -> dict[str, Any]:
            y = body(x, training=False)
            if len(y.shape) == 4:
                y = reduce(y, axis=[1, 2])
            return {"features": tf.reshape(y, [tf.shape(y)[0], -1])}

        shape = target.shape[1:]
        feature_dim = int(shape[-1]) if len(shape) == 3 else int(np.prod(shape))
        labels = None

    signature = [tf.TensorSpec([spec.batch_size, size, size, 3], tf.float32)]
    fn = tf.function(head, input_signature=signature, reduce_retracing=True)
    preprocess = importlib.import_module(arch.module).preprocess_input
    log.info("built %s (%s, %s) for %s at %dx%d", arch.name, spec.task, fingerprint, spec.weights, size, size)
    return Predictor(spec, arch, (size, size), feature_dim, labels, fingerprint, fn, preprocess)


class PredictorCache:
    """A small per-process LRU of warm predictors, keyed by the model spec."""

    def __init__(self, maxsize: int = 2, build: Any = None) -> None:
        self.maxsize = max(1, maxsize)
        self._build = build or build_predictor
        self._items: OrderedDict[str, Predictor] = OrderedDict()
        self.builds = 0

    def get(self, spec: ModelSpec) -> Predictor:
        key = spec.cache_key()
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        predictor = self._build(spec)
        self.builds += 1
        self._items[key] = predictor
        while len(self._items) > self.maxsize:
            evicted, _ = self._items.popitem(last=False)
            log.info("evicted model %s from the cache", evicted)
        return predictor
