"""The neuron axis of a call site: the activation's own axis (PReLU) and vectors (rank 1), end to end."""

from __future__ import annotations

import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.fx import site_neuron_dim
from egp_export.analysis.ops import named_modules
from tests.conftest import assert_same_function, prepare


class TokensPReLU(nn.Module):
    """Linear on [B, N, C] with N == C, then PReLU(C): PyTorch applies the slopes along dim 1 (the tokens)."""

    def __init__(self, tokens: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(4, tokens)
        self.act = nn.PReLU(tokens)
        self.head = nn.Linear(tokens, 3)
        with torch.no_grad():
            self.act.weight.copy_(torch.linspace(0.1, 0.9, tokens))
            self.fc.bias.fill_(-50.0)  # every neuron OFF: PReLU is its slope times z, per token
            self.fc.weight.mul_(0.01)

    def forward(self, x):
        return self.head(self.act(self.fc(x)))


def test_prelu_neurons_are_its_own_axis():
    model = TokensPReLU().eval()
    gm = prepare(model, torch.randn(2, 6, 4))
    (node,) = [n for n in gm.graph.nodes if n.target == "act"]
    assert site_neuron_dim(node, named_modules(gm)) == 1


def test_prelu_after_a_token_linear_with_as_many_tokens_as_channels_compiles_exactly():
    """Regression: slopes were applied along the channel axis, the compiled model differed (VerificationError)."""
    model = TokensPReLU().eval()
    result = egp_export.compile(model, torch.randn(60, 6, 4), min_observations=100)  # 36 samples x 6 tokens
    (row,) = result.report["analysis"]["sites"]
    assert row["neuron_dim"] == 1 and "-> affine" in row["action"]
    assert_same_function(model, result.module, torch.randn(8, 6, 4))


class VectorGate(nn.Module):
    """A ReLU on a rank-1 tensor (a statistic pooled over the batch) next to an ordinary site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.fc(x))
        return y * torch.relu(y.mean(0) + 10.0)  # [4]: rank 1


def test_activation_on_a_rank_one_tensor_is_one_neuron_and_compiles():
    """Regression: CalibrationError 'expected at least [batch, neurons]' for a valid model."""
    model = VectorGate().eval()
    result = egp_export.compile(model, torch.randn(40, 4), min_observations=1)  # the axis, not the evidence
    rows = {row["name"]: row for row in result.report["analysis"]["sites"]}
    assert rows["relu_1"]["neurons"] == 1 and "-> affine" in rows["relu_1"]["action"]
    assert_same_function(model, result.module, torch.randn(8, 4))
