"""Dead-code elimination after every pass keeps nodes that write into an input (their result may be unused)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_export
from egp_export.analysis.ops import named_modules, writes_in_place
from egp_export.analysis.trace import trace
from egp_export.passes import finalize
from tests.conftest import assert_same_function, randomize_batchnorm

IN_PLACE_UNUSED = {
    "nn.ReLU(inplace)": lambda module, y: module.relu(y),
    "F.relu_": lambda module, y: F.relu_(y),
    "x.relu_()": lambda module, y: y.relu_(),
    "F.relu(inplace=True)": lambda module, y: F.relu(y, inplace=True),
}


class InPlaceResultUnused(nn.Module):
    """The activation's result is dropped: only its write into ``y`` matters (a valid, if unusual, model)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # folding it makes a pass modify the graph, so dead code is eliminated
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(8, 4, 1)
        self.form = form
        randomize_batchnorm(self.bn)

    def forward(self, x):
        y = self.bn(self.conv(x))
        IN_PLACE_UNUSED[self.form](self, y)
        return self.head(y)


@pytest.mark.parametrize("form", list(IN_PLACE_UNUSED))
def test_in_place_activation_with_unused_result_survives_dead_code_elimination(form):
    model = InPlaceResultUnused(form).eval()
    gm = trace(model)
    (node,) = [n for n in gm.graph.nodes if not n.users and n.op != "output"]
    assert writes_in_place(node, named_modules(gm))
    finalize(gm)
    assert node in gm.graph.nodes
    assert_same_function(model, gm, torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("form", list(IN_PLACE_UNUSED))
def test_model_with_an_unused_in_place_activation_compiles(form):
    """Regression: DCE removed the activation and the compile refused a valid model (VerificationError)."""
    model = InPlaceResultUnused(form).eval()
    result = egp_export.compile(model, torch.randn(40, 3, 6, 6))
    assert any(r["pass"] == "fold_batchnorm" for r in result.report["rewrites"])
    assert_same_function(model, result.module, torch.randn(4, 3, 6, 6))


def test_pure_node_with_unused_result_is_still_removed():
    class Unused(nn.Module):
        def forward(self, x):
            F.relu(x)
            return x * 2

    gm = trace(Unused().eval())
    finalize(gm)
    assert not any(n.target is F.relu for n in gm.graph.nodes)
