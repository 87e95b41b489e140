"""Layers whose parameters are shared by identity (weight tying) are never rewritten in place."""

from __future__ import annotations

import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.fx import sharing_refusal
from egp_export.analysis.trace import trace
from egp_export.passes import FoldResiduals
from egp_export.records import Reason, RefusalCode
from tests.conftest import apply, assert_same_function, prepare, randomize_batchnorm, reasons


class TiedLinears(nn.Module):
    """fc2.weight is fc1.weight; a BatchNorm after fc1 only may fold into fc1 if fc2 does not see it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight
        self.bn = nn.BatchNorm1d(8)
        randomize_batchnorm(self.bn)

    def forward(self, x):
        return self.bn(self.fc1(x)) + self.fc2(x)


def test_tied_weights_are_named():
    gm = trace(TiedLinears().eval())
    assert sharing_refusal(gm, "fc1") == Reason(RefusalCode.TIED_WEIGHT, {"parameter": "fc1.weight", "other": "fc2.weight"})
    assert sharing_refusal(gm, "bn") is None


def test_module_registered_twice_is_shared():
    model = nn.Sequential(nn.Linear(4, 4))
    model.add_module("alias", model[0])
    gm = trace(nn.Sequential(model[0]).eval())
    gm.add_submodule("alias", gm.get_submodule("0"))
    assert sharing_refusal(gm, "0") == Reason(RefusalCode.SAME_MODULE, {"layer": "0", "other": "alias"})


def test_batchnorm_does_not_fold_into_a_tied_weight():
    """Regression: the fold wrote the shared tensor, fc2 changed too, and compile refused a valid model."""
    model = TiedLinears().eval()
    result = egp_export.compile(model, torch.randn(60, 8))
    assert not any("folded into 'fc1'" in r["action"] for r in result.report["rewrites"]), result.report["rewrites"]
    assert any("tied weights" in r["reason"] for r in result.report["refusals"]), result.report["refusals"]
    assert_same_function(model, result.module, torch.randn(16, 8))
    assert result.module.fc1.weight is result.module.fc2.weight


class TiedResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.other = nn.Conv2d(4, 4, 3, padding=1)
        self.other.weight = self.conv.weight

    def forward(self, x):
        return x + self.conv(x) + self.other(x)


def test_residual_does_not_fold_into_a_tied_conv():
    model = TiedResidual().eval()
    example = torch.randn(2, 4, 5, 5)
    gm = prepare(model, example)
    result = apply(FoldResiduals(), gm, example)
    assert not result.modified
    assert any("tied weights" in reason for reason in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn(3, 4, 5, 5))
