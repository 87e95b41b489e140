"""PQ Index and SAP's count against the paper's check values and a direct numpy transcription of the formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egp_export.measures import pq_index, sap_prune_count


def e1(size: int) -> torch.Tensor:
    vector = torch.zeros(size)
    vector[0] = 1.0
    return vector


@pytest.mark.parametrize(("p", "q", "expected"), [(0.5, 1.0, 0.75), (1.0, 2.0, 0.5)])
def test_one_hot_in_r4(p, q, expected):
    assert pq_index(e1(4), p, q) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("p", "q", "expected"), [(0.5, 1.0, 0.5), (1.0, 2.0, 0.2928932)])
def test_two_ones(p, q, expected):
    assert pq_index(torch.tensor([1.0, 1.0, 0.0, 0.0]), p, q) == pytest.approx(expected, abs=1e-7)


def test_masked_entries_leave_d_and_the_norms():
    weight = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert pq_index(weight, mask=torch.tensor([1, 1, 0, 0])) == 0.0
    # an unmasked exact zero still counts in d
    assert pq_index(weight, mask=torch.tensor([1, 1, 1, 0])) > 0.0


def test_empty_and_all_zero_give_zero():
    assert pq_index(torch.ones(3), mask=torch.zeros(3, dtype=torch.bool)) == 0.0
    assert pq_index(torch.zeros(5)) == 0.0


def numpy_pqi(values: np.ndarray, p: float, q: float) -> float:
    values = values.astype(np.float64)
    d = values.size
    return 1 - d ** (1 / q - 1 / p) * np.sum(np.abs(values) ** p) ** (1 / p) / np.sum(np.abs(values) ** q) ** (1 / q)


@pytest.mark.parametrize(("p", "q"), [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_scopes_against_numpy_on_random_weights(p, q):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, generator=generator)
    mask = torch.rand(weight.shape, generator=generator) > 0.3
    kept = weight.numpy()[mask.numpy()]
    assert pq_index(weight, p, q, mask, "layer") == pytest.approx(numpy_pqi(kept, p, q), rel=1e-10)
    rows = pq_index(weight, p, q, mask, "neuron")
    assert rows.shape == (6,)
    for row in range(6):
        values = weight[row].numpy()[mask[row].numpy()]
        assert float(rows[row]) == pytest.approx(numpy_pqi(values, p, q), rel=1e-10)
    other = torch.randn(10, 4, generator=generator)
    together = np.concatenate([kept, other.numpy().ravel()])
    assert pq_index([weight, other], p, q, [mask, None], "global") == pytest.approx(numpy_pqi(together, p, q), rel=1e-10)


def test_sparser_is_larger():
    dense, sparse = torch.ones(100), torch.cat([torch.ones(10), torch.zeros(90)])
    assert pq_index(dense) == pytest.approx(0.0, abs=1e-12)
    assert pq_index(sparse) > 0.5


def test_sap_count_check_values():
    assert sap_prune_count(4, pq_index(e1(4))) == (1, 3)
    r, c = sap_prune_count(100, pq_index(e1(100)))
    assert (r, c) == (1, 90)  # ratio 0.99 clamps to beta = 0.9


def test_sap_count_formula_on_random_inputs():
    generator = np.random.default_rng(1)
    for _ in range(50):
        d, index = int(generator.integers(1, 500)), float(generator.uniform(0, 0.9))
        p, q = sorted(generator.uniform(0.1, 3.0, 2))
        eta, gamma, beta = float(generator.uniform(0, 1)), float(generator.uniform(0.5, 2)), 0.9
        r, c = sap_prune_count(d, index, p, q, eta, gamma, beta)
        bound = d * (1 + eta) ** (q / (p - q)) * (1 - index) ** (q * p / (q - p))
        assert r - 1 < bound <= r + 1e-9
        assert c == pytest.approx(d * min(max(gamma * (1 - r / d), 0), beta), abs=1.0)
        assert c <= d * min(max(gamma * (1 - r / d), 0), beta) + 1e-9


def test_sap_count_is_exact_where_rounding_would_lose_one():
    # 144 * (1 - 125/144) is 18.999999999999996 in floating point; the count is 19 = d - r
    pqi = 1 - (125 / 144) ** 1.0  # p=0.5, q=1: r = d (1 - I)
    assert sap_prune_count(144, pqi) == (125, 19)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_index(torch.ones(3), 1.0, 1.0)
    with pytest.raises(ValueError, match="scope"):
        pq_index(torch.ones(3), scope="row")
    with pytest.raises(ValueError, match="mask of shape"):
        pq_index(torch.ones(3), mask=torch.ones(4))
    with pytest.raises(ValueError, match="scope='global'"):
        pq_index([torch.ones(3), torch.ones(3)], scope="layer")
    with pytest.raises(ValueError, match="2 weight tensors but 1 masks"):
        pq_index([torch.ones(3), torch.ones(3)], mask=[torch.ones(3)], scope="global")
    with pytest.raises(ValueError, match="beta"):
        sap_prune_count(10, 0.5, beta=1.5)
    with pytest.raises(ValueError, match="non-negative"):
        sap_prune_count(-1, 0.5)
    with pytest.raises(ValueError, match="eta_r"):
        sap_prune_count(10, 0.5, eta_r=-1.0)
    assert sap_prune_count(0, 0.0) == (0, 0)
