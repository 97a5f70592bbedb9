"""Small models of your own, saved the three ways users save them: .keras, legacy .h5, SavedModel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = ["reddish", "greenish", "bluish"]


def relu6(x):
    """A custom activation, as old Keras MobileNet files needed (`custom_objects={'relu6': relu6}`)."""
    import keras

    return keras.activations.relu(x, max_value=6.0)


def build(seed: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((48, 48, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.Activation(relu6, name="act")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs)
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 20, bias])  # spread the softmax so a wrong input shows
    return model


def save_all(folder: Path) -> dict[str, Path]:
    """Save one model as .keras, .h5 (with a custom activation) and a SavedModel folder, plus labels."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build()
    paths = {"keras": folder / "model.keras", "h5": folder / "model.h5", "savedmodel": folder / "saved"}
    model.save(paths["keras"])
    model.save(paths["h5"])
    model.export(str(paths["savedmodel"]), verbose=False)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    paths["labels"] = folder / "labels.txt"
    return paths


def reference(model, images: list[Path]) -> np.ndarray:
    from keras.utils import img_to_array, load_img

    x = np.stack([img_to_array(load_img(str(p), target_size=(48, 48))) for p in images])
    return model.predict(x, verbose=0)
