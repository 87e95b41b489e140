"""fold_residuals: x + conv(x) becomes one conv; refusals fire with their reasons."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.nn as nn

from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.numerics import compare
from egp_export.analysis.trace import trace
from egp_export.passes import FoldResiduals, finalize
from egp_export.records import RefusalCode


class Residual(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return x + self.conv(x)


def _run(model, shape):
    model.eval()
    gm = trace(model)
    propagate_shapes(gm, torch.randn(1, *shape))
    result = FoldResiduals()(gm)
    finalize(gm)
    return gm, result


def _adds(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "add" in getattr(n.target, "__name__", ""))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 6, 3, padding=1),
        nn.Conv2d(6, 6, 1),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),
        nn.Conv2d(6, 6, 5, padding=4, dilation=2, bias=False),
        nn.Conv1d(6, 6, 3, padding=1),
    ],
    ids=["3x3", "1x1", "depthwise", "dilated", "conv1d"],
)
def test_residual_folds_exactly(conv):
    model = Residual(conv)
    shape = (6, 9, 9) if isinstance(conv, nn.Conv2d) else (6, 9)
    gm, result = _run(model, shape)
    assert result.modified and _adds(gm) == 0
    gm.graph.lint()
    fresh = torch.randn(3, *shape)
    with torch.no_grad():
        assert compare(model(fresh), gm(fresh)).max_rel <= 1e-6
    buffer = io.BytesIO()
    torch.onnx.export(gm, (torch.randn(1, *shape),), buffer, dynamo=False)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))


@pytest.mark.parametrize(
    "conv, reason",
    [
        (nn.Conv2d(6, 1, 3, padding=1), RefusalCode.SHAPE_CHANGES),  # broadcast over channels
        (nn.Conv2d(6, 6, 2, padding="same"), RefusalCode.PADDING_UNSUPPORTED),
        (nn.Conv2d(6, 6, 3, padding=1, groups=2), RefusalCode.GROUPED),
    ],
    ids=["broadcast", "even-kernel", "grouped"],
)
def test_refusals_name_the_reason(conv, reason):
    model = Residual(conv)
    gm, result = _run(model, (6, 8, 8))
    assert not result.modified and _adds(gm) == 1
    assert any(r.code is reason for r in result.refusals), result.refusals


def test_shared_conv_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + x + self.conv(x)

    model = Twice()
    gm, result = _run(model, (4, 6, 6))
    assert any(r.code is RefusalCode.SHARED_WEIGHT for r in result.refusals)
    fresh = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert compare(model(fresh), gm(fresh)).max_rel <= 1e-6


class LinearResidual(nn.Module):
    def __init__(self, linear: nn.Module, order: str = "skip-first"):
        super().__init__()
        self.linear, self.order = linear, order

    def forward(self, x):
        return x + self.linear(x) if self.order == "skip-first" else self.linear(x).add(x)


@pytest.mark.parametrize(
    "linear, order, shape",
    [
        (nn.Linear(6, 6), "skip-first", (6,)),
        (nn.Linear(6, 6, bias=False), "skip-first", (4, 6)),  # tokens: [B, N, C]
        (nn.Linear(6, 6), "branch-first", (4, 6)),
    ],
    ids=["vector", "tokens-no-bias", "method-add"],
)
def test_a_square_linear_residual_folds_exactly(linear, order, shape):
    """x + (W x + b) = (W + I) x + b: a transformer MLP whose activation became the identity, once merged."""
    model = LinearResidual(linear, order)
    gm, result = _run(model, shape)
    assert result.modified and _adds(gm) == 0 and not any(n.op == "call_method" for n in gm.graph.nodes)
    assert [r.detail["linear"] for r in result.rewrites] == ["linear"]
    gm.graph.lint()
    fresh = torch.randn(3, *shape)
    with torch.no_grad():
        assert compare(model(fresh), gm(fresh)).max_rel <= 1e-6
    buffer = io.BytesIO()
    torch.onnx.export(gm, (fresh,), buffer, dynamo=False)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))


def test_a_linear_residual_that_broadcasts_is_refused():
    """x + linear(x) with a 6 -> 1 linear broadcasts its one output over x: no W + I to form."""
    gm, result = _run(LinearResidual(nn.Linear(6, 1)), (6,))
    assert not result.modified
    assert [r.reason.code for r in result.refusals] == [RefusalCode.SHAPE_CHANGES]
