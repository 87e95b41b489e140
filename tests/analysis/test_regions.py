"""report["regions"] (analysis/regions.py): what each statistically rewritten site was decided to be, and a recheck of
it on a three-region activation (ReLU6: 0 | z | 6) without a compile."""

from __future__ import annotations

import json

import torch
from torch import nn

from egp_export.analysis.plans import plan_site
from egp_export.analysis.regions import DEAD_MASKED, LINEARIZED, site_regions
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.export.onnx import export_onnx
from egp_export.records import Rewrite, RewriteKind
from egp_export.runtime.recheck import EXIT_DRIFTED, EXIT_HOLDS, recheck


class Clamped(nn.Module):
    """Linear -> ReLU6 whose four neurons sit in the middle, above 6, below 0 and (``crossing``) across 0."""

    def __init__(self, crossing: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 4)
        self.act = nn.ReLU6()
        with torch.no_grad():
            self.fc.weight.fill_(0.1)
            self.fc.bias.copy_(torch.tensor([3.0, 100.0, -100.0, 0.0 if crossing else 3.0]))

    def forward(self, x):
        return self.act(self.fc(x))


def _data(samples: int, shift: float = 0.0) -> torch.Tensor:
    return torch.rand(samples, 2, generator=torch.Generator().manual_seed(samples)) + shift


def _sites(model: nn.Module, data: torch.Tensor):
    return calibrate(trace(model), [data])


def _plans(sites) -> dict:
    return {site.name: plan_site(site, 1e-5) for site in sites}


def _rewrite(kind: RewriteKind) -> Rewrite:
    return Rewrite("linearize_activations", kind, ("act",))


def test_a_linearized_site_records_each_neurons_region_and_map():
    model = Clamped(crossing=False).eval()
    sites = _sites(model, _data(64))

    regions = site_regions(sites, _plans(sites), [_rewrite(RewriteKind.LINEARIZED)], model=model)

    (record,) = regions["sites"]
    assert record["rewrite"] == LINEARIZED and record["boundaries"] == [0.0, 6.0]
    assert record["rewritten"] == [0, 1, 2, 3] and record["region"] == [1, 2, 0, 1]
    assert record["slope"] == [1.0, 0.0, 0.0, 1.0] and record["intercept"] == [0.0, 6.0, 0.0, 0.0]
    assert 2.8 < record["min_margin"] <= 3.0  # neuron 0 and 3: z in [3, 3.2], 3 from both boundaries
    json.dumps(regions, allow_nan=False)  # strict JSON


def test_a_masked_site_records_its_dead_neurons_only_and_no_other_site():
    model = Clamped(crossing=True).eval()
    sites = _sites(model, _data(64, -0.5))

    regions = site_regions(sites, _plans(sites), [_rewrite(RewriteKind.DEAD_MASKED)], model=model)
    untouched = site_regions(sites, _plans(sites), [_rewrite(RewriteKind.BN_FOLDED)], model=model)

    (record,) = regions["sites"]
    assert record["rewrite"] == DEAD_MASKED and record["rewritten"] == [2] and record["region"] == [0]
    assert untouched["sites"] == []


def test_recheck_finds_a_neuron_that_left_the_saturated_region(tmp_path):
    """A report built by hand around the model's own ONNX file: the outputs agree, so only the site can fail."""
    model = Clamped(crossing=False).eval()
    calibration = _data(64)
    sites = _sites(model, calibration)
    regions = site_regions(sites, _plans(sites), [_rewrite(RewriteKind.LINEARIZED)], model=model)
    export_onnx(model, calibration[:2], tmp_path / "model.onnx", exporter="torchscript")
    report = {"regions": regions, "guarantee": {"allowed": 1e-5}, "calibration": {"sample_shape": [2]}}

    holds = recheck(model, report, tmp_path / "model.onnx", _data(32))
    # Inputs near -500 take neuron 1 (bias 100) below 6 and neurons 0 and 3 below 0; neuron 2 stays at 0.
    drifted = recheck(model, report, tmp_path / "model.onnx", torch.full((32, 2), -500.0))

    assert holds.exit_code == EXIT_HOLDS and holds.outputs_hold
    assert drifted.exit_code == EXIT_DRIFTED and drifted.outputs_hold
    assert drifted.sites[0].left == [0, 1, 3] and drifted.sites[0].min_margin < 0
