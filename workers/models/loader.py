"""Build a warm, compiled predictor from a ``ModelSpec`` (imports Keras and its backend; worker side only).

The predictor (``workers.models.predictor``) runs the model through one function compiled for a fixed
batch shape (``workers.models.backends``: tf.function, jax.jit or torch); the last batch is padded.
``model.predict`` per batch would retrace and leak memory in a long-lived worker. ``--precision``
builds the model under Keras's mixed precision policy. Each process keeps the most recently used
predictors in a small LRU, so a worker loads a model once and reuses it for every later shard.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from workers.confine import Roots
from workers.contract import ModelSpec, file_fingerprint
from workers.errors import ConfigError
from workers.models import backends
from workers.models.backends import keras_cache_dir
from workers.models.custom import load_custom, read_labels
from workers.models.predictor import Predictor, make_forward
from workers.models.preprocess import preprocess_family, preprocess_function
from workers.models.registry import Architecture, get_architecture, layer_names, resolve_layer
from workers.settings import Settings

log = logging.getLogger(__name__)
RANDOM_SEED = 0


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with the package so no download is needed."""
    text = resources.files("workers.models").joinpath("imagenet_class_index.json").read_text()
    index = json.loads(text)
    return [index[str(i)][1] for i in range(len(index))]


@contextlib.contextmanager
def dtype_policy(precision: str) -> Iterator[None]:
    """Layers built in the block compute in ``precision`` (Keras's ``mixed_float16``/``mixed_bfloat16``:
    variables stay float32); the global policy is restored afterwards, so later models are not affected."""
    import keras

    if precision == "float32":
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(f"mixed_{precision}")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _imagenet_error(arch: Architecture, exc: Exception) -> ConfigError:
    url = re.search(r"https?://\S+?\.h5", str(exc))
    fname = url.group(0).rsplit("/", 1)[-1] if url else "the weights file"
    where = f" from {url.group(0)}" if url else ""
    return ConfigError(
        f"cannot download ImageNet weights for {arch.name}{where}: place {fname} in "
        f"{keras_cache_dir()}/ or pass --weights PATH"
    )


def _build(arch: Architecture, include_top: bool, hw: tuple[int, int], weights: str | None,
           logits: bool = False) -> Any:
    """``logits``: the classifier without its softmax (the predictor applies it in float32)."""
    ctor = getattr(importlib.import_module(arch.constructor_module), arch.constructor)
    extra = {"classifier_activation": None} if logits and include_top else {}
    return ctor(weights=weights, include_top=include_top, input_shape=(hw[0], hw[1], 3), **extra)


def _copy_prefix(src: Any, dst: Any) -> None:
    """Copy a full model's weights into its no-top variant.

    By position while the layers match (a no-top model is usually a prefix of the full one); a
    no-top layer past that point (ConvNeXt's final layer norm) takes the weights of the first unused
    full-model layer of the same class and weight shapes (its ``head_layernorm``).
    """
    def shapes(layer: Any) -> list[tuple[int, ...]]:
        return [tuple(w.shape) for w in layer.weights]

    n = 0
    for a, b in zip(src.layers, dst.layers):
        if type(a) is not type(b) or shapes(a) != shapes(b):
            break
        b.set_weights(a.get_weights())
        n += 1
    unused = list(src.layers[n:])
    for b in dst.layers[n:]:
        if not b.weights:
            continue
        match = next((a for a in unused if type(a) is type(b) and shapes(a) == shapes(b)), None)
        if match is None:
            raise ConfigError(f"cannot map the full model's weights onto no-top layer {b.name!r}")
        b.set_weights(match.get_weights())
        unused.remove(match)


def _weights_error(path: Path, arch: Architecture, include_top: bool, exc: Exception) -> ConfigError:
    """One line: which architecture the file belongs to when that can be told, else Keras's first line."""
    from workers.models.weights_file import mismatch

    said = mismatch(str(path), arch.name, include_top)
    if said:
        return ConfigError(said)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    what = "with the classifier" if include_top else "with or without the classifier"
    return ConfigError(f"{path} does not hold {arch.name} weights {what} ({first})")


def _logits(spec: ModelSpec) -> bool:
    """In mixed precision a registry classifier ends in logits and the predictor's softmax runs in float32
    (a float16 softmax over 1000 classes loses digits); not when layers are asked for by name, which may
    include the classifier's own output."""
    return spec.precision != "float32" and not spec.layers


def load_model(spec: ModelSpec, arch: Architecture, hw: tuple[int, int], include_top: bool) -> tuple[Any, str]:
    """The Keras model for ``spec`` with its weights, and a fingerprint of those weights. In mixed precision
    the classifier ends in logits, so the softmax runs in float32 (``_Graph.softmax``)."""
    import keras

    logits = _logits(spec)
    weights = spec.weights
    if weights == "none":
        keras.utils.set_random_seed(RANDOM_SEED)  # every worker builds the same random model
        return _build(arch, include_top, hw, None, logits), f"random:seed={RANDOM_SEED}"
    if weights == "imagenet":
        try:
            model = _build(arch, include_top, hw, "imagenet", logits)
        except ValueError as exc:
            raise ConfigError(f"{arch.name} with ImageNet weights: {exc}") from exc
        except Exception as exc:  # get_file wraps network failures in a plain Exception
            raise _imagenet_error(arch, exc) from exc
        own = getattr(importlib.import_module(arch.constructor_module), "imagenet_fingerprint", None)
        return model, own() if own else f"imagenet:keras-{keras.__version__}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file not found: {weights}")
    from workers.models.weights_file import mismatch

    said = mismatch(str(path), arch.name, include_top)  # another architecture's file: say so, before Keras tries
    if said:
        raise ConfigError(said)
    fingerprint = file_fingerprint(str(path))
    full = _build(arch, True, hw if include_top else (arch.default_size, arch.default_size), None, logits)
    try:
        with warnings.catch_warnings():  # a no-top file warns about the missing head before it raises
            warnings.simplefilter("ignore", UserWarning)
            full.load_weights(str(path))
    except Exception as full_exc:  # not the full model's weights: try the no-top variant
        if include_top:
            raise _weights_error(path, arch, include_top, full_exc) from full_exc
        notop = _build(arch, False, hw, None)
        try:
            with warnings.catch_warnings():  # one warning per layer it skips before it raises
                warnings.simplefilter("ignore", UserWarning)
                notop.load_weights(str(path))
        except Exception as exc:
            raise _weights_error(path, arch, include_top, exc) from exc
        return notop, fingerprint
    if include_top:
        return full, fingerprint
    notop = _build(arch, False, hw, None)
    _copy_prefix(full, notop)
    return notop, fingerprint


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
                  labels, softmax=_logits(spec), preprocess_name=preprocess_family(spec.preprocess, arch.name))


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
