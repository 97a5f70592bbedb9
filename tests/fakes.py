"""A fake predictor: what ``process_shard`` asks of one, for sub-second pipeline tests."""

from __future__ import annotations

import numpy as np

SIZE = (16, 16)


class FakePredictor:
    """Classifies every image as ``labels[0]``; ``on_predict(n)`` sees each batch's size."""

    model_name, fingerprint, preprocess_name = "fake", "fake", "none"
    input_hw, feature_columns, feature_shapes, labels, top_k = SIZE, {}, {}, ["a", "b"], 1

    def __init__(self, on_predict=None) -> None:
        self.on_predict = on_predict

    def preprocess(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)

    def predict(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.on_predict is not None:
            self.on_predict(len(x))
        n = len(x)
        return {"top_k_indices": np.zeros((n, 1), np.int32), "top_k_scores": np.ones((n, 1), np.float32)}


class FakeCache:
    """Stands in for ``PredictorCache``: every spec gets one ``FakePredictor``."""

    def __init__(self, maxsize: int = 1) -> None:
        self.predictor = FakePredictor()

    def get(self, spec) -> FakePredictor:
        return self.predictor
