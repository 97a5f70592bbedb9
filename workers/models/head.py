"""Training a classifier head on pooled features and joining it to its base (TensorFlow side of train-head)."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from workers.contract import ModelSpec
from workers.models.loader import _registry_graph


def fit_head(x: np.ndarray, y: np.ndarray, classes: int, head: str, epochs: int, seed: int) -> Any:
    """A normalisation layer (statistics of ``x``) and a softmax classifier, trained full-batch."""
    keras.utils.set_random_seed(seed)
    norm = keras.layers.Normalization(name="head_normalization")
    norm.adapt(x)
    layers = [keras.Input((x.shape[1],)), norm]
    if head == "dense":
        layers += [keras.layers.Dense(256, activation="relu", name="head_hidden"), keras.layers.Dropout(0.2)]
    layers.append(keras.layers.Dense(classes, activation="softmax", name="head_predictions"))
    model = keras.Sequential(layers, name="head")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=min(len(x), 256), verbose=0)
    return model


def complete_model(meta: dict[str, Any], head: Any) -> Any:
    """Base model as the features job built it, its pooling, then the trained head."""

    spec = ModelSpec(name=meta["model"], weights=meta.get("weights") or "none", task="features",
                     layers=tuple(meta.get("layers") or ()), input_shape=tuple(meta["input_size"]),
                     pooling=meta.get("pooling") or "avg", preprocess=meta.get("preprocess"))
    graph = _registry_graph(spec)
    x = graph.feature_targets[0]
    if len(x.shape) == 4:
        pool = keras.layers.GlobalMaxPooling2D if spec.pooling == "max" else keras.layers.GlobalAveragePooling2D
        x = pool(name="head_pool")(x) if spec.pooling != "none" else keras.layers.Flatten(name="head_flatten")(x)
    for layer in head.layers:
        x = layer(x)
    return keras.Model(graph.model.inputs, x, name=f"{graph.name}_head")
