"""The analytic cost model ranks merges sensibly (the measured one: tests/test_measured_cost.py)."""

from __future__ import annotations

import torch

from egp_export.algebra.convchain import ConvLayer
from egp_export.algebra.costmodel import AnalyticCost


def _conv(cin: int, cout: int, kernel: int, groups: int = 1) -> ConvLayer:
    weight = torch.zeros(cout, cin // groups, kernel, kernel, dtype=torch.float64)
    pad = kernel // 2
    return ConvLayer(weight, torch.zeros(cout, dtype=torch.float64), (1, 1), (pad, pad), (1, 1), groups)


def test_analytic_cost_grows_with_macs_and_charges_every_layer():
    cost = AnalyticCost()
    small, large = _conv(16, 16, 3), _conv(16, 16, 5)
    assert cost.conv_seconds(large, (32, 32)) > cost.conv_seconds(small, (32, 32))
    # An expand/project pair of 1x1 convs costs more than the one 1x1 conv it merges into.
    pair = cost.conv_seconds(_conv(16, 64, 1), (8, 8)) + cost.conv_seconds(_conv(64, 16, 1), (8, 8))
    assert pair > cost.conv_seconds(_conv(16, 16, 1), (8, 8))
    # Grouped convs run at a lower MAC rate than dense ones.
    dense, depthwise = _conv(32, 32, 3), _conv(32, 32, 3, groups=32)
    assert cost.conv_seconds(depthwise, (16, 16)) / depthwise.macs((16, 16)) > cost.conv_seconds(dense, (16, 16)) / dense.macs(
        (16, 16)
    )
