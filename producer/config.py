"""Command-line options -> validated, typed specs, before anything is enqueued or loaded.

Validation here needs no TensorFlow: architectures and their layer names come from the registry.
"""

from __future__ import annotations

import argparse
import os

from workers.contract import DECODES, POOLINGS, TASKS, ModelSpec
from workers.errors import ConfigError
from workers.models.registry import ARCHITECTURES, get_architecture, resolve_layer


def add_model_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model options")
    names = ", ".join(a.name for a in ARCHITECTURES.values())
    g.add_argument("--model", default="MobileNetV2", help=f"keras.applications architecture ({names})")
    g.add_argument("--weights", default="imagenet", help="imagenet | none | PATH to a weights file "
                   "(full model or no-top variant)")
    g.add_argument("--task", default="classify", choices=TASKS)
    g.add_argument("--top-k", type=int, default=5, help="classes per image for classify (default 5)")
    g.add_argument("--pooling", default="avg", choices=POOLINGS, help="pooling of 4-D feature maps")
    g.add_argument("--layer", help="layer whose output is the feature vector (see the model's layer names)")
    g.add_argument("--input-size", type=int, help="square input size (default: the model's own)")
    g.add_argument("--decode", default="fast", choices=DECODES,
                   help="fast: DCT downscale + EXIF + antialiased resize; keras: exactly keras.utils.load_img")
    g.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")


def model_spec_from_args(args: argparse.Namespace, weights_must_exist: bool = True) -> ModelSpec:
    """Build and validate the model spec; raises ``ConfigError`` with a one-line message."""
    arch = get_architecture(args.model)
    if args.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if args.input_size is not None and args.input_size < arch.min_size:
        raise ConfigError(f"--input-size {args.input_size} is below {arch.name}'s minimum of {arch.min_size}")
    if args.layer:
        if args.task != "features":
            raise ConfigError("--layer applies to --task features")
        resolve_layer(arch, args.layer)
    weights = args.weights
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    else:
        weights = os.path.abspath(os.path.expanduser(weights))
        if weights_must_exist and not os.path.isfile(weights):
            raise ConfigError(f"--weights {args.weights}: no such file (use imagenet, none or a weights file)")
    return ModelSpec(
        name=arch.name, weights=weights, task=args.task, top_k=args.top_k, pooling=args.pooling,
        layer=args.layer, input_size=args.input_size, decode=args.decode, batch_size=args.batch_size,
    )
