"""The stepwise back-off (issue 15, item 20): one marginal site no longer undoes every statistical rewrite.

A failed final check withdraws the statistically rewritten sites most marginal
first (margin on the decide split in units of each neuron's spread), each step
re-validated on the validation part, with a bounded number of held-out checks;
the all-or-nothing withdrawal stays the last resort. Numerics are checked on
fresh inputs drawn like the calibration data.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.analysis.numerics import compare
from egp_export.compiler import DEFAULT_VALIDATION
from egp_export.compiler_backoff import HELD_OUT_CHECKS, marginality
from egp_export.records import RefusalCode, RewriteKind

SAMPLES = 300
MARGINAL_SITE_WITHDRAWN = RefusalCode.MARGINAL_SITE_WITHDRAWN.value
FINAL_CHECK_FAILED = RefusalCode.FINAL_CHECK_FAILED.value


class _MarginalAndDead(nn.Module):
    """fc1 -> relu1 (every neuron ON on typical inputs, 4-6 spreads from 0: linearized, marginal) ->
    fc2 -> relu2 (8 of 16 neurons at -100: dead, the rest at +100, each ~100 spreads from 0: linearized, the dead
    channels removed) -> fc3.

    A rare input (x = -20 along fc1's row 0) turns relu1's neuron 0 OFF: where it falls in the held-out
    part only, linearizing relu1 fails the final check while relu2's dead channels stay safe."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.relu1 = nn.Linear(8, 16), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(16, 16), nn.ReLU()
        self.fc3 = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight.mul_(0.3)
            self.fc1.bias.fill_(2.0)
            self.fc2.bias[:8] = -100.0
            self.fc2.bias[8:] = 100.0

    def forward(self, x):
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


def _rare_input(model: _MarginalAndDead) -> torch.Tensor:
    row = model.fc1.weight[0].detach()
    return -20.0 * row / row.norm()


def _held_out_index() -> int:
    """A sample index the compile holds out (the split is computed as compile computes it, whatever its order)."""
    ids = torch.arange(SAMPLES, dtype=torch.float32)[:, None]
    split = split_holdout(as_batches(ids), 0.2, DEFAULT_VALIDATION)
    return int(next(iter(split.holdout))[0, 0])


def _calibration(model: _MarginalAndDead) -> torch.Tensor:
    data = torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(1))
    data[_held_out_index()] = _rare_input(model)
    return data


def _compile(model, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return egp_export.compile(model, data, min_observations=50, **kwargs)


def test_one_marginal_site_is_withdrawn_and_the_dead_channels_elsewhere_survive():
    model = _MarginalAndDead().eval()
    result = _compile(model, _calibration(model))
    report = result.report
    withdrawn = [(w["node"], w["code"]) for w in report["withdrawals"]]
    assert withdrawn == [("relu1", MARGINAL_SITE_WITHDRAWN)], report["withdrawals"]
    assert "back-off step 1" in report["withdrawals"][0]["reason"]
    kinds = {(r["kind"], r["nodes"][0]) for r in report["rewrites"]}
    assert (RewriteKind.LINEARIZED.value, "relu2") in kinds, report["rewrites"]
    assert [row["linearized"] for row in report["analysis"]["sites"]] == [False, True]
    assert [n.name for n in result.module.graph.nodes if "relu" in n.name] == ["relu1"]  # relu2 (and its dead half) gone
    assert 1 < report["verification"]["held_out_checks"] <= 1 + HELD_OUT_CHECKS
    fresh = torch.cat([torch.randn(64, 8, generator=torch.Generator().manual_seed(7)), _rare_input(model)[None]])
    with torch.no_grad():
        error = compare(model(fresh), result.module(fresh))
    assert error.within(1e-5), error


def test_the_marginal_site_is_ranked_first():
    model = _MarginalAndDead().eval()
    result = _compile(model, torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(1)))
    sites = {site.name: site for site in result.sites}
    linearized = marginality(sites["relu1"], sites["relu1"].neuron_region >= 0)
    dead = marginality(sites["relu2"], sites["relu2"].neuron_region >= 0)
    assert linearized < dead, (linearized, dead)


def test_all_or_nothing_stays_the_last_resort(monkeypatch):
    """With no held-out check left to the stepwise back-off, every statistical rewrite is withdrawn, as before."""
    monkeypatch.setattr("egp_export.compiler_backoff.HELD_OUT_CHECKS", 0)
    model = _MarginalAndDead().eval()
    result = _compile(model, _calibration(model))
    codes = {(w["node"], w["code"]) for w in result.report["withdrawals"]}
    assert codes == {("relu1", FINAL_CHECK_FAILED), ("relu2", FINAL_CHECK_FAILED)}, codes
    assert result.report["verification"]["held_out_checks"] == 2
