"""Your own models: ``.keras`` files, legacy ``.h5`` files and TensorFlow SavedModel folders (TensorFlow only).

A model file may have a sidecar ``<file>.json`` (``train-head`` writes one) with ``labels``,
``preprocess`` and ``input_shape``; flags given with the job win over it. Models load with the custom
objects older Keras applications needed (``relu6``, ``DepthwiseConv2D``), as in the Keras
documentation's MobileNet example, plus any the operator registers with ``BATCHINFER_CUSTOM_OBJECTS``.

A model file that runs its own code loads only from where the workers trust it
(``BATCHINFER_TRUST_MODELS``, ``workers.confine``): a SavedModel runs its own graph (any TensorFlow op,
``tf.io.write_file`` included), so an untrusted one is refused before TensorFlow opens it; ``.keras`` and
``.h5`` files load with Keras' ``safe_mode`` (from Keras 3.13.2 it covers both: Lambda layers' Python code,
TFSMLayers and functions outside Keras are refused; with an older Keras they are refused untrusted),
trusted ones without it.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any

from workers.confine import HOW_TO_TRUST, NOWHERE, Roots
from workers.contract import ModelSpec, file_fingerprint
from workers.errors import ConfigError

# The first Keras whose safe_mode covers legacy .h5 files (CVE-2025-9905, fixed in 3.11.3) and TFSMLayers in a
# .keras file (CVE-2026-1462, fixed in 3.13.2); before it, safe_mode cannot stand in for trust.
SAFE_MODE_KERAS = (3, 13, 2)


def _keras_version(text: str) -> tuple[int, ...]:
    """The leading numbers of a version: ``3.15.1`` -> (3, 15, 1), ``3.13.2rc1`` -> (3, 13, 2)."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
        if digits != piece:
            break
    return tuple(parts)


@dataclass
class LoadedModel:
    model: Any
    fingerprint: str
    input_hw: tuple[int, int]
    sidecar: dict[str, Any]
    savedmodel: bool


def sidecar_path(path: str) -> str:
    return path.rstrip("/") + ".json"


def read_sidecar(path: str) -> dict[str, Any]:
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return {}
    with open(side, encoding="utf-8") as fh:
        return json.load(fh)


def folder_fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, folder).encode() + b"\0")
            digest.update(file_fingerprint(full).encode())
    return "sha256:" + digest.hexdigest()


def custom_objects() -> dict[str, Any]:
    """Keras-2-era names plus the operator's own: ``BATCHINFER_CUSTOM_OBJECTS=module:attribute`` names a
    dict importable on the worker. It comes from the worker's environment, never from a task message,
    so whoever can enqueue a job cannot choose code to import."""
    import keras

    objects = {"relu6": keras.activations.relu6, "DepthwiseConv2D": keras.layers.DepthwiseConv2D}
    target = os.environ.get("BATCHINFER_CUSTOM_OBJECTS")
    if target:
        module, _, attr = target.partition(":")
        try:
            objects.update(getattr(importlib.import_module(module), attr or "CUSTOM_OBJECTS"))
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"BATCHINFER_CUSTOM_OBJECTS={target}: {exc}") from exc
    return objects


def read_labels(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"labels file not found: {path}")
    with open(path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh if line.strip()]


