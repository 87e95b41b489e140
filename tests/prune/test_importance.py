"""Entropy (the reference's per-batch definition and the pooled one), importance and budgets, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from egp_export.analysis.activations import binary_entropy
from egp_export.distributed import Runtime
from egp_export.prune.api import prune
from egp_export.prune.importance import (
    allocate_budgets,
    batch_layer_entropies,
    egp_importance,
    nepenthe_importance,
    pooled_layer_entropy,
    softmax_shares,
)
from egp_export.prune.loop import ENTROPY_BATCH_SIZE, measure
from egp_export.prune.training import as_dataset, input_batches

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")

H_QUARTER = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # h(1/4) = 0.811278 bits
H_THREE_EIGHTHS = -(0.375 * math.log2(0.375) + 0.625 * math.log2(0.625))  # h(3/8) = 0.954434 bits


# Budget: hand-computed cases ----------------------------------------------------------------


def test_budget_splits_by_softmax_of_sum_over_importance():
    # S = 3, R = (3, 1.5), softmax_a = 1 / (1 + e^-1.5) = 0.8176 -> 40.88 of 50 -> 41 and 9.
    assert allocate_budgets({"a": 1.0, "b": 2.0}, {"a": 100, "b": 100}, 50) == {"a": 41, "b": 9}


def test_budget_caps_a_layer_and_gives_the_excess_to_the_others():
    # a wants 40.88 but has 10: it loses all 10, b takes the other 40.
    assert allocate_budgets({"a": 1.0, "b": 2.0}, {"a": 10, "b": 100}, 50) == {"a": 10, "b": 40}


def test_budget_redistributes_iteratively_until_nothing_is_capped():
    # S = 7, R = (7, 3.5, 1.75). Round 1: a wants 57.9 of 60 > 5 -> capped, 55 left, S = 6.
    # Round 2 over (b, c): R = (3, 1.5), b wants 0.8176 * 55 = 44.97 > 10 -> capped, 45 left. Round 3: c takes 45.
    assert allocate_budgets({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 5, "b": 10, "c": 100}, 60) == {"a": 5, "b": 10, "c": 45}


def test_budget_takes_a_capped_layer_out_of_the_sum_as_the_reference_does():
    # Round 1: S = 4, R = (4, 4, 2): a wants 100 / (2 + e^-2) = 46.8 > 10 -> capped at 10, 90 left.
    # Round 2: a's importance leaves the sum: S = 3, R = (3, 1.5): b = 90 / (1 + e^-1.5) = 73.58, c = 16.42
    # -> largest remainder gives b the last one: (74, 16). (Keeping S = 4 would give R = (4, 2) and b = 79.27.)
    assert allocate_budgets({"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 10, "b": 1000, "c": 1000}, 100) == {
        "a": 10, "b": 74, "c": 16,
    }


def test_budget_never_exceeds_what_is_left():
    assert allocate_budgets({"a": 1.0, "b": 3.0}, {"a": 7, "b": 5}, 1000) == {"a": 7, "b": 5}


def test_budget_ties_go_to_the_earlier_layer():
    assert allocate_budgets({"a": 1.0, "b": 1.0}, {"a": 10, "b": 10}, 5) == {"a": 3, "b": 2}


def test_zero_importance_is_infinite_ratio_and_takes_the_budget_first():
    assert allocate_budgets({"a": 0.0, "b": 1.0}, {"a": 10, "b": 10}, 5) == {"a": 5, "b": 0}
    assert allocate_budgets({"a": 0.0, "b": 1.0}, {"a": 10, "b": 10}, 15) == {"a": 10, "b": 5}
    assert allocate_budgets({"a": 0.0, "b": 0.0}, {"a": 10, "b": 10}, 6) == {"a": 3, "b": 3}


def test_budget_refuses_bad_importances_and_mismatched_layers():
    with pytest.raises(ValueError, match="non-negative"):
        allocate_budgets({"a": -1.0}, {"a": 10}, 5)
    with pytest.raises(ValueError, match="same layers"):
        allocate_budgets({"a": 1.0}, {"b": 10}, 5)


def test_huge_ratios_do_not_overflow():
    # I = 1e-300 makes R ~ 1e300: exp(R - max R) stays finite; the tiny layer takes everything it has.
    budgets = allocate_budgets({"a": 1e-300, "b": 1.0, "c": 2.0}, {"a": 4, "b": 100, "c": 100}, 50)
    assert budgets["a"] == 4 and sum(budgets.values()) == 50
    shares = softmax_shares(torch.tensor([1e300, 1.0, torch.inf], dtype=torch.float64))
    assert shares.tolist() == [0.0, 0.0, 1.0]
    assert softmax_shares(torch.tensor([1e308, 1e308, -1e308], dtype=torch.float64)).tolist() == [0.5, 0.5, 0.0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(0, 500)), min_size=1, max_size=6),
    st.integers(0, 3000),
)
def test_budgets_add_up_and_respect_caps(layers, amount):
    importance = {f"l{i}": value for i, (value, _) in enumerate(layers)}
    remaining = {f"l{i}": left for i, (_, left) in enumerate(layers)}
    budgets = allocate_budgets(importance, remaining, amount)
    assert sum(budgets.values()) == min(amount, sum(remaining.values()))
    assert all(0 <= budgets[name] <= remaining[name] for name in budgets)


# Importance ------------------------------------------------------------------------------


def test_entropy_limits_are_zero_not_nan():
    assert binary_entropy(torch.tensor([0.0, 1.0, 0.5])).tolist() == [0.0, 0.0, 1.0]


def test_egp_importance_is_layer_entropy_times_mean_abs_nonzero_weight():
    weight = torch.tensor([[0.0, 2.0], [-4.0, 0.0]])
    entropy = pooled_layer_entropy([torch.tensor([1.0, 0.5])])
    assert entropy == 0.75 and egp_importance(entropy, weight) == pytest.approx(0.75 * 3.0)
    assert egp_importance(0.75, torch.zeros(2, 2)) == 0.0  # an emptied layer


def test_layer_feeding_two_sites_pools_their_neurons():
    assert pooled_layer_entropy([torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])]) == pytest.approx(0.5)


def test_nepenthe_weights_each_neuron_entropy_by_its_own_weights():
    # Neuron 0: h = 1, mean |w| = 1; neuron 1: h = 0, mean |w| = 10 (constant, adds nothing); row 2 empty.
    weight = torch.tensor([[1.0, -1.0], [10.0, 0.0], [0.0, 0.0]])
    entropies = torch.tensor([1.0, 0.0, 0.5])
    assert pooled_layer_entropy([entropies]) == pytest.approx(0.5)
    assert nepenthe_importance([entropies], weight) == pytest.approx((1.0 * 1.0 + 0.0 * 10.0 + 0.5 * 0.0) / 3)
    # EGP on the same layer counts the constant neuron's large weights: a different ranking.
    assert egp_importance(0.5, weight) == pytest.approx(0.5 * 4.0)
    with pytest.raises(ValueError, match="3 output neurons has 2 neurons"):
        nepenthe_importance([torch.tensor([1.0, 0.0])], weight)


# The reference's layer entropy ------------------------------------------------------------------


def test_batch_entropy_averages_over_the_non_constant_neurons_only():
    # Batch 1: p = (0, 1, 1, 1/2): one neuron varies -> h(1/2) = 1. Batch 2: p = (1/4, 1, 0, 0) -> h(1/4).
    # Batch 3: every neuron constant -> 0. Two sites of one layer are taken together.
    site_a = torch.tensor([[0.0, 1.0], [0.25, 1.0], [1.0, 1.0]])
    site_b = torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.0, 1.0]])
    entropies = batch_layer_entropies([site_a, site_b])
    assert entropies.dtype == torch.float64
    assert entropies.tolist() == pytest.approx([1.0, H_QUARTER, 0.0])


class TwoInputs(nn.Module):
    """Three ReLU neurons: z = (x0, 1, x1); neuron 1 is always ON."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.relu(self.fc(x)))


