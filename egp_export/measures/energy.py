"""Energy statistics of features (Soltani, Wu, Li, Ding, Tarokh; suuyawu/PED-Model-Compression).

The statistics themselves are ``dcor``'s (Euclidean distances, exponent 1):

    energy distance  E(X, Y) = 2 E||x - y|| - E||x - x'|| - E||y - y'||     V-statistic: the diagonal is included
    distance correlation  dCor(X, Y)                                         (Szekely, Rizzo, Bakirov 2007)

A unit's score (``class_energy_score``) follows the reference's
``mcfd/infometrics/Energydist.py: cal_info``: the largest class (the first
such in label order on a tie) is the reference class, and the score is the
largest energy distance between its features and those of any other
observed class. Fewer than two observed classes give no score (None).

Both statistics need every pairwise distance: memory is O(n^2) in the number
of samples, so the callers bound n (``MAX_SAMPLES``).
"""

from __future__ import annotations

import dcor
import numpy as np
import torch

# dcor's pairwise matrices are n x n float64: 2,048 samples are 32 MiB each.
MAX_SAMPLES = 2048


def _matrix(values, what: str) -> np.ndarray:
    """``values`` as an (n, features) float64 array: a 1-D input is n samples of one feature."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim > 2:
        array = array.reshape(array.shape[0], -1)
    if array.shape[0] == 0:
        raise ValueError(f"{what} has no samples")
    if array.shape[0] > MAX_SAMPLES:
        raise ValueError(f"{what} has {array.shape[0]} samples; the statistics need O(n^2) memory, give at most {MAX_SAMPLES}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} holds NaN/Inf values")
    return array


def energy_distance(x, y) -> float:
    """The energy distance between the samples ``x`` (n, ...) and ``y`` (m, ...), flattened per sample."""
    first, second = _matrix(x, "x"), _matrix(y, "y")
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"x has {first.shape[1]} features per sample, y {second.shape[1]}")
    return float(dcor.energy_distance(first, second))


def distance_correlation(x, y) -> float:
    """The distance correlation between paired samples ``x`` (n, ...) and ``y`` (n, ...), flattened per sample."""
    first, second = _matrix(x, "x"), _matrix(y, "y")
    if len(first) != len(second):
        raise ValueError(f"distance correlation pairs samples: x has {len(first)}, y {len(second)}")
    return float(dcor.distance_correlation(first, second))


def class_energy_score(features, labels) -> float | None:
    """max over classes c != ref of E(features | ref, features | c), ref the largest class; None under two classes."""
    matrix = _matrix(features, "features")
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if len(labels) != len(matrix):
        raise ValueError(f"{len(matrix)} feature rows but {len(labels)} labels")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return None
    # np.argmax returns the first maximum: on a tie the smallest label is the reference.
    reference = classes[int(np.argmax(counts))]
    anchor = matrix[labels == reference]
    return max(float(dcor.energy_distance(anchor, matrix[labels == other])) for other in classes if other != reference)