def load_custom(spec: ModelSpec, trusted: Roots = NOWHERE) -> LoadedModel:
    """Load ``spec.model_path`` and work out its input size (flags, then the model, then the sidecar);
    ``trusted`` (``Settings.trusted_models``) are the model files that may run their own code."""
    import keras

    path = spec.model_path or ""
    if not os.path.exists(path):
        raise ConfigError(f"model file not found: {path}")
    sidecar = read_sidecar(path)
    hw = spec.input_shape or (tuple(sidecar["input_shape"]) if sidecar.get("input_shape") else None)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "saved_model.pb")):
            raise ConfigError(f"{path} is a folder but not a TensorFlow SavedModel (no saved_model.pb)")
        backend = keras.backend.backend()
        if backend != "tensorflow":
            raise ConfigError(f"{path} is a TensorFlow SavedModel, which runs only with KERAS_BACKEND=tensorflow "
                              f"(this is {backend}); save the model as .keras to run it on {backend}")
        if not trusted.contains(path):
            raise ConfigError(f"{path} is a TensorFlow SavedModel, refused: it runs its own graph (any TensorFlow "
                              f"op, writing files included); save the model as .keras, or {HOW_TO_TRUST}")
        hw = hw or _savedmodel_hw(path)
        if hw is None:
            raise ConfigError(f"{path}: the SavedModel has no fixed input size; pass --input-size")
        if spec.precision != "float32":
            raise ConfigError(f"--precision {spec.precision} needs a .keras or .h5 model (a SavedModel runs as saved)")
        layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
        inputs = keras.Input((*hw, 3))
        out = layer(inputs)
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return LoadedModel(keras.Model(inputs, out), folder_fingerprint(path), hw, sidecar, True)
    safe = not trusted.contains(path)
    if safe and _keras_version(keras.__version__) < SAFE_MODE_KERAS:
        raise ConfigError(f"cannot load model {path}: the safe_mode of Keras {keras.__version__} lets some model "
                          f"files run code (legacy .h5 files, TFSMLayers); upgrade to Keras "
                          f"{'.'.join(map(str, SAFE_MODE_KERAS))} or later, or {HOW_TO_TRUST}")
    try:
        model = keras.models.load_model(path, compile=False, custom_objects=custom_objects(), safe_mode=safe)
    except Exception as exc:  # Keras raises many kinds for a file it cannot read
        refused = _refused_code(str(exc)) if safe else None
        if refused:
            raise ConfigError(f"cannot load model {path}: it holds {refused}, which Keras' safe_mode does not run; "
                              f"{HOW_TO_TRUST}") from exc
        raise ConfigError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    shape = model.input_shape
    native = tuple(shape[1:3]) if shape and None not in shape[1:3] else None
    hw = hw or native
    if hw is None:
        raise ConfigError(f"{path}: the model has no fixed input size; pass --input-size")
    if native and tuple(hw) != native:
        model = _rebuild_at(model, hw)
    if spec.precision != "float32":
        model = _at_precision(model, spec.precision)
    return LoadedModel(model, file_fingerprint(path), (int(hw[0]), int(hw[1])), sidecar, False)


def _refused_code(message: str) -> str | None:
    """What safe_mode refused, from Keras's error (which tells a Python user to pass ``safe_mode=False``)."""
    if "safe_mode" not in message:
        return None
    if "TFSMLayer" in message:
        return "a TFSMLayer (a SavedModel's graph)"
    if "Lambda" in message:
        return "a Lambda layer (Python code)"
    if "lambda" in message:
        return "a Python lambda (code)"
    return "code (" + message.split(". ")[0][:200] + ")"


def _rebuild_at(model: Any, hw: tuple[int, int]) -> Any:
    """The same layers and weights at another input size (only for models without size-bound layers)."""
    import keras

    config = model.get_config()
    config["layers"][0]["config"]["batch_shape"] = [None, *hw, 3]
    try:
        clone = model.__class__.from_config(config, custom_objects=custom_objects())
        clone.set_weights(model.get_weights())
    except Exception as exc:  # e.g. a Flatten -> Dense head fixed to the trained size
        raise ConfigError(f"the model cannot run at {hw[0]}x{hw[1]}: {exc}") from exc
    return clone if isinstance(clone, keras.Model) else model


def _at_precision(model: Any, precision: str) -> Any:
    """The same layers and weights computing in ``precision`` (a saved model's layers keep the dtype policy
    they were saved with, so the global policy set around loading does not reach them)."""
    import keras

    policy = f"mixed_{precision}"

    def clone(layer: Any) -> Any:
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    try:
        mixed = keras.models.clone_model(model, clone_function=clone)
        mixed.set_weights(model.get_weights())
    except Exception as exc:  # a layer whose config cannot be rebuilt with another dtype
        raise ConfigError(f"--precision {precision}: cannot rebuild the model in {precision} ({exc})") from exc
    return mixed


def _savedmodel_hw(path: str) -> tuple[int, int] | None:
    import tensorflow as tf

    sig = tf.saved_model.load(path).signatures["serving_default"]
    spec = next(iter(sig.structured_input_signature[1].values()))
    dims = spec.shape.as_list()
    return (dims[1], dims[2]) if len(dims) == 4 and dims[1] and dims[2] else None
