"""Build a warm, compiled predictor from a ``ModelSpec`` (imports Keras and its backend; worker side only).

The predictor (``workers.models.predictor``) runs the model through one function compiled for a fixed
batch shape (``workers.models.backends``: tf.function, jax.jit or torch); the last batch is padded.
``model.predict`` per batch would retrace and leak memory in a long-lived worker. The model itself, with
its weights, comes from ``workers.models.build`` (registry architectures) or ``workers.models.custom``
(the user's own files). Each process keeps the most recently used predictors in a small LRU, so a worker
loads a model once and reuses it for every later shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from workers.confine import Roots
from workers.contract import ModelSpec
from workers.errors import ConfigError
from workers.models import backends
from workers.models.build import dtype_policy, ends_in_logits, load_model
from workers.models.custom import load_custom, read_labels
from workers.models.predictor import Predictor, make_forward
from workers.models.preprocess import preprocess_family, preprocess_function
from workers.models.registry import get_architecture, layer_names, resolve_layer
from workers.settings import Settings

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with the package so no download is needed."""
    text = resources.files("workers.models").joinpath("imagenet_class_index.json").read_text()
    index = json.loads(text)
    return [index[str(i)][1] for i in range(len(index))]


@dataclass
class _Graph:
    """What ``build_predictor`` needs from either kind of model."""

    model: Any
    name: str
    fingerprint: str
    hw: tuple[int, int]
    feature_targets: list[Any]
    preprocess: Any
    labels: list[str] | None
    softmax: bool  # apply softmax to the classifier output (it ends in logits)
    preprocess_name: str = "none"


def input_hw(spec: ModelSpec) -> tuple[int, int] | None:
    """The input size a registry model will be built at, before it is built (``batchinfer run`` decodes
    meanwhile); None where only the build can tell: a model file, or feature layers (head layers exist
    only at the trained size)."""
    if spec.model_path or spec.layers:
        return None
    try:
        arch = get_architecture(spec.name)
    except ConfigError:
        return None  # the build says why
    return spec.input_shape or (arch.default_size, arch.default_size)


def _registry_graph(spec: ModelSpec) -> _Graph:
    arch = get_architecture(spec.name)
    refs = [resolve_layer(arch, layer) for layer in spec.layers]
    head_layers = any(top for _, top in refs)
    include_top = "classify" in spec.tasks or head_layers
    hw = spec.input_shape or (arch.default_size, arch.default_size)
    if head_layers:
        hw = (arch.default_size, arch.default_size)  # head layers (e.g. VGG16 fc2) exist only at the trained size
    if min(hw) < arch.min_size:
        raise ConfigError(f"{arch.name} needs an input size of at least {arch.min_size}, got {hw[0]}x{hw[1]}")
    model, fingerprint = load_model(spec, arch, hw, include_top)
    if refs:
        targets = [model.layers[index].output for index, _ in refs]
    else:
        last_base = len(layer_names(arch, include_top=False)) - 1
        targets = [model.layers[last_base].output]
    labels = read_labels(spec.labels) if spec.labels else None
    return _Graph(model, arch.name, fingerprint, hw, targets, preprocess_function(spec.preprocess, arch.name),
                  labels, softmax=ends_in_logits(spec), preprocess_name=preprocess_family(spec.preprocess, arch.name))


def _custom_graph(spec: ModelSpec, trusted: Roots) -> _Graph:
    loaded = load_custom(spec, trusted)
    model = loaded.model
    if spec.layers:
        if loaded.savedmodel:
            raise ConfigError("--layer needs a .keras or .h5 model (a SavedModel exposes only its outputs)")
        names = {layer.name.lower(): layer.name for layer in model.layers}
        missing = [layer for layer in spec.layers if layer.lower() not in names]
        if missing:
            valid = ", ".join(names.values())
            raise ConfigError(f"{spec.model_path} has no layer {missing[0]!r}. Valid layers: {valid}")
        targets = [model.get_layer(names[layer.lower()]).output for layer in spec.layers]
    elif loaded.savedmodel or len(model.layers) < 3:
        targets = [model.output]
    else:
        targets = [model.layers[-2].output]  # the input of the classifier
    labels_file = spec.labels
    labels = read_labels(labels_file) if labels_file else loaded.sidecar.get("labels")
    activation = getattr(getattr(model.layers[-1], "activation", None), "__name__", "")
    softmax = not loaded.savedmodel and activation not in ("softmax", "sigmoid")
    chosen = spec.preprocess or loaded.sidecar.get("preprocess")
    preprocess = preprocess_function(chosen, None)
    name = f"custom:{os.path.basename(str(spec.model_path).rstrip('/'))}"
    return _Graph(model, name, loaded.fingerprint, loaded.input_hw, targets, preprocess, labels, softmax,
                  preprocess_family(chosen))


