"""``compile``: trace → calibrate → rewrite → verify on held-out data → report.

The calibration samples are split three ways (analysis/batches.py): rewrites
are *decided* on the first part, *validated* on the second (which can only
withdraw them), and the compiled module is *verified* against the original on
the last, which decides nothing. Without ``strict``, a compile backs off
instead of giving up: neurons that leave their region on validation data lose
their rewrite (the activation stays, or they leave the dead mask), and if the
final check still fails, every rewrite that rests on calibration statistics is
withdrawn and the data-independent rest (BatchNorm folding, merges of chains
that were already linear) is compiled and checked again. Every withdrawal is
reported with its reason and numbers.

What the final check allows (``verification_rtol``): exact rewrites are held
to fp32 rounding, max(1e-5, 8x the original model's own fp32-vs-fp64 noise)
but never more than 1e-4; approximations (smooth-activation surrogates,
border-approximate merges) add at most the user's ``tolerance`` on top of that
floor, so the noise never covers them.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export import __version__
from egp_export.algebra.costmodel import AnalyticCost, MeasuredCost
from egp_export.analysis.batches import DEFAULT_BATCH_SIZE, CalibrationSplit, as_batches, split_holdout
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.numerics import FP32_RTOL, NOISE_CAP, NOISE_FACTOR, ErrorStats, compare, fp32_noise
from egp_export.analysis.stats import SiteStats, calibrate, summarize_sites
from egp_export.analysis.summary import summarize
from egp_export.analysis.trace import owned_copy, trace
from egp_export.errors import CalibrationError, VerificationError
from egp_export.passes import CHANNEL_ALIGNMENT, PassManager, PipelineResult, Step, conv_seconds, default_steps


@dataclass
class CompileResult:
    """The compiled module (same call signature, fewer layers) and the JSON-serialisable report."""

    module: fx.GraphModule
    report: dict
    sites: list[SiteStats]


# Samples the fp32-vs-fp64 noise of the original model is measured on (fp64
# convolutions are slow on CPU; a few samples show the conditioning).
NOISE_SAMPLES = 4
# Fraction of the calibration samples (before the verification part) used only to withdraw rewrites.
DEFAULT_VALIDATION = 0.2
# A site is rewritten only if each neuron was observed at least this often
# (samples x positions) on the decide split: with n observations and no
# crossing, the 95% bound on the crossing rate is 3/n (0.6% at 500). A
# squeeze-excitation site sees one observation per sample, so it needs 500
# samples where a conv site on 8x8 maps needs 8.
DEFAULT_MIN_OBSERVATIONS = 500
# Models in these dtypes are compiled and verified in float32 (half-precision
# rounding would hide wrong rewrites: 5e-2 relative error "verified" in bf16).
_WIDENED_DTYPES = (torch.float16, torch.bfloat16)

# Two runs of the model on the same input may differ by this much (relative):
# nondeterministic GPU reductions round differently (~1e-7), far below what
# verification allows; dropout left on differs by O(1).
DETERMINISM_RTOL = 1e-6

# Withdrawal codes (report["withdrawals"][i]["code"]).
LEFT_REGION_ON_VALIDATION = "LEFT_REGION_ON_VALIDATION"
SURROGATE_OFF_ON_VALIDATION = "SURROGATE_OFF_ON_VALIDATION"
FINAL_CHECK_FAILED = "FINAL_CHECK_FAILED"


def verification_rtol(tolerance: float, noise: float = 0.0, *, approximated: bool = False) -> float:
    """What the final check allows, relative to the output scale.

    Exact rewrites: the floor max(1e-5, NOISE_FACTOR x the original model's
    own fp32-vs-fp64 error), capped at NOISE_CAP (1e-4). Approximations
    (surrogates, border-approximate merges) may add the user's ``tolerance``
    on top of the floor: floor + tolerance. Without approximations the user's
    tolerance, where larger, also covers exact rewrites.
    """
    floor = noise_floor(noise)
    return floor + tolerance if approximated else max(floor, tolerance)


def noise_floor(noise: float) -> float:
    """max(1e-5, 8 x noise), never above NOISE_CAP; a non-finite noise measurement counts as the cap."""
    raised = NOISE_FACTOR * noise if noise == noise else NOISE_CAP
    return max(FP32_RTOL, min(raised, NOISE_CAP))


def _outputs(module: nn.Module, batches: list[torch.Tensor]) -> list:
    with torch.no_grad():
        return [module(batch) for batch in batches]


def _working_copy(model: nn.Module) -> tuple[nn.Module, dict]:
    """A copy of ``model`` to compile (the caller's object is never run), in fp32 if it was fp16/bf16.

    Returns the copy and the dtype facts the report states.
    """
    if not isinstance(model, nn.Module):
        trace(model)  # raises the TraceError that names the problem
    working = owned_copy(model)
    floating = {t.dtype for t in [*working.parameters(), *working.buffers()] if t.is_floating_point()}
    model_dtype = ", ".join(sorted(str(d).removeprefix("torch.") for d in floating)) or "float32"
    widened = sorted(str(d).removeprefix("torch.") for d in floating if d in _WIDENED_DTYPES)
    facts = {"model_dtype": model_dtype, "compiled_dtype": model_dtype, "note": None}
    if widened:
        working = working.float()
        facts["compiled_dtype"] = "float32"
        facts["note"] = (
            f"the model holds {', '.join(widened)} weights; it was compiled and verified in float32 (the compiled "
            "module runs in float32; cast it back with .to(dtype) and expect that dtype's rounding)"
        )
        warnings.warn(f"egp-export: {facts['note']}", UserWarning, stacklevel=3)
    return working, facts


def _check_deterministic(reference: nn.Module, batch: torch.Tensor) -> None:
    """Refuse a model that gives different outputs for the same input twice: nothing could be verified against it."""
    first, second = _outputs(reference, [batch, batch])
    drift = compare(first, second)
    if not drift.within(DETERMINISM_RTOL):
        raise VerificationError(
            f"the model is not deterministic: the same input gave outputs {drift.max_rel:.3g} apart (relative) on two "
            "runs in eval mode, so no compiled copy can be verified against it. Remove randomness from forward() in "
            "eval mode (dropout with training=True, torch.rand*, state updated in forward) before compiling."
        )


def _withdraw_thin_evidence(sites: list[SiteStats], tolerance: float, min_observations: int) -> None:
    """Sites whose rewrite would rest on fewer than ``min_observations`` observations per neuron stay as they are."""
    for site in sites:
        if site.observations >= min_observations or site.observations == 0:
            continue
        if site.linear_map(tolerance).ok or site.dead_neurons().any():
            site.withdraw(
                torch.ones(site.num_neurons, dtype=torch.bool),
                f"evidence too thin: {site.observations} observations per neuron ({site.samples} samples x "
                f"{site.positions} positions) < min_observations {min_observations}; the 95% bound on how often a "
                f"neuron leaves its region would be 3/{site.observations} = {3 / site.observations:.2g}",
            )


def _surrogate_error(site: SiteStats, low: torch.Tensor, high: torch.Tensor, tolerance: float) -> float:
    """Largest deviation of the site's decided affine surrogate from the activation on [low, high] per neuron."""
    linear = site.linear_map(tolerance)
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    grid = low[:, None] + (high - low)[:, None] * t[None, :]
    return float((site.spec.fn(grid) - (linear.scale[:, None] * grid + linear.shift[:, None])).abs().max())


def _withdraw_on_validation(
    reference: nn.Module, sites: list[SiteStats], validate: list[torch.Tensor], tolerance: float
) -> list[dict]:
    """Withdraw the rewrites of neurons the validation samples show outside the region they were decided in.

    Validation can only take rewrites away: a piecewise-linear neuron that
    was seen in a second region keeps its activation (the site stays) or
    leaves the dead mask; a smooth site whose surrogate is off by more than
    the tolerance on the validation range keeps its activation.
    """
    if not validate:
        return []
    seen = {s.name: s for s in calibrate(trace(reference), validate)}
    withdrawals = []
    samples = sum(len(b) for b in validate)
    for site in sites:
        other = seen.get(site.name)
        if other is None or other.observations == 0:
            continue
        linear = site.linear_map(tolerance)
        if site.spec.smooth:
            if not linear.ok:
                continue
            low, high = torch.minimum(site.low, other.low), torch.maximum(site.high, other.high)
            error, allowed = _surrogate_error(site, low, high, tolerance), tolerance * site.output_scale()
            if error > allowed:
                site.withdraw(
                    torch.ones(site.num_neurons, dtype=torch.bool),
                    f"surrogate withdrawn: off by {error:.3g} on the validation range (> {allowed:.3g})",
                )
                withdrawals.append(
                    {"code": SURROGATE_OFF_ON_VALIDATION, "site": site.name, "neurons": site.num_neurons,
                     "rewrite": "affine surrogate", "error": error, "allowed": allowed, "validation_samples": samples}
                )
            continue
        rewritten = site.neuron_region >= 0 if linear.ok else site.dead_neurons()
        region = site.neuron_region.clamp_min(0)
        elsewhere = other.region_counts > 0
        elsewhere[region, torch.arange(site.num_neurons)] = False
        left = rewritten & elsewhere.any(0)
        if not left.any():
            continue
        rewrite = "linearized" if linear.ok else "dead mask"
        count = int(left.sum())
        site.withdraw(left, f"{count} neurons left their region on {samples} validation samples ({rewrite} withdrawn)")
        withdrawals.append(
            {"code": LEFT_REGION_ON_VALIDATION, "site": site.name, "neurons": count, "rewrite": rewrite,
             "neuron_indices": [int(i) for i in left.nonzero().flatten()[:32]], "validation_samples": samples}
        )
    return withdrawals


def _sites_leaving_region(
    reference: nn.Module, sites: list[SiteStats], holdout: list[torch.Tensor], tolerance: float
) -> list[str]:
    """Sites with neurons that stayed in one region on calibration data but not on held-out data.

    Those neurons were rewritten (linearized or masked as dead) on the strength
    of the calibration data alone; they are the usual cause of a failed check.
    """
    held = {s.name: s for s in calibrate(trace(reference), holdout)}
    moved = []
    for site in sites:
        other = held.get(site.name)
        if other is None or site.spec.smooth:
            continue
        rewritten = site.neuron_region >= 0 if site.linear_map(tolerance).ok else site.dead_neurons()
        left = rewritten & (other.neuron_region != site.neuron_region)
        if bool(left.any()):
            moved.append(f"{site.name} ({int(left.sum())} neurons)")
    return moved


def resolve_cost_model(cost_model):
    """A cost object from ``None``/"analytic"/"measured" or one given as is."""
    if cost_model is None or cost_model == "analytic":
        return AnalyticCost()
    if cost_model == "measured":
        return MeasuredCost()
    if hasattr(cost_model, "conv_seconds"):
        return cost_model
    raise ValueError(f"cost_model must be 'analytic', 'measured' or a cost object, got {cost_model!r}")


def _site_actions(sites: list[SiteStats], rewrites: list, refusals: list) -> dict[str, str]:
    actions = {site.name: "kept" for site in sites}
    for rewrite in rewrites:
        if rewrite.pass_name == "linearize_activations":
            actions[rewrite.nodes[0]] = rewrite.action
    for refusal in refusals:
        if refusal.pass_name == "linearize_activations" and actions.get(refusal.node) == "kept":
            actions[refusal.node] = f"kept: {refusal.reason}"
    return actions


@dataclass
class _Attempt:
    """One trace-calibrate-rewrite of the model and what it produced."""

    gm: fx.GraphModule
    sites: list[SiteStats]
    pipeline: PipelineResult
    withdrawals: list[dict]

    @property
    def approximations(self) -> list[str]:
        """Rewrites that are not exact: smooth-activation surrogates and border-approximate merges."""
        smooth = {site.name for site in self.sites if site.spec.smooth}
        return [
            r.action for r in self.pipeline.rewrites
            if "border-approximate" in r.action or (r.pass_name == "linearize_activations" and r.nodes[0] in smooth)
        ]

    @property
    def border_approximate(self) -> list[str]:
        return [a for a in self.approximations if "border-approximate" in a]

    @property
    def statistical(self) -> bool:
        """Whether any rewrite rests on calibration statistics (a linearized site or a dead mask)."""
        return any(r.pass_name == "linearize_activations" for r in self.pipeline.rewrites)


def _verification_error(
    error: ErrorStats, rtol: float, split: CalibrationSplit, hint: str
) -> VerificationError:
    if error.nonfinite_mismatches:
        sample = split.decide_samples + split.validation_samples + (error.first_bad_sample or 0)
        return VerificationError(
            f"{error.nonfinite_mismatches} output values are inf/NaN in the original or the compiled model but not "
            f"the same in both, first on verification sample {error.first_bad_sample} (calibration sample {sample}); "
            "non-finite outputs are never within tolerance. Check that sample and the model's numerics (overflow, "
            "division by zero) or drop such samples from the calibration data."
        )
    return VerificationError(
        f"the compiled model differs from the original on held-out data: max_rel={error.max_rel:.3g} "
        f"(max_abs={error.max_abs:.3g}) > allowed {rtol:g}.{hint}"
    )


def compile(  # noqa: A001 - the issue's public name
    model: nn.Module,
    calibration,
    tolerance: float = 1e-5,
    *,
    holdout: float = 0.2,
    validation: float = DEFAULT_VALIDATION,
    strict: bool = False,
    min_observations: int = DEFAULT_MIN_OBSERVATIONS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    approximate: bool = False,
    cost_model=None,
    merge_plan: str = "cost",
    channel_alignment: int = CHANNEL_ALIGNMENT,
    steps: list[Step] | None = None,
    debug: bool = False,
    progress: bool = False,
) -> CompileResult:
    """Compile ``model`` into a shallower torch.fx GraphModule that computes the same function.

    ``calibration``: a tensor batch, an iterable of tensors or (input, target)
    tuples, or a DataLoader. The last ``holdout`` fraction of samples is not
    used to decide anything: the compiled module is checked against the
    original on it (see ``verification_rtol`` for what is allowed; inf/NaN
    never is). The ``validation`` fraction before it only withdraws rewrites
    whose neurons leave their region there. Without ``strict`` a failed final
    check withdraws every rewrite that rests on statistics and compiles the
    rest; with ``strict=True`` (and ``validation`` unused) it raises
    VerificationError as soon as the check fails. A site is only rewritten if
    each neuron was observed ``min_observations`` times (samples x positions).
    ``tolerance`` bounds what smooth-activation surrogates and
    border-approximate merges may add to the error. ``approximate`` allows
    conv merges that are exact only away from the border; ``cost_model``
    ("analytic", "measured", or a cost object from costmodel.py) decides which
    merges pay; ``merge_plan="all"`` merges every conv chain whole.
    ``channel_alignment`` (default 8) keeps channel counts left by dead-channel
    removal at multiples of it (ONNX Runtime's CPU kernels run odd counts far
    slower); 1 removes every dead channel. ``debug`` checks numerics after
    every pass and names the pass that broke them. fp16/bf16 models are
    compiled and verified in fp32 (with a warning). ``model`` is never run
    and never mutated; a model whose outputs differ for the same input twice
    is refused.
    """
    started = time.perf_counter()
    if min_observations < 0:
        raise CalibrationError(f"min_observations must be >= 0, got {min_observations}.")
    working, dtype = _working_copy(model)
    batches = [b.float() if b.dtype in _WIDENED_DTYPES else b for b in as_batches(calibration, batch_size=batch_size)]
    split = split_holdout(batches, holdout, 0.0 if strict else validation)
    gm = trace(working)  # warns about training mode; compiles the eval-mode behaviour
    reference = working.eval()
    noise_batch = [split.holdout[0][:NOISE_SAMPLES]]
    # The fp64 reference run is slow on CPU: measured up front only in debug
    # mode (every pass is checked against it), else only if the plain fp32
    # floor is not met.
    noise = fp32_noise(reference, noise_batch) if debug else None
    cost = resolve_cost_model(cost_model)
    example = split.calibrate[0][:1]

    def rewrite(gm: fx.GraphModule, sites: list[SiteStats], withdraw_everything: str | None = None) -> _Attempt:
        withdrawals: list[dict] = []
        if withdraw_everything:
            for site in sites:
                site.withdraw(torch.ones(site.num_neurons, dtype=torch.bool), withdraw_everything)
        else:
            _withdraw_thin_evidence(sites, tolerance, min_observations)
            withdrawals = _withdraw_on_validation(reference, sites, split.validate, tolerance)
        manager = PassManager(
            steps if steps is not None else default_steps(
                tolerance, approximate=approximate, cost=cost, plan=merge_plan, channel_alignment=channel_alignment
            ),
            example_input=example,
            debug_inputs=split.calibrate[0] if debug else None,
            debug_rtol=verification_rtol(tolerance, noise or 0.0, approximated=True),
        )
        pipeline = manager.run(gm)
        propagate_shapes(gm, example)
        return _Attempt(gm, sites, pipeline, withdrawals)

    def check(attempt: _Attempt) -> tuple[ErrorStats, float]:
        nonlocal noise
        error = compare(reference_outputs, _outputs(attempt.gm, split.holdout))
        approximated = bool(attempt.approximations)
        if not error.within(verification_rtol(tolerance, noise or 0.0, approximated=approximated)) and noise is None:
            noise = fp32_noise(reference, noise_batch)
        return error, verification_rtol(tolerance, noise or 0.0, approximated=approximated)

    sites = calibrate(gm, split.calibrate, progress=progress)  # first: data the model rejects is a CalibrationError
    calibrated = time.perf_counter()
    before = summarize(gm)
    predicted_before = conv_seconds(gm, cost)
    attempt = rewrite(gm, sites)
    _check_deterministic(reference, split.holdout[0])
    reference_outputs = _outputs(reference, split.holdout)
    withdrawals = list(attempt.withdrawals)
    rewritten = time.perf_counter()
    error, rtol = check(attempt)
    # Back off when statistics may be at fault; a failure with border-approximate merges (the user's
    # explicit approximate=True) is reported instead: their tolerance, not the data, decides those.
    if not error.within(rtol) and not strict and attempt.statistical and not attempt.border_approximate:
        failed = f"max_rel={error.max_rel:.3g} > allowed {rtol:g} on {split.holdout_samples} verification samples"
        withdrawals += [
            {"code": FINAL_CHECK_FAILED, "site": r.nodes[0], "rewrite": r.action, "max_rel": error.max_rel,
             "allowed": rtol, "verification_samples": split.holdout_samples}
            for r in attempt.pipeline.rewrites if r.pass_name == "linearize_activations"
        ]
        fresh = trace(working)
        attempt = rewrite(
            fresh, calibrate(fresh, split.calibrate), f"withdrawn: the final check failed with every rewrite in place ({failed})"
        )
        error, rtol = check(attempt)
    if not error.within(rtol):
        raise _verification_error(error, rtol, split, _failure_hint(attempt, reference, split, tolerance, strict))
    if isinstance(cost, MeasuredCost):
        cost.save()
    return CompileResult(
        module=attempt.gm,
        report=_report(
            attempt, split, tolerance, before, predicted_before, cost, error, rtol, noise, dtype, withdrawals,
            min_observations=min_observations, strict=strict,
            seconds={"start": started, "calibrated": calibrated, "rewritten": rewritten},
        ),
        sites=attempt.sites,
    )


def _failure_hint(attempt: _Attempt, reference: nn.Module, split: CalibrationSplit, tolerance: float, strict: bool) -> str:
    hint = ""
    moved = _sites_leaving_region(reference, attempt.sites, split.holdout, tolerance) if attempt.statistical else []
    if moved:
        hint += (
            " Neurons rewritten as linear or dead on the strength of the calibration data left their region "
            f"on held-out data at: {', '.join(moved)}; calibrate on more (and more varied) data"
            + (", or compile without strict to let egp-export withdraw those rewrites." if strict else ".")
        )
    approximate_merges = attempt.border_approximate
    if approximate_merges:
        hint += (
            f" {len(approximate_merges)} border-approximate conv merges were made (approximate=True): "
            "raise the tolerance to accept their border error, or leave approximate off."
        )
    if not hint and not attempt.statistical:
        hint = (
            " No rewrite rests on calibration statistics, so this is no statistical failure: the model's own numerics "
            "(ill-conditioned layers) or a pass is at fault; run with debug=True (--debug) to name the pass."
        )
    return hint or " Lower the tolerance if smooth activations were approximated."


def _report(
    attempt: _Attempt, split: CalibrationSplit, tolerance: float, before: dict, predicted_before: float, cost,
    error: ErrorStats, rtol: float, noise: float | None, dtype: dict, withdrawals: list[dict], *,
    min_observations: int, strict: bool, seconds: dict,
) -> dict:
    gm, pipeline, sites = attempt.gm, attempt.pipeline, attempt.sites
    actions = _site_actions(sites, pipeline.rewrites, pipeline.refusals)
    analysis = summarize_sites(sites, tolerance)
    for row in analysis["sites"]:
        row["action"] = actions[row["name"]]
    notes = [dtype["note"]] if dtype["note"] else []
    if noise is not None and noise_floor(noise) > FP32_RTOL:
        notes.append(
            f"the original model's own fp32 noise ({noise:.3g} vs fp64) raised the floor for exact rewrites to "
            f"{noise_floor(noise):.3g} (8x the noise, capped at {NOISE_CAP:g})"
        )
    verified = split.holdout_samples if split.holdout is not split.calibrate else 0
    evidence = [
        {"site": site.name, "action": actions[site.name], **site.evidence()}
        for site in sites if not actions[site.name].startswith("kept")
    ]
    finished = time.perf_counter()
    return {
        "egp_export_version": __version__,
        "tolerance": tolerance,
        "calibration": {
            "samples": split.calibration_samples,
            "decide_samples": split.decide_samples,
            "validation_samples": split.validation_samples,
            "holdout_samples": verified,
            "sample_shape": list(split.calibrate[0].shape[1:]),
        },
        "analysis": analysis,
        "rewrites": [r.to_dict() for r in pipeline.rewrites],
        "refusals": [r.to_dict() for r in pipeline.refusals],
        "withdrawals": withdrawals,
        "evidence": evidence,
        "steps": [{"step": name, "iterations": n} for name, n in pipeline.steps_run],
        "before": before,
        "after": summarize(gm),
        "predicted_conv_latency_us": {
            "cost_model": cost.name,
            "before": round(predicted_before * 1e6, 2),
            "after": round(conv_seconds(gm, cost) * 1e6, 2),
        },
        "activations_linearized": sum(1 for a in actions.values() if "-> affine" in a),
        "verification": {
            "fp32_noise": noise,
            "dtype": dtype["compiled_dtype"],
            "model_dtype": dtype["model_dtype"],
            "approximations": len(attempt.approximations),
            "notes": notes,
            "pytorch": {**error.to_dict(), "rtol": rtol, "passed": True},
        },
        "guarantee": {
            "verified_samples": verified or split.calibration_samples,
            "verified_on": "held-out samples never used to decide" if verified else "the calibration samples (holdout=0)",
            "max_rel": error.max_rel,
            "allowed": rtol,
            "dtype": dtype["compiled_dtype"],
            "tolerance": tolerance,
            "min_observations": min_observations,
            "strict": strict,
            "site_bound": "each rewritten neuron stayed in its region on all n observations of the decide split; "
            "its rate of leaving it is below 3/n with 95% confidence (rule of three), see 'evidence'",
        },
        "compile_seconds": round(finished - seconds["start"], 3),
        "seconds": {
            "calibrate": round(seconds["calibrated"] - seconds["start"], 3),
            "rewrite": round(seconds["rewritten"] - seconds["calibrated"], 3),
            "verify": round(finished - seconds["rewritten"], 3),
        },
    }
