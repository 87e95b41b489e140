"""Issue 16 items 1-4: CompileOptions checks every option in one place, the compile runs as named stages whose events
are its only clock, per-site decisions are immutable SitePlans filtered plan -> plan, and the padding plan runs the
compile's own stages."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.analysis.numerics import compare
from egp_export.analysis.plans import SiteAction, plan_site, site_plan
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.compile_options import CompileOptions
from egp_export.compiler import StageEvent
from egp_export.errors import CalibrationError, EgpExportError, OptionError
from egp_export.padding import padding_plan
from egp_export.plan_filters import withdraw_thin_evidence
from egp_export.records import Reason, RefusalCode
from tests.test_compiler_backoff import _calibration, _MarginalAndDead

STAGES = ("prepare", "capture", "calibrate", "decide", "rewrite", "verify")


# Item 1: CompileOptions -------------------------------------------------------------------------------------------


class _World2:
    rank, world_size = 0, 2


@pytest.mark.parametrize(
    ("field", "value", "error", "message"),
    [
        ("tolerance", -1e-5, CalibrationError, "tolerance must be a finite number >= 0"),
        ("tolerance", math.inf, CalibrationError, "tolerance must be a finite number >= 0"),
        ("tolerance", math.nan, CalibrationError, "tolerance must be a finite number >= 0"),
        ("tolerance", True, CalibrationError, "tolerance must be a finite number >= 0"),
        ("holdout", 1.0, CalibrationError, "holdout fraction must be in"),
        ("holdout", "0.2", CalibrationError, "holdout fraction must be in"),
        ("validation", -0.1, CalibrationError, "validation fraction must be in"),
        ("min_observations", -1, CalibrationError, "min_observations must be >= 0"),
        ("min_observations", 2.5, CalibrationError, "min_observations must be >= 0"),
        ("crossing_radius", -0.1, CalibrationError, "crossing_radius must be a finite number >= 0"),
        ("crossing_radius", math.inf, CalibrationError, "crossing_radius must be a finite number >= 0"),
        ("crossing_radius", math.nan, CalibrationError, "crossing_radius must be a finite number >= 0"),
        ("batch_size", 0, OptionError, "batch_size must be an integer >= 1"),
        ("channel_alignment", 0, OptionError, "channel_alignment must be an integer >= 1"),
        ("merge_plan", "some", OptionError, "merge_plan must be one of cost, all"),
        ("frontend", "torchscript", OptionError, "frontend must be one of"),
        ("cost_model", "fast", OptionError, "cost_model must be 'analytic', 'measured' or a cost object"),
    ],
)
def test_each_bad_option_is_refused_when_the_options_are_made(field, value, error, message):
    with pytest.raises(error, match=message):
        CompileOptions(**{field: value})
    with pytest.raises(error, match=message):  # an override is checked the same way
        CompileOptions().but(**{field: value})


def test_the_measured_cost_model_is_refused_under_torchrun():
    CompileOptions(cost_model="measured")  # one process: fine
    with pytest.raises(EgpExportError, match="measured cost model times convolutions in each process"):
        CompileOptions(cost_model="measured", runtime=_World2())


def test_an_unknown_option_is_refused_by_name():
    with pytest.raises(TypeError, match="unknown option.*tolerence"):
        CompileOptions().but(tolerence=1e-3)


def test_options_are_frozen_and_keyword_overrides_win():
    options = CompileOptions(tolerance=1e-5, min_observations=1, leaf_modules=["0"])
    assert options.leaf_modules == ("0",)
    assert CompileOptions(min_observations=np.int64(3), holdout=np.float32(0.25)).min_observations == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tolerance = 1.0
    data = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    overridden = egp_export.compile(model, data, options=options, tolerance=1e-3, leaf_modules=())
    assert overridden.report["tolerance"] == 1e-3 and overridden.report["guarantee"]["min_observations"] == 1
    assert options.tolerance == 1e-5
    with pytest.raises(CalibrationError, match="tolerance must be"):
        egp_export.compile(model, data, options=options, tolerance=-1.0)


# Item 2: named stages, one clock --------------------------------------------------------------------------------


def test_a_failed_check_adds_the_back_off_stage_between_verify_and_report():
    model = _MarginalAndDead().eval()
    events: list[StageEvent] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, _calibration(model), min_observations=50, on_stage=events.append)
    assert [(e.stage, e.done) for e in events] == [
        (name, done) for name in (*STAGES, "back-off", "report") for done in (False, True)
    ]
    back_off = next(e for e in events if e.done and e.stage == "back-off")
    assert back_off.facts["passed"] and back_off.facts["withdrawn"] == 1
    assert result.report["seconds"] == {e.stage: round(e.seconds, 3) for e in events if e.done}
    # The kept site carries the plan the back-off left: keep, with the back-off's reason.
    (relu1,) = [n for n in result.module.graph.nodes if n.name == "relu1"]
    plan = site_plan(relu1)
    assert plan.action is SiteAction.KEEP and plan.refusal.code is RefusalCode.MARGINAL_SITE_WITHDRAWN


# Item 3: immutable plans, filters plan -> plan --------------------------------------------------------------------


def _planned():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))
    (site,) = calibrate(trace(model), as_batches(torch.randn(16, 3, generator=torch.Generator().manual_seed(0))))
    return site, plan_site(site, 1e-5)


def test_a_plan_is_immutable_and_withdrawing_returns_a_new_plan():
    site, plan = _planned()
    assert plan.action is SiteAction.LINEARIZE and plan.slope == (1.0, 1.0, 0.0, 0.0) and plan.refusal is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.action = SiteAction.KEEP
    with pytest.raises(TypeError):
        plan.dead[0] = False  # a tuple: nothing can write into the decision

    reason = Reason(RefusalCode.CROSSED_UNDER_PERTURBATION, {"neurons": 1})
    withdrawn = plan.withdraw(torch.tensor([False, False, True, False]), reason)
    assert plan.action is SiteAction.LINEARIZE and plan.withdrawn == ()  # the original is unchanged
    # Neuron 2 leaves the linearization and the dead mask; neuron 3 stays masked.
    assert withdrawn.action is SiteAction.MASK_DEAD and withdrawn.slope is None and withdrawn.refusal == reason
    assert withdrawn.dead_mask().tolist() == [False, False, False, True]
    again = withdrawn.withdraw_all(Reason(RefusalCode.FINAL_CHECK_FAILED))
    assert again.action is SiteAction.KEEP and again.refusal.code is RefusalCode.WITHDRAWN
    assert [r.code for r in again.refusal.detail["reasons"]] == [
        RefusalCode.CROSSED_UNDER_PERTURBATION, RefusalCode.FINAL_CHECK_FAILED
    ]


def test_a_filter_returns_new_plans_and_leaves_its_input_alone():
    site, plan = _planned()
    plans = {site.name: plan}
    thin = withdraw_thin_evidence(plans, [site], min_observations=10**6, distinct=16, total=16)
    assert plans == {site.name: plan} and plan.action is SiteAction.LINEARIZE
    assert thin[site.name].action is SiteAction.KEEP and thin[site.name].refusal.code is RefusalCode.THIN_EVIDENCE
    assert withdraw_thin_evidence(plans, [site], min_observations=1, distinct=16, total=16) == plans


# Item 4: the padding plan runs the compile's own stages -------------------------------------------------------------

PADDING_SAMPLES = 100


class _PaddedPair(nn.Module):
    """conv1 (3x3, padding 1, its ReLU ON on non-negative images) -> relu -> conv2 (3x3, padding 1): once the ReLU
    is linear the chain merges only approximately at the border, so the padding plan moves conv2's padding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.relu, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.abs_()
            self.conv1.bias.fill_(0.5)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def _padding_data(negative_in_validation: bool) -> torch.Tensor:
    data = torch.rand(PADDING_SAMPLES, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    if negative_in_validation:  # one validation sample turns conv1's neurons OFF: validation withdraws the ReLU
        ids = torch.arange(PADDING_SAMPLES, dtype=torch.float32)[:, None]
        validate = split_holdout(as_batches(ids), 0.2, 0.2).validate
        data[int(next(iter(validate))[0, 0])] = -10.0
    return data


@pytest.mark.parametrize("negative_in_validation", [False, True])
def test_the_padding_plan_decides_the_sites_the_compile_decides(negative_in_validation):
    model, data = _PaddedPair().eval(), _padding_data(negative_in_validation)
    options = CompileOptions(min_observations=1, crossing_radius=0.0)
    compiled = egp_export.compile(model, data, options)
    moves = padding_plan(model, data, options)
    withdrawn = [w["code"] for w in compiled.report["withdrawals"] if w["node"] == "relu"]
    if negative_in_validation:
        assert withdrawn == [RefusalCode.LEFT_REGION_ON_VALIDATION.value]
        assert moves == []  # the ReLU the compile keeps is no linear chain
    else:
        assert withdrawn == [] and compiled.report["activations_linearized"] == 1
        assert [m.convs for m in moves] == [("conv1", "conv2")] and moves[0].after == ((2, 2), (0, 0))
    fresh = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(9))  # drawn like the calibration data
    with torch.no_grad():
        assert compare(model(fresh), compiled.module(fresh)).within(1e-5)
