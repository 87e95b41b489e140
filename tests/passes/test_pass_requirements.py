"""A pass declares the facts it reads; run without them it raises naming itself and the fact, and its own failures
are wrapped with its name (the original chained)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.plans import plan_site, store_plans
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.errors import CalibrationError, PassError
from egp_export.passes import (
    Fact,
    FoldBatchNorm,
    GraphPass,
    LinearizeActivations,
    PassManager,
    Recorder,
    default_steps,
)
from egp_export.records import RewriteKind


def _always_on() -> nn.Module:
    """Conv -> ReLU whose every neuron is ON (bias +100): linear on any data, the linearize pass's bread and butter."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[1].bias.fill_(100.0)
    return model


def _data() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_linearize_without_calibration_names_the_pass_and_the_fact():
    gm = trace(_always_on())
    manager = PassManager([LinearizeActivations()], example_input=_data()[:1])
    with pytest.raises(PassError, match=r"pass 'linearize_activations' needs calibrated sites \(missing at _2\)"):
        manager.run(gm)
    with pytest.raises(PassError, match="calibrate"):  # called alone as well
        LinearizeActivations()(gm)
    # Statistics without a decision: the pass applies plans and decides nothing, so it refuses to guess.
    sites = calibrate(gm, [_data()])
    with pytest.raises(PassError, match=r"calibrated site '_2' without a plan: decide first"):
        PassManager([LinearizeActivations()], example_input=_data()[:1]).run(gm)
    # With the facts and the plans on the graph the same pass rewrites the site.
    store_plans(gm, {site.name: plan_site(site, 1e-5) for site in sites})
    result = PassManager([LinearizeActivations()], example_input=_data()[:1]).run(gm)
    assert [r.kind for r in result.rewrites] == [RewriteKind.LINEARIZED]


def test_a_shape_reading_pass_without_shapes_names_the_pass_and_the_fact():
    gm = trace(_always_on())
    with pytest.raises(PassError, match=r"pass 'fold_batchnorm' needs shapes \(missing at input_1\).*propagate_shapes"):
        PassManager([FoldBatchNorm()]).run(gm)
    # The manager computes shapes itself when it is given an example.
    result = PassManager([FoldBatchNorm()], example_input=_data()[:1]).run(gm)
    assert [r.kind for r in result.rewrites] == [RewriteKind.BN_FOLDED]


def test_a_graph_without_activations_needs_no_calibration():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).eval()
    gm = trace(model)
    propagate_shapes(gm, _data()[:1])
    result = PassManager(default_steps(), example_input=_data()[:1]).run(gm)
    assert RewriteKind.BN_FOLDED in [r.kind for r in result.rewrites]


def test_declared_requirements():
    assert LinearizeActivations.requires == {Fact.CALIBRATED_SITES, Fact.SHAPES}
    assert FoldBatchNorm.requires == {Fact.SHAPES}


class _Raises(GraphPass):
    name = "raises"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        raise self.error


def test_a_pass_failure_is_wrapped_with_the_pass_name_and_chained():
    gm = trace(nn.Linear(2, 2).eval())
    original = IndexError("list index out of range")
    with pytest.raises(PassError, match=r"pass 'raises' failed: IndexError: list index out of range") as caught:
        PassManager([_Raises(original)]).run(gm)
    assert caught.value.__cause__ is original


def test_a_project_error_from_a_pass_keeps_its_type_and_names_the_pass():
    gm = trace(nn.Linear(2, 2).eval())
    with pytest.raises(CalibrationError, match="no samples") as caught:
        PassManager([_Raises(CalibrationError("no samples"))]).run(gm)
    assert "raised in pass 'raises'" in caught.value.__notes__


def _masked(y, mask):
    return y if mask is None else y * mask


fx.wrap("_masked")


class _OptionalMask(nn.Module):
    """An input traced as a placeholder but called with None (timm's attn_mask): it never gets a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x, mask=None):
        return _masked(self.bn(self.conv(x)), mask)


def test_an_input_that_is_not_a_tensor_does_not_count_as_missing_shapes():
    gm = fx.symbolic_trace(_OptionalMask().eval())
    propagate_shapes(gm, _data()[:1])
    assert "tensor_meta" not in next(n for n in gm.graph.nodes if n.name == "mask").meta
    result = PassManager([FoldBatchNorm()]).run(gm)
    assert [r.kind for r in result.rewrites] == [RewriteKind.BN_FOLDED]
