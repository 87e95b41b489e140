"""Energy distance, distance correlation, CKA, ITPruner's importance and the 1-D k-means against check values and
independent implementations (dcor; a numpy CKA written here; brute force)."""

from __future__ import annotations

import itertools
import math

import dcor
import numpy as np
import pytest
import torch

from egp_export.measures import (
    cka,
    ckmeans,
    class_energy_score,
    distance_correlation,
    energy_distance,
    itpruner_importance,
    similarity_matrix,
)
from egp_export.measures.energy import MAX_SAMPLES


def test_energy_distance_check_values():
    assert energy_distance([0.0, 2.0], [1.0, 3.0]) == pytest.approx(1.0)
    assert energy_distance([0.0], [1.0]) == pytest.approx(2.0)


def naive_energy(x: np.ndarray, y: np.ndarray) -> float:
    def mean_distance(a, b):
        return np.mean(np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2))

    return 2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)


def test_energy_distance_matches_a_direct_v_statistic_on_random_features():
    generator = np.random.default_rng(0)
    x, y = generator.normal(size=(30, 2, 3, 3)), generator.normal(0.5, 1.0, size=(25, 2, 3, 3))
    expected = naive_energy(x.reshape(30, -1), y.reshape(25, -1))
    assert energy_distance(torch.as_tensor(x), torch.as_tensor(y)) == pytest.approx(expected, rel=1e-10)


def test_distance_correlation_matches_dcor():
    generator = np.random.default_rng(1)
    x = generator.normal(size=(40, 5))
    y = x[:, :2] ** 2 + 0.1 * generator.normal(size=(40, 2))
    assert distance_correlation(x, y) == pytest.approx(dcor.distance_correlation(x, y), rel=1e-12)
    assert distance_correlation(x, x) == pytest.approx(1.0)


def test_class_energy_score_takes_the_largest_class_as_reference():
    features = np.array([[0.0], [0.0], [0.0], [1.0], [5.0]])
    labels = np.array([2, 2, 2, 0, 1])
    # reference = class 2 (three samples): E({0,0,0},{1}) = 2, E({0,0,0},{5}) = 10
    assert class_energy_score(features, labels) == pytest.approx(10.0)
    assert class_energy_score(features, np.zeros(5)) is None


def test_statistics_refuse_bad_inputs():
    with pytest.raises(ValueError, match="features per sample"):
        energy_distance(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="pairs samples"):
        distance_correlation(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        energy_distance([0.0, np.inf], [1.0])
    with pytest.raises(ValueError, match="O\\(n\\^2\\) memory"):
        energy_distance(np.zeros(MAX_SAMPLES + 1), [1.0])
    with pytest.raises(ValueError, match="no samples"):
        energy_distance(np.zeros((0, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="labels"):
        class_energy_score(np.zeros((3, 1)), [0, 1])


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space linear CKA: ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), columns centred."""
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_cka_check_values():
    assert cka([1.0, 2.0, 3.0], [1.0, 0.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    assert cka([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(27 / 28, rel=1e-12)


def test_linear_cka_matches_the_feature_space_form_on_random_data():
    generator = np.random.default_rng(2)
    x = generator.normal(size=(20, 4, 2, 2))
    y = np.tanh(x.reshape(20, -1) @ generator.normal(size=(16, 7)))
    assert cka(x, y) == pytest.approx(numpy_linear_cka(x.reshape(20, -1), y), rel=1e-10)
    assert cka(x, x) == pytest.approx(1.0)


def numpy_gaussian_cka(x: np.ndarray, y: np.ndarray) -> float:
    def kernel(a):
        squared = np.sum((a[:, None, :] - a[None, :, :]) ** 2, axis=2)
        return np.exp(-squared / (2 * np.median(squared)))

    h = np.eye(len(x)) - 1.0 / len(x)
    kx, ky = h @ kernel(x) @ h, h @ kernel(y) @ h
    return np.sum(kx * ky) / (np.linalg.norm(kx) * np.linalg.norm(ky))


def test_gaussian_cka_uses_the_median_bandwidth():
    generator = np.random.default_rng(3)
    x, y = generator.normal(size=(15, 3)), generator.normal(size=(15, 2))
    assert cka(x, y, kernel="gaussian") == pytest.approx(numpy_gaussian_cka(x, y), rel=1e-10)
    with pytest.raises(ValueError, match="kernel"):
        cka(x, y, kernel="cosine")


def test_constant_features_have_zero_similarity():
    assert cka(np.ones((5, 3)), np.random.default_rng(0).normal(size=(5, 3))) == 0.0
    matrix = similarity_matrix([np.ones((5, 2)), np.arange(10.0).reshape(5, 2)])
    assert matrix[0, 1] == 0.0 and matrix[1, 1] == pytest.approx(1.0)


def test_itpruner_importance_check_values():
    similarity = torch.tensor([[1, 0.9, 0.5], [0.9, 1, 0.6], [0.5, 0.6, 1]], dtype=torch.float64)
    shares, alphas = itpruner_importance(similarity, beta=1.0)
    assert shares == pytest.approx([0.35, 0.375, 0.275])
    assert alphas == pytest.approx([0.704688, 0.687289, 0.759572], abs=1e-6)
    with pytest.raises(ValueError, match="no similarity"):
        itpruner_importance(torch.eye(3), 1.0)
    with pytest.raises(ValueError, match="square"):
        itpruner_importance(torch.ones(2, 3), 1.0)


def brute_force_sse(values, k):
    ordered = sorted(values)
    best = math.inf
    for cuts in itertools.combinations(range(1, len(ordered)), k - 1):
        bounds = (0, *cuts, len(ordered))
        total = sum(np.var(ordered[a:b]) * (b - a) for a, b in itertools.pairwise(bounds))
        best = min(best, total)
    return best


def test_ckmeans_is_optimal_against_brute_force():
    generator = np.random.default_rng(4)
    for _ in range(20):
        values = list(generator.normal(size=int(generator.integers(3, 9))))
        k = int(generator.integers(1, len(values) + 1))
        groups = ckmeans(values, k)
        assert sorted(i for group in groups for i in group) == list(range(len(values)))
        assert len(groups) == k and all(groups)
        sse = sum(np.var([values[i] for i in group]) * len(group) for group in groups)
        assert sse == pytest.approx(brute_force_sse(values, k), abs=1e-12)


def test_ckmeans_ties_are_deterministic():
    assert ckmeans([5, 1, 1.1, 5.2, 9, 9.1], 3) == [[1, 2], [0, 3], [4, 5]]
    # equal values keep input order; at equal cost the last cluster starts as early as it can
    assert ckmeans([1.0, 1.0, 1.0], 2) == [[0], [1, 2]]
    assert ckmeans([3.0, 1.0], 5) == [[1], [0]]
    assert ckmeans([], 2) == []
    with pytest.raises(ValueError, match="at least 1"):
        ckmeans([1.0], 0)
