"""``batchinfer train-head``: the Keras transfer-learning recipe, on a features job's output.

Takes pooled features (Parquet from ``collect`` or ``run --task features``) and labels (the parent
folder's name, as ``image_dataset_from_directory`` infers them, or a CSV of ``uri,label``), trains a
small classifier head (logistic regression or one hidden Dense layer) on the features, and saves a
complete model, base + pooling + head, as ``.keras`` with a ``.json`` sidecar (labels, preprocessing,
input size) so ``--model-path`` runs it with its own class names. The Keras side lives in
``workers.models.head`` and is imported only when training starts.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from workers.errors import ConfigError, SourceError
from workers.schema import read_job_metadata


def load_labels(uris: list[str], labels_from: str) -> list[str | None]:
    """One label per URI: its parent folder's name, or the CSV's ``label`` for that ``uri``."""
    if labels_from == "folder":
        return [os.path.basename(os.path.dirname(u.rstrip("/"))) or None for u in uris]
    if not os.path.isfile(labels_from):
        raise SourceError(f"--labels-from {labels_from}: use 'folder' or a CSV file with uri,label columns")
    with open(labels_from, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not {"uri", "label"} <= set(reader.fieldnames or []):
            raise SourceError(f"{labels_from}: needs 'uri' and 'label' columns")
        table = {row["uri"].strip(): row["label"].strip() for row in reader}
    return [table.get(u) or None for u in uris]


def read_features(path: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """URIs and feature vectors of the successful rows, and the job metadata."""
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read features: {exc}") from exc
    meta = read_job_metadata(table.schema)
    if "features" not in table.column_names or not meta:
        raise ConfigError(f"{path} is not the output of a features job (needs a 'features' column and metadata)")
    if meta.get("model_path") or str(meta.get("model", "")).startswith("custom:"):
        raise ConfigError("train-head needs features from a registry model (--model NAME)")
    ok = table.filter(table.column("error").is_null())
    feats = np.asarray(ok.column("features").to_pylist(), dtype=np.float32)
    return ok.column("uri").to_pylist(), feats, meta


def train_head(features: str, output: str, labels_from: str = "folder", head: str = "logistic",
               epochs: int = 300, holdout: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Train and save; return a report (classes, counts, accuracies)."""
    if not output.endswith(".keras"):
        raise ConfigError("--output must end in .keras")
    if not 0 <= holdout < 1:
        raise ConfigError("--holdout must be in [0, 1)")
    uris, x, meta = read_features(features)
    labels = load_labels(uris, labels_from)
    named = {i: label for i, label in enumerate(labels) if label}
    keep = list(named)
    classes = sorted(set(named.values()))
    if len(classes) < 2:
        raise ConfigError(f"need at least two classes, found {classes or 'none'}")
    x = x[keep]
    y = np.array([classes.index(named[i]) for i in keep])
    order = np.random.default_rng(seed).permutation(len(y))
    n_hold = int(round(len(y) * holdout))
    hold, train = order[:n_hold], order[n_hold:]
    from workers.models import backends

    backends.load()  # the backend imported quietly, before Keras imports it
    from workers.models.head import complete_model, fit_head  # Keras: only when training

    model = fit_head(x[train], y[train], len(classes), head, epochs, seed)
    report = {"classes": classes, "train_images": len(train), "holdout_images": n_hold,
              "skipped_unlabelled": len(uris) - len(keep),
              "train_accuracy": float((model.predict(x[train], verbose=0).argmax(1) == y[train]).mean())}
    if n_hold:
        report["holdout_accuracy"] = float((model.predict(x[hold], verbose=0).argmax(1) == y[hold]).mean())
    full = complete_model(meta, model)
    full.save(output)
    sidecar = {"labels": classes, "preprocess": meta.get("preprocess") or meta["model"],
               "input_shape": meta["input_size"], "base": meta["model"], "base_weights": meta.get("weights"),
               "trained_on": os.path.abspath(features)}
    with open(output + ".json", "w", encoding="utf-8") as fh:
        json.dump(sidecar, fh, indent=1)
    print(json.dumps(report), file=sys.stderr)
    return report
