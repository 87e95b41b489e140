"""The stepwise back-off (issue 15, item 20): one marginal site no longer undoes every statistical rewrite.

A failed final check withdraws the statistically rewritten sites most marginal
first (margin on the decide split in units of each neuron's spread), each step
re-validated on the validation part, with a bounded number of held-out checks;
the all-or-nothing withdrawal stays the last resort. Numerics are checked on
fresh inputs drawn like the calibration data.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.analysis.numerics import ErrorStats, compare
from egp_export.compiler import DEFAULT_VALIDATION
from egp_export.compiler_backoff import EVERY_NODE, HELD_OUT_CHECKS, marginality, withdraw_exact_rewrites
from egp_export.errors import VerificationError
from egp_export.records import Reason, RefusalCode, Rewrite, RewriteKind

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


# Exact rewrites on ill-conditioned models (issue 15, item 22) ------------------------------------------------------

EXACT_REWRITE_WITHDRAWN = RefusalCode.EXACT_REWRITE_WITHDRAWN.value


def _cancelling_pair(scale: float, bias: float) -> tuple[nn.Linear, nn.Linear]:
    """Linear(8, 64) with weights ~``scale`` and bias ``bias``, then Linear(64, 8) with weights ~1/``scale`` and the
    bias that cancels ``bias``: the output is ~8 while the hidden values are ~``bias``, so with bias 1e6 the model's
    own float32 rounding is ~5e-4 relative (above the 1e-4 cap) and the merged Linear, computed in float64 and rounded
    once, differs from it by ~3e-4."""
    first, second = nn.Linear(8, 64), nn.Linear(64, 8)
    with torch.no_grad():
        first.weight.normal_(0, scale)
        first.bias.fill_(bias)
        second.weight.normal_(0, 1 / scale)
        second.bias.copy_(-(second.weight.double() @ first.bias.double()).float())
    return first, second


class _IllConditionedBranches(nn.Module):
    """Three outputs: an ill-conditioned Linear pair (bias 1e6), a well-conditioned one (bias 1e3) and Linear -> BN.

    Merge/fold all three and the first output moves by ~3e-4 against the original's float32 output, above the capped
    1e-4 allowance; the other two are exact to ~1e-7. ``bad_first`` puts the ill-conditioned pair first or last in
    graph order (the bisection then keeps the first half or drops the second)."""

    def __init__(self, bad_bias: float = 1e6, *, bad_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bad1, self.bad2 = _cancelling_pair(100.0, bad_bias)
        self.good1, self.good2 = _cancelling_pair(100.0, 1e3)
        self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()
        self.bad_first = bad_first

    def forward(self, x):
        if self.bad_first:
            bad = self.bad2(self.bad1(x))
            good = self.good2(self.good1(x))
        else:
            good = self.good2(self.good1(x))
            bad = self.bad2(self.bad1(x))
        return bad, good, self.bn(self.lin(x))


def _exact_data(seed: int = 1) -> torch.Tensor:
    return torch.randn(400, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad_first", [True, False])
def test_an_exact_merge_beyond_the_allowance_is_withdrawn_and_the_safe_rewrites_stay(bad_first):
    """Before: VerificationError ("no rewrite rests on calibration statistics ... run with --debug")."""
    model = _IllConditionedBranches(bad_first=bad_first).eval()
    result = _compile(model, _exact_data())
    report = result.report
    withdrawn = [(w["code"], w["detail"]["pass"], w["detail"]["nodes"]) for w in report["withdrawals"]]
    assert withdrawn == [(EXACT_REWRITE_WITHDRAWN, "merge_linear_chains", ["bad1", "bad2"])], report["withdrawals"]
    detail = report["withdrawals"][0]["detail"]
    assert detail["error_after"] > detail["allowed"] == report["verification"]["pytorch"]["rtol"] == 1e-4
    assert "'bad1', 'bad2'" in report["withdrawals"][0]["reason"]
    kept = {(r["kind"], tuple(r["nodes"])) for r in report["rewrites"]}
    assert kept == {
        (RewriteKind.LINEAR_MERGED.value, ("good1", "good2")), (RewriteKind.BN_FOLDED.value, ("bn",)),
    }, kept
    assert report["verification"]["held_out_checks"] == 2
    targets = {n.target for n in result.module.graph.nodes if n.op == "call_module"}
    assert {"bad1", "bad2"} <= targets and "good2" not in targets and "bn" not in targets
    fresh = _exact_data(seed=7)
    with torch.no_grad():
        error = compare(model(fresh), result.module(fresh))
    assert error.within(report["guarantee"]["allowed"]), error


def test_exact_rewrites_within_the_allowance_are_all_kept():
    model = _IllConditionedBranches(bad_bias=1e3).eval()
    report = _compile(model, _exact_data()).report
    assert report["withdrawals"] == []
    kinds = sorted(r["kind"] for r in report["rewrites"])
    assert kinds == sorted([RewriteKind.LINEAR_MERGED.value] * 2 + [RewriteKind.BN_FOLDED.value]), kinds
    assert report["verification"]["held_out_checks"] == 1


class _TracesDifferently(nn.Module):
    """Eager: x. Traced: (x + 1e4) - 1e4, ~5e-4 off: no rewrite is at fault, the graph itself is."""

    def forward(self, x):
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            return (x + 1e4) - 1e4
        return x


def test_a_graph_that_fails_with_every_rewrite_withheld_is_refused_as_the_models_own_numerics():
    with pytest.raises(VerificationError, match="model's own numerics") as raised:
        _compile(_TracesDifferently(), _exact_data())
    assert "Even with every fold and merge withheld" in str(raised.value)


class _Candidate:
    def __init__(self, rewrites) -> None:
        self.pipeline = types.SimpleNamespace(rewrites=rewrites)


def test_a_rewrite_its_pass_cannot_withhold_ends_in_the_last_resort():
    """The culprit's pass makes it again although its nodes are withheld: no progress, so every rewrite is withheld."""
    stubborn = Rewrite("stubborn_pass", RewriteKind.LINEAR_MERGED, ("a", "b"))
    fine = Rewrite("fine_pass", RewriteKind.BN_FOLDED, ("bn",))
    builds = []

    def build(withheld, observe):
        builds.append(withheld)
        if withheld is EVERY_NODE:
            return _Candidate([stubborn])
        if observe is not None:
            observe("fine_pass", None, [fine])
            observe("stubborn_pass", "merged", [stubborn])  # ignores ``withheld``
        return _Candidate([fine, stubborn])

    def measure(gm):
        return ErrorStats(0.0, 1.0 if gm == "merged" else 0.0)

    failed = Reason(RefusalCode.FINAL_CHECK_FAILED, {"max_rel": 1.0, "allowed": 1e-4, "verification_samples": 8})
    result = withdraw_exact_rewrites(
        failed, [fine, stubborn], build, measure, lambda c: (ErrorStats(0.0, 0.0), 1e-4), 1e-4, ("validation", 8),
        "verification",
    )
    assert builds == [frozenset(), frozenset({"a", "b"}), EVERY_NODE]
    assert result.passed and result.held_out_checks == 1
    # The stubborn rewrite is made even there, so it is not reported as withdrawn; the BN fold is.
    assert [(w.node, w.code) for w in result.withdrawals] == [("bn", RefusalCode.FINAL_CHECK_FAILED)]


