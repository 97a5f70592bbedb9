"""A registry architecture built with its weights (imports Keras; worker side only).

``--weights none`` builds the same seeded random model in every worker; ``imagenet`` downloads through
Keras (offline: one line naming the file to place in Keras's cache); a local file may hold the full model
or its no-top variant, and another architecture's file is named as such before Keras tries it.
``--precision`` builds the model under Keras's mixed precision policy.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.contract import ModelSpec, file_fingerprint
from workers.errors import ConfigError
from workers.models.backends import keras_cache_dir
from workers.models.registry import Architecture

RANDOM_SEED = 0


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


def ends_in_logits(spec: ModelSpec) -> bool:
    """In mixed precision a registry classifier ends in logits and the predictor's softmax runs in float32
    (a float16 softmax over 1000 classes loses digits); not when layers are asked for by name, which may
    include the classifier's own output."""
    return spec.precision != "float32" and not spec.layers


def load_model(spec: ModelSpec, arch: Architecture, hw: tuple[int, int], include_top: bool) -> tuple[Any, str]:
    """The Keras model for ``spec`` with its weights, and a fingerprint of those weights. In mixed precision
    the classifier ends in logits, so the softmax runs in float32 (``workers.models.loader``'s ``_Graph.softmax``)."""
    import keras

    logits = ends_in_logits(spec)
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