def _two_batches() -> torch.Tensor:
    """256 samples = two batches of 128. Batch 1: x0 > 0 in 64 of them, x1 < 0 in all; batch 2: 32 and all > 0."""
    x = torch.empty(256, 2)
    x[:128, 0] = torch.where(torch.arange(128) < 64, 1.0, -1.0)
    x[:128, 1] = -1.0
    x[128:, 0] = torch.where(torch.arange(128) < 32, 1.0, -1.0)
    x[128:, 1] = 1.0
    return x


def test_reference_entropy_of_a_layer_with_constant_channels_by_hand():
    # Batch 1: p = (1/2, 1, 0) -> only neuron 0 varies: H^1 = 1. Batch 2: p = (1/4, 1, 1) -> H^2 = h(1/4).
    # Reference H = (1 + h(1/4)) / 2 = 0.9056. Neuron 2 is OFF in one batch and ON in the other: it adds nothing
    # there, while the pooled entropy (p = 3/8, 1, 1/2 over all 256) counts it: (h(3/8) + 0 + 1) / 3 = 0.6515.
    model = TwoInputs().eval()
    x = _two_batches()
    batches = input_batches(as_dataset((x, torch.zeros(256).long()), "x"), None, batch_size=ENTROPY_BATCH_SIZE)
    assert [len(batch) for batch in batches] == [128, 128]
    measurement = measure(model, batches, Runtime(), include_shortcuts=False)
    assert measurement.site_layers == {"relu": ("fc",)}
    assert measurement.reference_entropy["fc"] == pytest.approx((1.0 + H_QUARTER) / 2)
    assert measurement.sites[0].entropy == pytest.approx((H_THREE_EIGHTHS + 0.0 + 1.0) / 3)
    assert measurement.sites[0].observations == 256  # the pooled statistics still see every sample

    # prune records the layer entropy it ranks with: the reference's for EGP by default, the pooled one on request.
    y = torch.arange(256) % 3
    for entropy, expected in ((None, (1.0 + H_QUARTER) / 2), ("pooled", (H_THREE_EIGHTHS + 1.0) / 3)):
        result = prune(model, (x, y), (x, y), entropy=entropy, iterations=0, progress=False)
        (row,) = result.history[0]["layers"]
        assert row["layer"] == "fc" and row["entropy"] == pytest.approx(expected)
        assert row["importance"] == pytest.approx(expected * 1.0)  # mean |w| over fc's non-zero weights (two ones)


def test_a_layer_constant_in_every_batch_has_zero_reference_entropy_and_is_frozen():
    # x0 > 0 for all of batch 1 and none of batch 2: every neuron is constant within each batch, so the
    # reference entropy is 0 (the layer is excluded), although the pooled entropy of neuron 0 is h(1/2) = 1.
    x = _two_batches()
    x[:128, 0], x[128:, 0] = 1.0, -1.0
    y = torch.arange(256) % 3
    result = prune(TwoInputs().eval(), (x, y), (x, y), iterations=1, epochs_per_iteration=0, progress=False)
    (row,) = result.history[0]["layers"]
    assert row["entropy"] == 0.0 and row["excluded"] == "zero entropy"
    assert result.history[0]["entropies"]["relu"] > 0  # the site itself is not linear on the data
    assert result.stop_reason.startswith("nothing to prune")
