"""The 2-D view of a features job: PCA of the sampled vectors (numpy SVD) and which points get a thumbnail."""

from __future__ import annotations

import numpy as np


def pca(vectors: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """The vectors on their first two principal components, and the share of variance each explains."""
    x = vectors.astype(np.float64)
    x = x - x.mean(axis=0)
    if len(x) < 2 or not np.any(x):
        return np.zeros((len(x), 2)), (0.0, 0.0)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:2]
    if len(components) < 2:  # one dimension only
        components = np.vstack([components, np.zeros_like(components)])
    points = x @ components.T
    for k in range(2):  # a sign convention, so the same data always gives the same picture
        if points[:, k].sum() < 0:
            points[:, k] = -points[:, k]
    variance = singular**2
    share = variance / variance.sum() if variance.sum() > 0 else np.zeros_like(variance)
    explained = (float(share[0]), float(share[1]) if len(share) > 1 else 0.0)
    return points, explained


def spread(points: np.ndarray, count: int, columns: int = 8) -> np.ndarray:
    """Up to ``count`` indices of points spread over the plane: the plane is cut into a grid of cells and
    the point nearest each cell's centre is taken (cells without points are skipped), so thumbnails
    placed on them overlap little."""
    if not len(points) or count <= 0:
        return np.empty(0, dtype=np.int64)
    rows = max(1, count // columns)
    low, high = points.min(axis=0), points.max(axis=0)
    size = np.where(high > low, high - low, 1.0)
    cell = np.floor((points - low) / size * [columns, rows]).clip(0, [columns - 1, rows - 1]).astype(np.int64)
    centres = low + (cell + 0.5) / [columns, rows] * size
    distance = np.linalg.norm((points - centres) / size, axis=1)
    flat = cell[:, 0] * rows + cell[:, 1]
    order = np.lexsort((distance, flat))
    first = order[np.r_[True, flat[order][1:] != flat[order][:-1]]]
    return np.sort(first)[:count]
