"""Command-line options -> validated, typed specs, before anything is enqueued or loaded.

Validation here needs no TensorFlow: architectures and their layer names come from the registry.
"""

from __future__ import annotations

import argparse
import os

from workers.contract import DECODES, POOLINGS, PRECISIONS, PREPROCESS_FAMILIES, TASKS, ModelSpec
from workers.errors import ConfigError
from workers.models.registry import ARCHITECTURES, Architecture, get_architecture, layer_name, resolve_layer

DEFAULT_MODEL = "MobileNetV2"
DEFAULT_TOP_K = 5
CLASSIFIER_CLASSES = 1000  # every architecture's own classifier: ImageNet's classes


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model options")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"keras.applications architecture, case-insensitive (default {DEFAULT_MODEL}; see "
                   "`batchinfer models`)")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a weights file "
                   "(full model or no-top variant)")
    g.add_argument("--task", default="classify", choices=TASKS, metavar="|".join(TASKS[:2]) + "|" + TASKS[2],
                   help="classify (default), features, or classify,features (both from one forward pass)")
    g.add_argument("--top-k", type=int, help="classes per image for classify (default 5)")
    g.add_argument("--pooling", choices=POOLINGS,
                   help="pooling of 4-D feature maps for features: avg (default), max, or none (keeps the map, "
                   "flattened)")
    g.add_argument("--layer", action="append", default=[], metavar="NAME",
                   help="feature layer (repeatable: one column each); see `batchinfer layers MODEL`")
    g.add_argument("--input-size", type=int, metavar="N", help="square input size (default: the model's own)")
    g.add_argument("--input-shape", type=int, nargs=2, metavar=("H", "W"), help="non-square input size")
    g.add_argument("--model-path", metavar="FILE", help="your own model: .keras, .h5 or a SavedModel folder")
    g.add_argument("--labels", metavar="FILE", help="class names, one per line (for --model-path models)")
    g.add_argument("--preprocess", metavar="NAME",
                   help="caffe | tf | torch | none | an architecture name (default: the model's own; none "
                        "for --model-path unless its .json sidecar says otherwise)")
    g.add_argument("--decode", default="fast", choices=DECODES,
                   help="fast: DCT downscale + EXIF + antialiased resize; keras: exactly keras.utils.load_img; "
                   "gpu: nvJPEG on a CUDA GPU (needs torch and torchvision), other files as fast")
    g.add_argument("--precision", default="float32", choices=PRECISIONS, metavar="|".join(PRECISIONS),
                   help="compute dtype: float32 (default), or float16/bfloat16 as Keras mixed precision (float32 "
                   "weights and outputs; faster on GPUs with tensor cores; see the README for top-1 agreement)")
    g.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")


def model_spec_from_args(args: argparse.Namespace, files_must_exist: bool = True) -> ModelSpec:
    """Build and validate the model spec; raises ``ConfigError`` with a one-line message."""
    tasks = args.task.split(",")
    if args.top_k is not None and "classify" not in tasks:
        raise ConfigError("--top-k applies to --task classify")
    if args.pooling is not None and "features" not in tasks:
        raise ConfigError("--pooling applies to --task features")
    top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    if top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.input_size is not None and args.input_shape is not None:
        raise ConfigError("give --input-size or --input-shape, not both")
    shape = tuple(args.input_shape) if args.input_shape else (
        (args.input_size, args.input_size) if args.input_size is not None else None)
    if args.layer and "features" not in tasks:
        raise ConfigError("--layer applies to --task features")
    layers = list(args.layer)
    if args.preprocess:
        if args.preprocess.lower() not in (*PREPROCESS_FAMILIES, *ARCHITECTURES):
            raise ConfigError(f"unknown --preprocess {args.preprocess!r}: use {', '.join(PREPROCESS_FAMILIES)} "
                              "or an architecture name")
    paths = {"--model-path": args.model_path, "--labels": args.labels}
    if args.model_path:
        name, weights = "custom", "none"
        if shape is not None and min(shape) < 1:
            raise ConfigError("--input-size must be positive")
    else:
        arch = get_architecture(args.model)
        name = arch.name
        if shape is not None and min(shape) < arch.min_size:
            given = f"--input-size {args.input_size}" if args.input_size else f"--input-shape {shape[0]} {shape[1]}"
            raise ConfigError(f"{given} is below {arch.name}'s minimum of {arch.min_size}")
        if top_k > CLASSIFIER_CLASSES:
            raise ConfigError(f"--top-k {top_k} is more than the {CLASSIFIER_CLASSES} classes of {arch.name}'s "
                              "classifier")
        layers = [layer_name(arch, layer) for layer in layers]
        weights = args.weights
        if weights.lower() in ("imagenet", "none"):
            weights = weights.lower()
        else:
            paths["--weights"] = weights
            weights = os.path.abspath(os.path.expanduser(weights))
            _check_weights_file(weights, arch, "classify" in tasks or any(resolve_layer(arch, x)[1] for x in layers))
    if len(set(layers)) != len(layers):
        raise ConfigError("each --layer may be given once")
    resolved = {flag: os.path.abspath(os.path.expanduser(p)) for flag, p in paths.items() if p}
    if files_must_exist:
        for flag, path in resolved.items():
            if not os.path.exists(path):
                raise ConfigError(f"{flag} {path}: no such file")
    return ModelSpec(
        name=name, weights=resolved.get("--weights", weights), task=args.task, top_k=top_k,
        pooling=args.pooling or "avg", layers=tuple(layers), input_shape=shape, decode=args.decode,
        batch_size=args.batch_size, model_path=resolved.get("--model-path"), labels=resolved.get("--labels"),
        preprocess=args.preprocess, precision=args.precision,
    )


def _check_weights_file(path: str, arch: Architecture, include_top: bool) -> None:
    """A weights file of another architecture (or without the classifier a classify job needs) fails here,
    before any work, with the architecture it belongs to."""
    from workers.models.weights_file import is_weights_file, mismatch

    if not os.path.isfile(path):
        return  # missing: reported with the other files
    if not is_weights_file(path):
        raise ConfigError(f"{path} is not a weights file (.weights.h5, .h5 or .keras; .pth for EfficientNetLite0)")
    said = mismatch(path, arch.name, include_top)
    if said:
        raise ConfigError(said)


def check_runnable_here(spec: ModelSpec) -> None:
    """What ``run`` (which does the work on this machine) needs of it beyond the spec: ``--decode gpu``
    needs torch, torchvision and a CUDA GPU. ``submit`` leaves that to the workers, which check it per shard."""
    if spec.decode == "gpu":
        from workers.decode_gpu import check_available

        check_available()


def missing_files(spec: ModelSpec) -> list[str]:
    """Files the spec names that are not on this machine (workers may still have them)."""
    return [p for p in (spec.weights, spec.model_path, spec.labels)
            if p and p not in ("imagenet", "none") and not os.path.exists(p)]