def test_a_held_out_failure_the_validation_part_hides_is_searched_with_a_tighter_limit():
    """Validation errors just under the allowance are suspect once the held-out check failed: the limit is halved."""
    merge = Rewrite("merge_linear_chains", RewriteKind.LINEAR_MERGED, ("a", "b"))
    builds = []

    def build(withheld, observe):
        builds.append(withheld)
        made = [] if "a" in withheld or withheld is EVERY_NODE else [merge]
        if observe is not None and made:
            observe("merge_linear_chains", "merged", made)
        return _Candidate(made)

    def measure(gm):
        return ErrorStats(0.0, 0.6e-4 if gm == "merged" else 0.0)  # under the 1e-4 allowance, over half of it

    failed = Reason(RefusalCode.FINAL_CHECK_FAILED, {"max_rel": 2e-4, "allowed": 1e-4, "verification_samples": 8})
    result = withdraw_exact_rewrites(
        failed, [merge], build, measure, lambda c: (ErrorStats(0.0, 0.0), 1e-4), 1e-4, ("validation", 8), "verification",
    )
    assert builds == [frozenset(), frozenset(), frozenset({"a", "b"})]
    assert result.passed and result.held_out_checks == 1
    assert [(w.node, w.code, w.reason.detail["limit"]) for w in result.withdrawals] == [
        ("b", RefusalCode.EXACT_REWRITE_WITHDRAWN, 0.5e-4),
    ]
