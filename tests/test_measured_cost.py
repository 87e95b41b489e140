"""The measured cost model times, caches and reloads, and drives the compiler's merge planner."""

from __future__ import annotations

import json

import torch

from egp_export.measured_cost import MeasuredCost
from tests.algebra.test_costmodel import _conv


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
