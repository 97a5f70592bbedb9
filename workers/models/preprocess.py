"""Input preprocessing by name: an architecture's own ``preprocess_input`` or a named family (run on the device)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

import numpy as np

from workers.contract import PREPROCESS_FAMILIES
from workers.errors import ConfigError
from workers.models.registry import ARCHITECTURES, get_architecture

Preprocess = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def preprocess_family(name: str | None, default_arch: str | None = None) -> str:
    """What ``preprocess_function(name, default_arch)`` does, as the family name (caffe, tf, torch or
    none) for the output's metadata: an architecture's ``preprocess_input`` is its family's."""
    name = name or default_arch
    if name is None or name.lower() == "none":
        return "none"
    if name.lower() in PREPROCESS_FAMILIES:
        return name.lower()
    return get_architecture(name).preprocess


def preprocess_function(name: str | None, default_arch: str | None = None) -> Preprocess:
    """``name`` is a family (caffe, tf, torch, none) or an architecture name; ``None`` means
    ``default_arch``'s own, or no preprocessing when there is no architecture (your own model)."""
    if name is None:
        if default_arch is None:
            return _identity
        name = default_arch
    if name.lower() == "none":
        return _identity
    if name.lower() in PREPROCESS_FAMILIES:
        from keras.applications import imagenet_utils

        return partial(imagenet_utils.preprocess_input, mode=name.lower())
    if name.lower() not in ARCHITECTURES:
        families = ", ".join(PREPROCESS_FAMILIES)
        raise ConfigError(f"unknown preprocessing {name!r}: use {families} or an architecture name")
    arch = get_architecture(name)
    return importlib.import_module(arch.module).preprocess_input
