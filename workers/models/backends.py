"""The Keras backend a worker runs on (``KERAS_BACKEND``: tensorflow, jax or torch) and how each compiles.

Keras 3 runs the same models on all three; each compiles the predictor's forward function its own way,
for one fixed, padded batch shape and input dtype:

- tensorflow: ``tf.function`` with an ``input_signature`` (one trace, no retracing per batch);
- jax: ``jax.jit`` of the model's ``stateless_call`` with its variables passed in as arguments (not
  folded into the program as constants, so compiling stays fast and memory is not held twice);
- torch: eager under ``torch.inference_mode()``, or ``torch.compile`` with ``BATCHINFER_TORCH_COMPILE=1``.

Only the chosen backend's framework is imported. On jax and torch, TensorFlow never is, not even by
Keras's own optional probing (``tensorflow_kept_out``): a GPU node with a JAX or PyTorch CUDA stack
needs no TensorFlow installed, and one that has it pays neither its start-up nor its memory.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from workers.errors import ConfigError
from workers.quiet import quiet_startup

log = logging.getLogger(__name__)

# backend -> (the module it needs, how to install it)
BACKENDS = {
    "tensorflow": ("tensorflow", "pip install tensorflow"),
    "jax": ("jax", "pip install 'keras-batch-inference[jax]'"),
    "torch": ("torch", "pip install 'keras-batch-inference[torch]'"),
}

Forward = Callable[[Callable[[Any], Any], Any], dict[str, Any]]  # (call the model, input batch) -> outputs


def keras_home() -> Path:
    """Keras's own folder: ``$KERAS_HOME``, default ``~/.keras`` (read when called, so tests can redirect it)."""
    return Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())


def keras_cache_dir() -> Path:
    """Where ``keras.utils.get_file`` keeps downloaded weights (``$KERAS_HOME/models``)."""
    return keras_home() / "models"


def requested() -> str:
    """The backend Keras will load, found as Keras finds it: ``KERAS_BACKEND``, else the ``backend`` of
    ``$KERAS_HOME/keras.json`` (default ``~/.keras``), else tensorflow. Once Keras is imported, its own."""
    import sys

    keras_backend = getattr(getattr(sys.modules.get("keras"), "backend", None), "backend", None)
    if callable(keras_backend):  # Keras is imported (fully): its backend is fixed
        return str(keras_backend())
    name = os.environ.get("KERAS_BACKEND")
    if not name:
        config = keras_home() / "keras.json"
        try:
            name = json.loads(config.read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    return name or "tensorflow"


def check() -> str:
    """The requested backend, if we run on it and its framework is installed (nothing is imported);
    otherwise a one-line ``ConfigError``."""
    name = requested()
    if name not in BACKENDS:
        raise ConfigError(f"KERAS_BACKEND={name} is not supported: use {', '.join(BACKENDS)}")
    module, hint = BACKENDS[name]
    try:
        found = importlib.util.find_spec(module)
    except ValueError:  # sys.modules[module] is None: marked as not importable
        found = None
    if found is None:
        raise ConfigError(f"KERAS_BACKEND={name} needs {module}, which is not installed: {hint}")
    return name


def install_hint() -> str:
    """How to install the requested backend's framework (TensorFlow's when the name is unknown)."""
    return BACKENDS.get(requested(), BACKENDS["tensorflow"])[1]


@lru_cache(maxsize=1)
def load() -> str:
    """Import the backend's framework (quietly) and Keras, once per process; return the backend's name.
    On a GPU each takes memory as it needs it (TensorFlow's memory growth, JAX without XLA's preallocation,
    PyTorch's caching allocator), so several workers, or a worker and ``--decode gpu``'s torchvision, share
    a card; ``XLA_PYTHON_CLIENT_PREALLOCATE=true`` in the environment restores XLA's default."""
    name = check()
    module = BACKENDS[name][0]
    if name == "tensorflow":
        tensorflow()
    else:
        if name == "jax":  # XLA's default takes 75 % of the card at start
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        with quiet_startup():  # jaxlib logs through absl before absl is initialised, as TensorFlow does
            importlib.import_module(module)
        tensorflow_kept_out()
    import keras

    return str(keras.backend.backend())


@lru_cache(maxsize=1)
def tensorflow() -> Any:
    """Import TensorFlow once, without its start-up chatter (``workers.quiet``); let several processes
    share a GPU by growing memory on demand."""
    with quiet_startup():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the device was already initialised by another model
            log.debug("memory growth already fixed for %s", gpu.name)
    return tf


def tensorflow_kept_out() -> None:
    """Keras imports TensorFlow whenever it is installed to recognise ``tf.TensorShape`` while it
    (de)serialises a model (``module_utils.tensorflow.available``), whatever the backend. On jax and torch
    no TensorFlow object can occur, so tell that probe TensorFlow is absent before Keras first asks."""
    from keras.src.utils import module_utils

    probe = getattr(module_utils, "tensorflow", None)
    if probe is not None and getattr(probe, "module", None) is None and hasattr(probe, "_available"):
        probe._available = False


def compile_forward(forward: Forward, model: Any, shape: tuple[int, ...], dtype: str,
                    torch_compile: bool = False) -> Callable[[Any], dict[str, Any]]:
    """``forward(call, x)`` compiled on the running backend for input batches of ``shape`` and ``dtype``."""
    import keras

    name = keras.backend.backend()
    if name == "tensorflow":
        tf = tensorflow()
        signature = [tf.TensorSpec(shape, dtype)]
        return tf.function(lambda x: forward(lambda y: model(y, training=False), x), input_signature=signature)
    if name == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]

        def pure(trainable: list[Any], fixed: list[Any], x: Any) -> dict[str, Any]:
            return forward(lambda y: model.stateless_call(trainable, fixed, y, training=False)[0], x)

        jitted = jax.jit(pure)
        return lambda x: jitted(trainable, fixed, x)
    if name == "torch":
        import torch

        def eager(x: Any) -> dict[str, Any]:
            return forward(lambda y: model(y, training=False), x)

        run = torch.compile(eager) if torch_compile else eager

        def call(x: Any) -> dict[str, Any]:
            x = keras.ops.convert_to_tensor(x)
            if x.dtype == torch.float32:  # preprocess_input divides in place: never the caller's (or numpy's) memory
                x = x.clone()
            with torch.inference_mode():
                return run(x)

        return call
    raise ConfigError(f"KERAS_BACKEND={name} is not supported: use {', '.join(BACKENDS)}")


def from_dlpack(x: Any) -> Any:
    """A tensor of the running backend from any object with ``__dlpack__`` (a CUDA tensor of another
    framework), on the same device and without a copy."""
    import keras

    name = keras.backend.backend()
    if name == "jax":
        import jax.dlpack

        return jax.dlpack.from_dlpack(x)
    if name == "torch":
        import torch

        return torch.from_dlpack(x)
    return tensorflow().experimental.dlpack.from_dlpack(x.__dlpack__())
