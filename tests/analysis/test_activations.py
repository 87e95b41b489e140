"""Tests for egp_export.analysis.activations: the registry of activation forms, entropy, the affine surrogate fit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.activations import (
    ActivationSpec,
    activation_spec,
    binary_entropy,
    categorical_entropy,
    fit_affine,
    hidden_activation_count,
)
from egp_export.analysis.ops import named_modules
from egp_export.analysis.trace import trace
from tests.conftest import FORM_IDS, FORMS, Form, Slot

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")

CHANNELS = 4


def _site(act: nn.Module) -> tuple[fx.Node, ActivationSpec | None]:
    """The single call site of ``act`` in a traced conv -> act model, and its spec."""
    gm = trace(nn.Sequential(nn.Conv2d(2, CHANNELS, 1), act).eval())
    modules = named_modules(gm)
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method") and n.target != "0"]
    assert len(nodes) == 1, [n.format_node() for n in gm.graph.nodes]
    return nodes[0], activation_spec(nodes[0], modules)


def _region_samples(boundaries: tuple[float, ...], region: int) -> torch.Tensor:
    """Points strictly inside region ``region`` (boundaries[r-1] < z < boundaries[r])."""
    low = boundaries[region - 1] if region > 0 else (boundaries[0] if boundaries else 0.0) - 20.0
    high = boundaries[region] if region < len(boundaries) else (boundaries[-1] if boundaries else 0.0) + 20.0
    return torch.linspace(low, high, 67, dtype=torch.float64)[1:-1]


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_registry_recognises_form(form: Form):
    node, spec = _site(form.build(CHANNELS))

    assert spec is not None, f"{form.id} traced to {node.op} {node.target} and was not recognised"
    assert spec.kind == form.kind
    assert spec.boundaries == form.boundaries
    assert spec.inplace == form.inplace
    assert spec.smooth == (form.boundaries == ())
    assert len(spec.regions) == len(form.boundaries) + 1
    z = torch.randn(3, CHANNELS, 2, 2) * 5
    torch.testing.assert_close(spec.fn(z), form.reference(z))


@pytest.mark.parametrize("form", [f for f in FORMS if f.boundaries], ids=[f.id for f in FORMS if f.boundaries])
def test_region_maps_match_the_function_inside_each_region(form: Form):
    _, spec = _site(form.build(CHANNELS))

    for region in range(len(spec.regions)):
        affine = spec.region_map(region, CHANNELS)
        z = _region_samples(spec.boundaries, region)[None, :].expand(CHANNELS, -1)  # [neurons, samples]
        if affine is None:
            # Only Hardswish's middle is not affine: its region map must say so.
            assert (form.kind, region) == ("hardswish", 1)
            continue
        slope, intercept = affine
        expected = spec.fn(z.T.contiguous()[:, :, None, None]).squeeze(-1).squeeze(-1).T
        torch.testing.assert_close(slope[:, None] * z + intercept[:, None], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("form_id", "zero_at_zero"),
    [("nn.ReLU", True), ("nn.ReLU6", True), ("nn.Hardtanh", True), ("nn.LeakyReLU", True), ("nn.PReLU(C)", True),
     ("nn.Hardswish", True), ("nn.Hardsigmoid", False), ("nn.GELU", True), ("nn.SiLU", True)],
)
def test_zero_at_zero(form_id: str, zero_at_zero: bool):
    form = next(f for f in FORMS if f.id == form_id)
    _, spec = _site(form.build(CHANNELS))

    assert spec.zero_at_zero is zero_at_zero


def test_hardtanh_with_positive_floor_is_not_zero_at_zero():
    _, spec = _site(nn.Hardtanh(0.5, 2.0))

    assert spec.boundaries == (0.5, 2.0)
    assert spec.regions[0] == (0.0, 0.5)
    assert not spec.zero_at_zero


def test_prelu_per_neuron_slopes_are_read_from_the_module():
    prelu = nn.PReLU(CHANNELS)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.05, 0.1, 0.2, 0.3]))
    _, spec = _site(prelu)

    slope, intercept = spec.region_map(0, CHANNELS)
    torch.testing.assert_close(slope, torch.tensor([0.05, 0.1, 0.2, 0.3], dtype=torch.float64))
    torch.testing.assert_close(intercept, torch.zeros(CHANNELS, dtype=torch.float64))
    slope_on, _ = spec.region_map(1, CHANNELS)
    torch.testing.assert_close(slope_on, torch.ones(CHANNELS, dtype=torch.float64))


def test_single_parameter_prelu_slope_broadcasts_to_every_neuron():
    prelu = nn.PReLU(1, init=0.3)
    _, spec = _site(prelu)

    slope, _ = spec.region_map(0, CHANNELS)
    torch.testing.assert_close(slope, torch.full((CHANNELS,), 0.3, dtype=torch.float64))


def test_functional_parameters_are_read_from_keyword_arguments():
    _, leaky = _site(Slot(lambda x: F.leaky_relu(x, negative_slope=0.3)))
    _, tanh = _site(Slot(lambda x: F.hardtanh(x, min_val=-0.5, max_val=0.5)))
    _, default_leaky = _site(Slot(F.leaky_relu))

    assert leaky.regions[0] == (0.3, 0.0)
    assert tanh.boundaries == (-0.5, 0.5)
    assert default_leaky.regions[0] == (0.01, 0.0)


@pytest.mark.parametrize(
    "act",
    [nn.ELU(), nn.Sigmoid(), nn.Tanh(), Slot(torch.sigmoid), Slot(lambda x: x * 2), nn.Identity()],
    ids=["ELU", "Sigmoid", "Tanh", "torch.sigmoid", "mul", "Identity"],
)
def test_unsupported_ops_are_not_activations(act):
    gm = trace(nn.Sequential(nn.Conv2d(2, CHANNELS, 1), act).eval())
    modules = named_modules(gm)

    assert all(activation_spec(n, modules) is None for n in gm.graph.nodes if n.target != "0")


# Entropy -------------------------------------------------------------------------


def test_binary_entropy_endpoints_and_middle():
    h = binary_entropy(torch.tensor([0.0, 1.0, 0.5]))

    assert h.dtype == torch.float64
    assert h.tolist() == [0.0, 0.0, 1.0]  # the limits, not NaN


def test_binary_entropy_is_symmetric_and_in_bits():
    p = torch.tensor([0.25, 0.75, 0.1])
    expected = [-(q * math.log2(q) + (1 - q) * math.log2(1 - q)) for q in p.tolist()]

    torch.testing.assert_close(binary_entropy(p), torch.tensor(expected, dtype=torch.float64))
    assert binary_entropy(p)[0] == binary_entropy(p)[1]


def test_categorical_entropy_of_region_counts():
    counts = torch.tensor([[4, 2, 0], [0, 2, 0], [0, 0, 0]])  # [regions, neurons]

    torch.testing.assert_close(categorical_entropy(counts), torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


# Affine surrogates ----------------------------------------------------------------


def test_fit_affine_is_exactly_identity_for_gelu_far_positive():
    slope, intercept, error = fit_affine(F.gelu, torch.tensor([30.0, 50.0]), torch.tensor([40.0, 60.0]))

    assert slope.tolist() == [1.0, 1.0]
    assert intercept.tolist() == [0.0, 0.0]
    assert error.tolist() == [0.0, 0.0]


def test_fit_affine_is_exactly_zero_for_gelu_far_negative():
    slope, intercept, error = fit_affine(F.gelu, torch.tensor([-60.0, -40.0]), torch.tensor([-40.0, -30.0]))

    assert slope.tolist() == [0.0, 0.0]
    assert intercept.tolist() == [0.0, 0.0]
    assert error.max() < 1e-190  # GELU(-30) = -30 * Phi(-30) ~ 1e-196


def test_fit_affine_inside_the_nonlinear_range_has_small_nonzero_error():
    low, high = torch.tensor([-1.0, -0.1]), torch.tensor([1.0, 0.1])
    slope, intercept, error = fit_affine(F.gelu, low, high)

    assert bool((error > 0).all())
    assert error[0] < 0.25  # a line through GELU on [-1, 1] is off by at most ~0.22
    assert error[1] < error[0]  # narrower range, better fit
    # The reported error is the largest deviation on the grid, and the slope is the least-squares one.
    grid = torch.linspace(-1.0, 1.0, 257, dtype=torch.float64)
    worst = (F.gelu(grid) - (slope[0] * grid + intercept[0])).abs().max()
    torch.testing.assert_close(error[0], worst)
    assert 0.4 < float(slope[0]) < 0.6


def test_fit_affine_degenerate_range():
    slope, intercept, error = fit_affine(F.silu, torch.tensor([2.0]), torch.tensor([2.0]))

    assert float(error[0]) <= 1e-12
    torch.testing.assert_close(slope * 2.0 + intercept, F.silu(torch.tensor([2.0], dtype=torch.float64)))


def test_an_activation_subclass_with_its_own_forward_is_no_site_but_counts_as_hidden_in_a_leaf():
    class ScaledReLU(nn.ReLU):
        def forward(self, x):
            return 2 * torch.relu(x)

    graph = fx.Graph()
    node = graph.call_module("act", (graph.placeholder("x"),))
    assert activation_spec(node, {"act": ScaledReLU()}) is None
    assert activation_spec(node, {"act": nn.ReLU()}) is not None
    assert hidden_activation_count(nn.Sequential(nn.Linear(2, 2), ScaledReLU())) == 1
