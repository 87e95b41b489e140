"""Centered kernel alignment and ITPruner's unit importance (Zheng et al., "An Information Theory-inspired
Strategy for Automatic Network Pruning", ITPruner; MAC-AutoML/ITPruner).

From ``CKA/cka.py`` of the reference (Kornblith et al.'s code) and
``Cifar/feature_extract.py``:

    K = X X^T (linear kernel) or exp(-||x_i - x_j||^2 / (2 m)), m = median squared distance (Gaussian)
    H = I - 11^T / n;   CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)
    t_i = sum_{j != i} S_ij / sum_k sum_{j != k} S_kj      S_ij = CKA(feature_i, feature_j)
    alpha_i = exp(-beta t_i)

A unit that resembles the others (large t) carries little information of
its own and gets a small alpha. A feature that is constant over the batch
has HKH = 0: its CKA with anything is defined here as 0 (the reference
divides by zero and gets NaN). Computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

KERNELS = ("linear", "gaussian")


def _features(values, what: str) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().to(torch.float64).cpu()
    if tensor.dim() == 1:
        tensor = tensor[:, None]
    tensor = tensor.reshape(tensor.shape[0], -1)
    if tensor.shape[0] < 2:
        raise ValueError(f"{what}: CKA needs at least two samples, got {tensor.shape[0]}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} holds NaN/Inf values")
    return tensor


def gram(x: torch.Tensor, kernel: str = "linear") -> torch.Tensor:
    """The n x n kernel matrix of the rows of ``x`` (linear: X X^T; gaussian: median-distance bandwidth)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    products = x @ x.T
    if kernel == "linear":
        return products
    squared = products.diagonal()
    distances = (squared[:, None] + squared[None, :] - 2.0 * products).clamp(min=0.0)
    # The median as numpy takes it (the reference's np.median): the mean of the two middle values.
    median = float(torch.quantile(distances.reshape(-1), 0.5))
    if median == 0.0:
        # Most samples coincide: no scale to measure distances on; every sample is alike (constant kernel).
        return torch.ones_like(distances)
    return torch.exp(-distances / (2.0 * median))


def _centered(matrix: torch.Tensor) -> torch.Tensor:
    # H K H with H = I - 11^T/n: subtract row and column means, add back the grand mean.
    return matrix - matrix.mean(dim=0, keepdim=True) - matrix.mean(dim=1, keepdim=True) + matrix.mean()


def cka(x, y, kernel: str = "linear") -> float:
    """CKA between the features ``x`` (n, ...) and ``y`` (n, ...) of the same n samples, flattened per sample."""
    first, second = _features(x, "x"), _features(y, "y")
    if len(first) != len(second):
        raise ValueError(f"CKA pairs samples: x has {len(first)}, y {len(second)}")
    gram_x, gram_y = _centered(gram(first, kernel)), _centered(gram(second, kernel))
    norm = float(torch.linalg.norm(gram_x)) * float(torch.linalg.norm(gram_y))
    if norm == 0.0:
        return 0.0
    return float((gram_x * gram_y).sum()) / norm


def similarity_matrix(features: Sequence, kernel: str = "linear") -> torch.Tensor:
    """S_ij = CKA(features[i], features[j]) (float64, symmetric, diagonal 1 for non-constant features)."""
    count = len(features)
    centered = [_centered(gram(_features(values, f"features[{index}]"), kernel)) for index, values in enumerate(features)]
    norms = [float(torch.linalg.norm(matrix)) for matrix in centered]
    similarity = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            norm = norms[i] * norms[j]
            value = float((centered[i] * centered[j]).sum()) / norm if norm else 0.0
            similarity[i, j] = similarity[j, i] = value
    return similarity


def itpruner_importance(similarity: torch.Tensor, beta: float) -> tuple[list[float], list[float]]:
    """(t, alpha): t_i = sum_{j!=i} S_ij normalised to sum 1, alpha_i = exp(-beta t_i)."""
    similarity = torch.as_tensor(similarity, dtype=torch.float64)
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"the similarity matrix must be square, got shape {tuple(similarity.shape)}")
    off_diagonal = similarity.sum(dim=1) - similarity.diagonal()
    total = float(off_diagonal.sum())
    if total <= 0.0:
        raise ValueError("the units' features share no similarity (sum of S_ij, i != j, is not positive); t is undefined")
    shares = [float(value) / total for value in off_diagonal]
    return shares, [math.exp(-beta * share) for share in shares]
