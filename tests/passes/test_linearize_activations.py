"""Tests for LinearizeActivations: sites linear on the calibration data become per-neuron affine maps.

Linear sites are engineered: the producing layer's weights are shrunk to 0.01
and its bias puts each channel deep inside one region (±50, ReLU6 at 3 or
saturated at 100, Hardsigmoid's middle at 0, ...). Fresh unit-normal inputs
then stay in the same region, so the rewrite must be exact on them too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.passes import LinearizeActivations
from tests.conftest import (
    FORM_IDS,
    FORMS,
    Form,
    Slot,
    actions,
    activation_count,
    affines,
    apply,
    assert_onnx_valid,
    assert_same_function,
    calibration_batches,
    engineer,
    modules_of_type,
    prepare,
    reasons,
)

CHANNELS = 6
# Per kind: (pre-activation bias, expected slope, expected intercept), cycled over the channels.
# A slope of None stands for "the PReLU slope of that channel".
PLANS: dict[str, list[tuple[float, float | None, float]]] = {
    "relu": [(50.0, 1.0, 0.0), (-50.0, 0.0, 0.0)],
    "relu6": [(3.0, 1.0, 0.0), (-50.0, 0.0, 0.0), (100.0, 0.0, 6.0)],
    "hardtanh": [(0.5, 1.0, 0.0), (-50.0, 0.0, -2.0), (50.0, 0.0, 3.0)],
    "leaky_relu": [(50.0, 1.0, 0.0), (-50.0, 0.2, 0.0)],
    "prelu": [(50.0, 1.0, 0.0), (-50.0, None, 0.0)],
    "hardswish": [(50.0, 1.0, 0.0), (-50.0, 0.0, 0.0)],
    "hardsigmoid": [(0.0, 1 / 6, 0.5), (-50.0, 0.0, 0.0), (50.0, 0.0, 1.0)],
    "gelu": [(30.0, 1.0, 0.0), (-50.0, 0.0, 0.0)],
    "silu": [(30.0, 1.0, 0.0), (-50.0, 0.0, 0.0)],
}


def _plan(kind: str, channels: int) -> list[tuple[float, float | None, float]]:
    plan = PLANS[kind]
    return [plan[c % len(plan)] for c in range(channels)]


def _expected(kind: str, act: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    slopes = act.weight.detach().expand(channels) if isinstance(act, nn.PReLU) else None
    scale = [slopes[c] if s is None else s for c, (_, s, _) in enumerate(_plan(kind, channels))]
    shift = [i for _, _, i in _plan(kind, channels)]
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(shift, dtype=torch.float32)


class ConvActConv(nn.Module):
    def __init__(self, act: nn.Module, cls: type = nn.Conv2d, channels: int = CHANNELS) -> None:
        super().__init__()
        self.conv1 = cls(3, channels, 3, padding=1)
        self.act = act
        self.conv2 = cls(channels, 2, 1)

    def forward(self, x):
        return self.conv2(self.act(self.conv1(x)))


class LinearActLinear(nn.Module):
    def __init__(self, act: nn.Module, channels: int = CHANNELS) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, channels)
        self.act = act
        self.fc2 = nn.Linear(channels, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _linearize(model: nn.Module, shape: tuple[int, ...], tolerance: float = 1e-5):
    model = model.eval()
    calibration = calibration_batches(shape)
    gm = prepare(model, calibration[0], calibration=calibration, tolerance=tolerance)
    return gm, apply(LinearizeActivations(), gm, calibration[0])


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_engineered_site_becomes_its_affine_map(form: Form):
    act = form.build(CHANNELS)
    model = ConvActConv(act)
    engineer(model.conv1, [b for b, _, _ in _plan(form.kind, CHANNELS)])
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 0
    (affine,) = affines(gm)
    assert affine.dim == 1
    scale, shift = _expected(form.kind, act, CHANNELS)
    torch.testing.assert_close(affine.scale, scale, rtol=0, atol=1e-6)
    torch.testing.assert_close(affine.shift, shift, rtol=0, atol=1e-6)
    assert result.refusals == [] and f"{form.kind} -> affine" in actions(result)[0]
    # Exact for piecewise-linear sites; SiLU(30) = 30 - 3e-12 is within fp32 rounding of the identity.
    assert_same_function(model, gm, torch.randn(8, 3, 5, 5))


LAYOUTS = [
    ("conv1d", lambda act: ConvActConv(act, nn.Conv1d), (8, 3, 9), 1),
    ("conv2d", lambda act: ConvActConv(act, nn.Conv2d), (8, 3, 5, 5), 1),
    ("linear-BC", lambda act: LinearActLinear(act), (16, 3), -1),
    ("linear-BNC", lambda act: LinearActLinear(act), (4, 5, 3), -1),
    ("linear-BHWC", lambda act: LinearActLinear(act), (2, 3, 4, 3), -1),
]


@pytest.mark.parametrize(("layout", "make", "shape", "dim"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.GELU], ids=["relu", "relu6", "gelu"])
def test_neuron_axis_follows_the_layout(layout, make, shape, dim, act):
    model = make(act())
    kind = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.GELU: "gelu"}[act]
    engineer(model.conv1 if hasattr(model, "conv1") else model.fc1, [b for b, _, _ in _plan(kind, CHANNELS)])
    gm, result = _linearize(model, shape)

    assert activation_count(gm) == 0
    (affine,) = affines(gm)
    assert affine.dim == dim and affine.scale.numel() == CHANNELS
    assert_same_function(model, gm, torch.randn(shape))


def test_onnx_export_of_a_linearized_model_is_valid():
    model = ConvActConv(nn.ReLU6())
    engineer(model.conv1, [b for b, _, _ in _plan("relu6", CHANNELS)])
    gm, _ = _linearize(model, (8, 3, 5, 5))

    onnx_model = assert_onnx_valid(gm, torch.randn(2, 3, 5, 5))
    assert "Clip" not in {node.op_type for node in onnx_model.graph.node}


# Refusals ----------------------------------------------------------------------------


def _mixed(layer: nn.Module, dead: list[int]) -> None:
    """Unit-scale weights and zero bias (neurons cross 0), except ``dead`` channels far below."""
    engineer(layer, [-50.0 if c in dead else 0.0 for c in range(layer.bias.numel())], weight_scale=1.0)


def test_site_crossing_a_boundary_is_kept_with_the_reason():
    model = ConvActConv(nn.ReLU())
    _mixed(model.conv1, dead=[])
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1 and affines(gm) == []
    assert not result.modified
    assert reasons(result) == [f"{CHANNELS} of {CHANNELS} neurons cross a region boundary on the data"]
    assert_same_function(model, gm, torch.randn(4, 3, 5, 5))


def test_dead_neurons_of_a_nonlinear_site_are_masked():
    model = ConvActConv(nn.ReLU())
    _mixed(model.conv1, dead=[0, 3])
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1
    (mask,) = affines(gm)
    assert mask.scale.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0] and mask.shift.tolist() == [0.0] * CHANNELS
    assert "2 dead neurons of relu masked to zero" in actions(result)
    assert any("cross a region boundary" in r for r in reasons(result))
    # The mask sits between the producer and the activation.
    act_node = next(n for n in gm.graph.nodes if n.target == "act")
    assert isinstance(gm.get_submodule(str(act_node.args[0].target)), type(mask))
    assert_same_function(model, gm, torch.randn(4, 3, 5, 5))


class SharedProducerOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.act(y), y


def test_dead_neurons_are_kept_when_the_mask_could_not_fold():
    model = SharedProducerOutput()
    _mixed(model.conv, dead=[1])
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1 and affines(gm) == []
    assert any("1 dead neurons kept" in r and "has 2 users" in r for r in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn(4, 3, 5, 5))


def test_hardswish_in_its_quadratic_region_is_not_affine():
    model = ConvActConv(nn.Hardswish())
    engineer(model.conv1, [0.0] * CHANNELS)  # z within ±1.5 of 0: inside (-3, 3) but every neuron in one region
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1 and affines(gm) == []
    assert reasons(result) == [f"{CHANNELS} neurons stay in a region where hardswish is not affine"]


@pytest.mark.parametrize("act", [nn.GELU(), Slot(F.silu)], ids=["GELU", "F.silu"])
def test_smooth_site_outside_the_tolerance_is_kept(act):
    model = LinearActLinear(act)
    _mixed(model.fc1, dead=[])
    gm, result = _linearize(model, (16, 3), tolerance=1e-5)

    assert activation_count(gm) == 1 and affines(gm) == []
    assert any("deviate from their best affine fit" in r for r in reasons(result))


def test_smooth_site_within_a_loose_tolerance_is_replaced_approximately():
    model = LinearActLinear(nn.GELU())
    engineer(model.fc1, [3.0] * CHANNELS, weight_scale=0.1)  # z in about [2, 4]: GELU is nearly the identity
    gm, result = _linearize(model, (16, 3), tolerance=1e-2)

    assert activation_count(gm) == 0
    assert "surrogate error" in actions(result)[0]
    # Approximate by design: the error is bounded by the surrogate's, far from fp32 exactness.
    assert_same_function(model, gm, torch.randn(16, 3), rtol=1e-2)


class InplaceWithReaders(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = act

    def forward(self, x):
        y = self.conv(x)
        z = self.act(y)  # overwrites y in place
        return z + y


@pytest.mark.parametrize(
    "act", [nn.ReLU(inplace=True), Slot(lambda x: F.relu(x, inplace=True)), Slot(lambda x: x.relu_())],
    ids=["nn.ReLU(inplace)", "F.relu(inplace)", "x.relu_()"],
)
def test_inplace_site_whose_input_is_read_elsewhere_is_kept(act):
    model = InplaceWithReaders(act)
    engineer(model.conv, [50.0, -50.0, 50.0, -50.0])  # linear on the data: only the inplace guard stops it
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1 and affines(gm) == []
    assert any("overwrites" in r and "which other nodes read" in r for r in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn(4, 3, 5, 5))


def test_shared_activation_module_is_linearized_per_call_site():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    model = Twice()
    engineer(model.conv1, [50.0, -50.0, 50.0, -50.0], weight_scale=1.0)  # first call linear: 50 +- a few, or off
    with torch.no_grad():  # second call centred on 0: not linear
        model.conv2.bias.copy_(-model.conv2.weight[:, :, 0, 0] @ torch.tensor([50.0, 0.0, 50.0, 0.0]))
    gm, result = _linearize(model, (8, 3, 5, 5))

    assert activation_count(gm) == 1
    (affine,) = affines(gm)
    assert affine.scale.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert len(result.rewrites) == 1 and len(result.refusals) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("relu") == 1
    assert modules_of_type(gm, nn.ReLU)
    assert_same_function(model, gm, torch.randn(4, 3, 5, 5))
