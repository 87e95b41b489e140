"""Cost models: the analytic one ranks merges sensibly; the measured one times, caches and reloads."""

from __future__ import annotations

import json

import torch

from egp_export.algebra.convchain import ConvLayer
from egp_export.algebra.costmodel import AnalyticCost, MeasuredCost


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


def test_measured_cost_times_once_caches_and_reloads(tmp_path):
    cache = tmp_path / "latency.json"
    cost = MeasuredCost(cache, repeats=3)
    layer = _conv(8, 8, 3)
    first = cost.conv_seconds(layer, (8, 8))
    assert first > 0 and cost.measured == 1
    assert cost.conv_seconds(layer, (8, 8)) == first and cost.measured == 1  # cached, not re-timed
    cost.save()
    assert len(json.loads(cache.read_text())) == 1
    reloaded = MeasuredCost(cache, repeats=3)
    assert reloaded.conv_seconds(layer, (8, 8)) == first and reloaded.measured == 0


def test_measured_cost_drives_the_compiler(tmp_path, monkeypatch):
    import egp_export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 1)).eval()
    result = egp_export.compile(model, torch.randn(16, 3, 8, 8), cost_model="measured")
    assert result.report["predicted_conv_latency_us"]["cost_model"].startswith("measured")
    assert (tmp_path / "egp-export" / "latency-ort-cpu-1t.json").exists()