def _feature_size(shape: Any, pooling: str) -> tuple[int, list[int]]:
    dims = [int(d) for d in shape[1:]]
    if len(dims) == 3 and pooling != "none":
        return dims[-1], dims
    return int(np.prod(dims)), dims


def build_predictor(spec: ModelSpec, torch_compile: bool = False, expose_inputs: bool = False,
                    trusted: Roots | None = None) -> Predictor:
    """Load the model of ``spec`` and compile one call that yields every requested output, warmed on a
    batch of zeros (so a precision the backend cannot run fails here, in one line).

    ``torch_compile``: ``torch.compile`` the call on the torch backend. ``expose_inputs`` (tests): the
    call also returns the device's float32 pixels and model input (``predictor.PIXELS``, ``MODEL_INPUT``).
    ``trusted``: the model files that may run their own code (default ``BATCHINFER_TRUST_MODELS``).
    """
    backend = backends.load()
    import keras

    if trusted is None:
        trusted = Settings.from_env().trusted_models
    with dtype_policy(spec.precision):
        graph = _custom_graph(spec, trusted) if spec.model_path else _registry_graph(spec)
    classify = "classify" in spec.tasks
    columns = spec.feature_columns()
    outputs = ([graph.model.output] if classify else []) + (graph.feature_targets if columns else [])
    body = keras.Model(graph.model.inputs, outputs)

    feature_columns, feature_shapes = {}, {}
    for column, target in zip(columns, graph.feature_targets):
        feature_columns[column], feature_shapes[column] = _feature_size(target.shape, spec.pooling)

    labels = graph.labels
    k = 0
    if classify:
        classes = int(graph.model.output.shape[-1])
        k = min(spec.top_k, classes)
        if labels is None:
            labels = imagenet_labels() if classes == 1000 else [f"class_{i}" for i in range(classes)]
        if len(labels) != classes:
            raise ConfigError(f"{len(labels)} labels for a model with {classes} classes")

    forward = make_forward(graph.preprocess, classify, graph.softmax, k, columns, spec.pooling, expose_inputs)

    def compile_for(dtype: str, batch: int) -> Any:
        return backends.compile_forward(forward, body, (batch, graph.hw[0], graph.hw[1], 3), dtype, torch_compile)

    predictor = Predictor(spec, graph.name, graph.hw, feature_columns, feature_shapes, labels, graph.fingerprint,
                          compile_for, graph.preprocess_name, k)
    _warm(predictor, backend)
    log.info("built %s (%s, %s, %s on %s) at %dx%d", graph.name, spec.task, graph.fingerprint, spec.precision,
             backend, *graph.hw)
    return predictor


def _warm(predictor: Predictor, backend: str) -> None:
    """Compile for uint8 batches and run one; a precision the backend cannot run is a ``ConfigError``."""
    precision = predictor.spec.precision
    try:
        predictor.predict(np.zeros((1, *predictor.input_hw, 3), np.uint8))
    except Exception as exc:
        if precision == "float32":
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"--precision {precision} does not run on the {backend} backend here "
                          f"({type(exc).__name__}: {first})") from exc


class PredictorCache:
    """A small per-process LRU of warm predictors, keyed by the model spec."""

    def __init__(self, maxsize: int = 2, build: Any = None, settings: Settings | None = None,
                 on_build: Callable[[Predictor, float], None] | None = None) -> None:
        """``on_build(predictor, seconds)`` is told each model built (the worker's load-time metric)."""
        self.maxsize = max(1, maxsize)
        self.on_build = on_build
        if build is None:
            settings = settings or Settings.from_env()
            torch_compile, trusted = settings.torch_compile, settings.trusted_models
            build = lambda spec: build_predictor(spec, torch_compile=torch_compile, trusted=trusted)  # noqa: E731
        self._build = build
        self._items: OrderedDict[str, Predictor] = OrderedDict()
        self.builds = 0

    def get(self, spec: ModelSpec) -> Predictor:
        key = spec.cache_key() + _files_stamp(spec)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        start = time.perf_counter()
        predictor = self._build(spec)
        self.builds += 1
        if self.on_build is not None:
            self.on_build(predictor, time.perf_counter() - start)
        self._items[key] = predictor
        while len(self._items) > self.maxsize:
            evicted, _ = self._items.popitem(last=False)
            log.info("evicted model %s from the cache", evicted)
        return predictor


def _files_stamp(spec: ModelSpec) -> str:
    """Size and mtime of the files a spec loads, so a replaced model file is loaded again."""
    stamp = []
    for path in (spec.model_path, spec.weights, spec.labels):
        if path and os.path.exists(path):
            st = os.stat(path)
            stamp.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(stamp)
