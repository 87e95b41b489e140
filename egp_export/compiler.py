"""``compile``: prepare → capture → calibrate → decide → rewrite → verify on held-out data → (back-off) → report.

The stages are named functions of one ``CompileContext`` (stages.py), run as
a list; ``CompileOptions`` (compile_options.py) holds and checks every
option. The decide stage writes one immutable ``SitePlan`` per activation
site (analysis/plans.py); every later withdrawal is a filter plan -> plan
(plan_filters.py), and the passes only apply plans.

The calibration samples are split three ways by a seeded permutation
(analysis/batches.py, ``split_seed``): rewrites are *decided* on the first
part, *validated* on the second (which can only withdraw them; a gradient
search near its samples, analysis/crossings.py, withdraws neurons it can move
out of their region too), and the compiled module is *verified* against the
original on the last, which decides nothing; a sample repeated counts once as
evidence. Without ``strict``, a compile backs off
instead of giving up: neurons that leave their region on validation data lose
their rewrite (the activation stays, or they leave the dead mask), and if the
final check still fails, the statistically rewritten sites are withdrawn in
steps, most marginal first, each step re-validated on the validation part
(compiler_backoff.py; at most HELD_OUT_CHECKS more held-out checks, counted in
report["verification"]["held_out_checks"]). Only when no step passes is every
rewrite that rests on calibration statistics withdrawn and the
data-independent rest (BatchNorm folding, merges of chains that were already
linear) compiled and checked again. If that fails too, or no rewrite ever
rested on statistics, the exact rewrites that move the float32 output beyond
the allowance (ill-conditioned layers) are located pass by pass on the
validation part and withheld, the rest compiled (compiler_backoff.py,
``withdraw_exact_rewrites``). Every withdrawal is reported with its reason
and numbers.

What the final check allows (``verification_rtol``): exact rewrites are held
to fp32 rounding, max(1e-5, 8x the original model's own fp32-vs-fp64 noise)
but never more than 1e-4; approximations (smooth-activation surrogates,
border-approximate merges) add at most the user's ``tolerance`` on top of that
floor, so the noise never covers them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from egp_export.analysis.batches import CalibrationSplit, SplitIndices
from egp_export.analysis.inputs import sample_shape
from egp_export.analysis.numerics import FP32_RTOL, NOISE_CAP, SAMPLE_SCALE_FLOOR, ErrorStats
from egp_export.analysis.plans import SitePlan, summarize_sites
from egp_export.analysis.regions import site_regions
from egp_export.analysis.stats import SiteStats
from egp_export.analysis.summary import summarize
from egp_export.compile_options import (  # noqa: F401 - re-exported: the compiler's public names
    DEFAULT_MIN_OBSERVATIONS,
    DEFAULT_VALIDATION,
    CompileOptions,
    check_tolerance,
    resolve_cost_model,
)
from egp_export.compiler_backoff import BACK_OFFS
from egp_export.errors import VerificationError
from egp_export.measured_cost import MeasuredCost
from egp_export.passes import LinearizeActivations, conv_seconds
from egp_export.plan_filters import WITHDRAWAL  # noqa: F401 - re-exported
from egp_export.records import Refusal, Rewrite, RewriteKind
from egp_export.report.messages import describe_refusal, describe_rewrite, with_text
from egp_export.stages import (  # noqa: F401 - re-exported: the compiler's public names
    NOISE_SAMPLES,
    PIPELINE,
    Attempt,
    CompileContext,
    Stage,
    StageEvent,
    noise_floor,
    verification_rtol,
)
from egp_export.version import __version__


@dataclass
class CompileResult:
    """The compiled module (same call signature, fewer layers), the JSON-serialisable report, and which samples
    each part of the split held (``split.holdout``: what the final check ran on, for checks that follow)."""

    module: fx.GraphModule
    report: dict
    sites: list[SiteStats]
    split: SplitIndices


# More duplicates than this fraction of a part (decide or held-out) are warned about and noted in the report.
DUPLICATE_WARNING_FRACTION = 0.1

# What "max_rel <= allowed" means, stated in the report's guarantee and verification sections.
OUTPUT_RULE = (
    "every output tensor (each tuple/list/dict leaf) on its own scale: max|compiled - original| / max|original| per "
    f"output, and per sample on max(the sample's own max|original|, {SAMPLE_SCALE_FLOOR:g} x the output's); "
    "both within the allowance; an all-zero output fails on any difference; inf/NaN only where the original has "
    "the same"
)


def compile(  # noqa: A001 - the issue's public name
    model: torch.nn.Module, calibration, options: CompileOptions | float | None = None, **overrides
) -> CompileResult:
    """Compile ``model`` into a shallower torch.fx GraphModule that computes the same function.

    ``options`` (a :class:`CompileOptions`, which documents each option; a
    number there is the tolerance, as in ``compile(model, data, 1e-5)``) with
    ``overrides`` (any of its fields by name: ``compile(model, data, options,
    tolerance=1e-3)``) says what to do; every value is checked when the
    options are made. ``calibration``: a tensor batch, an iterable of tensors
    or (input, target) tuples, or a DataLoader. The samples are split by a
    permutation seeded with ``split_seed`` (``result.split`` lists each
    part's sample indices): rewrites are decided on the first part, withdrawn
    on the validation part, and the compiled module is checked against the
    original on the held-out part (``verification_rtol``; inf/NaN never
    passes; every output and every sample on its own scale, ``OUTPUT_RULE``).
    Duplicated samples count once as evidence, and every batch is a copy (a
    model that writes into its input never changes ``calibration``).

    The stages run as listed in ``stages.PIPELINE``. Without ``strict``, a
    failed check runs the back-off stages (``compiler_backoff.BACK_OFFS``):
    the statistically rewritten sites are withdrawn in steps, most marginal
    first (at most ``compiler_backoff.HELD_OUT_CHECKS`` more held-out
    checks), then all at once, then the exact folds and merges that move the
    float32 output beyond the allowance are withheld; VerificationError only
    when the graph fails with every one withheld. With ``strict`` it is
    raised as soon as the check fails. Every withdrawal is reported with its
    reason. ``model`` is never run and never mutated; fp16/bf16 models are
    compiled and verified in fp32 (with a warning); a model whose outputs
    differ for the same input twice is refused.
    """
    if options is None or isinstance(options, CompileOptions):
        options = (options or CompileOptions()).but(**overrides)
    else:  # compile(model, data, 1e-5): the tolerance, where earlier releases took it
        options = CompileOptions().but(tolerance=options, **overrides)
    ctx = CompileContext(options, model, calibration)
    ctx.run(PIPELINE)
    for applies, stages in BACK_OFFS:
        if applies(ctx):
            ctx.run(stages)
    if not ctx.passed:
        raise _verification_error(ctx.error, ctx.rtol, ctx.split, _failure_hint(ctx))
    ctx.run(REPORTING)
    ctx.report["seconds"] = ctx.log.seconds()
    ctx.report["compile_seconds"] = round(sum(ctx.report["seconds"].values()), 3)
    return CompileResult(module=ctx.attempt.gm, report=ctx.report, sites=ctx.sites, split=ctx.split.indices())


def report(ctx: CompileContext) -> dict:
    """The last stage: the report of the attempt that passed (the measured cost model's timings saved)."""
    if isinstance(ctx.cost, MeasuredCost):
        ctx.cost.save()
    ctx.shards.merge_digests(ctx.split, ctx.split.holdout)
    samples = _distinct_samples(ctx.split)
    if samples["note"]:
        warnings.warn(f"egp-export: {samples['note']}", UserWarning, stacklevel=5)
    ctx.report = _report(ctx, ctx.attempt, samples)
    return {"rewrites": len(ctx.report["rewrites"]), "withdrawals": len(ctx.report["withdrawals"])}


# The last stage, once the check passed.
REPORTING = (Stage("report", report),)


def _failure_hint(ctx: CompileContext) -> str:
    """What the VerificationError of a failed compile advises, from what was rewritten and what was withdrawn."""
    attempt, strict = ctx.attempt, ctx.options.strict
    if ctx.exact_withdrawn:
        return (
            " Even with every fold and merge withheld the compiled graph differs from the original, so no rewrite is "
            "at fault: this is the model's own numerics (float32 rounding above the allowance) or a forward that "
            "computes differently when traced; state the error you accept with tolerance (--tolerance)."
        )
    hint = ""
    statistical = bool(attempt.statistical)
    moved = _sites_leaving_region(ctx, attempt.plans) if statistical else []
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
    if not hint and not statistical:
        hint = (
            " No rewrite rests on calibration statistics, so this is no statistical failure: the model's own numerics "
            "(ill-conditioned layers) or a pass is at fault; run with debug=True (--debug) to name the pass."
        )
    return hint or " Lower the tolerance if smooth activations were approximated."


def _distinct_samples(split: CalibrationSplit) -> dict:
    """How many decide and held-out samples differ (by their digests), how many held-out ones are not among the
    decide samples (only those verify something the decisions did not see), and a note when many repeat."""
    decide = split.distinct_decide_samples()
    held_out = split.holdout is not split.calibrate
    held, unseen = split.distinct_holdout_samples() if held_out else (0, 0)
    problems = []
    if split.decide_samples - decide > DUPLICATE_WARNING_FRACTION * split.decide_samples:
        problems.append(
            f"only {decide} of the {split.decide_samples} samples decided on are distinct; duplicates add no "
            "evidence (observations per neuron = distinct samples x positions)"
        )
    if held_out and split.holdout_samples - unseen > DUPLICATE_WARNING_FRACTION * split.holdout_samples:
        problems.append(
            f"only {unseen} of the {split.holdout_samples} held-out samples are distinct and not among the samples "
            "decided on; the others verify nothing the decisions did not see"
        )
    note = "; ".join(problems) + ": calibrate on more distinct samples" if problems else None
    return {"decide": decide, "holdout": held, "unseen_holdout": unseen, "note": note}


def _report(ctx: CompileContext, attempt: Attempt, samples: dict) -> dict:
    """The compile's report (JSON-serialisable) on ``attempt``, the one that passed; ``seconds`` and
    ``compile_seconds`` are added by ``compile`` from the stage events."""
    gm, pipeline, sites, cost = attempt.gm, attempt.pipeline, attempt.sites, ctx.cost
    outcomes = _site_outcomes(sites, pipeline.rewrites, pipeline.refusals)
    analysis = summarize_sites(sites, attempt.plans)
    for row in analysis["sites"]:
        row["linearized"] = outcomes[row["name"]]["linearized"]
        row["action"] = outcomes[row["name"]]["action"]
    evidence = [
        {
            "site": site.name, "action": outcomes[site.name]["action"],
            **site.evidence(samples["decide"], ctx.split.decide_samples),
        }
        for site in sites if outcomes[site.name]["rewritten"]
    ]
    return {
        "egp_export_version": __version__,
        "tolerance": ctx.options.tolerance,
        "calibration": _calibration_section(ctx.split, samples),
        "trace": ctx.traced,
        "analysis": analysis,
        "rewrites": with_text(pipeline.rewrites, describe_rewrite, "action"),
        "refusals": with_text(pipeline.refusals, describe_refusal, "reason"),
        "withdrawals": with_text(ctx.withdrawals, describe_refusal, "reason"),
        "evidence": evidence,
        "steps": [{"step": name, "iterations": n} for name, n in pipeline.steps_run],
        "before": ctx.before,
        "after": summarize(gm),
        "predicted_conv_latency_us": {
            "cost_model": cost.name,
            "before": round(ctx.predicted_before * 1e6, 2),
            "after": round(conv_seconds(gm, cost) * 1e6, 2),
        },
        "activations_linearized": sum(1 for outcome in outcomes.values() if outcome["linearized"]),
        "verification": _verification_section(ctx, attempt, samples),
        "guarantee": _guarantee_section(ctx, attempt, samples),
        "regions": site_regions(sites, attempt.plans, pipeline.rewrites, model=ctx.working),
    }


def _held_out_samples(split: CalibrationSplit) -> int:
    """Samples the final check ran on that decided nothing (0 with holdout=0: it ran on the calibration samples)."""
    return split.holdout_samples if split.holdout is not split.calibrate else 0


def _calibration_section(split: CalibrationSplit, samples: dict) -> dict:
    return {
        "samples": split.calibration_samples,
        "decide_samples": split.decide_samples,
        "validation_samples": split.validation_samples,
        "holdout_samples": _held_out_samples(split),
        "distinct_decide_samples": samples["decide"],
        "distinct_holdout_samples": samples["holdout"],
        "split_seed": split.seed,
        "sample_shape": sample_shape(split.calibrate[0]),
    }


def _verification_section(ctx: CompileContext, attempt: Attempt, samples: dict) -> dict:
    noise, dtype = ctx.noise, ctx.dtype
    notes = [note for note in (dtype["note"], samples["note"]) if note]
    if noise is not None and noise_floor(noise) > FP32_RTOL:
        notes.append(
            f"the original model's own fp32 noise ({noise:.3g} vs fp64) raised the floor for exact rewrites to "
            f"{noise_floor(noise):.3g} (8x the noise, capped at {NOISE_CAP:g})"
        )
    return {
        "fp32_noise": noise,
        "dtype": dtype["compiled_dtype"],
        "model_dtype": dtype["model_dtype"],
        "approximations": len(attempt.approximations),
        "notes": notes,
        "pytorch": {**ctx.error.to_dict(), "rtol": ctx.rtol, "passed": True},
        "rule": OUTPUT_RULE,
        "held_out_checks": ctx.held_out_checks,
    }


def _guarantee_section(ctx: CompileContext, attempt: Attempt, samples: dict) -> dict:
    split, error, verified = ctx.split, ctx.error, _held_out_samples(ctx.split)
    return {
        "verified_samples": verified or split.calibration_samples,
        "verified_on": "held-out samples never used to decide" if verified else "the calibration samples (holdout=0)",
        # Held-out samples that repeat a decide sample verify nothing new: these are the ones that count.
        "verified_new_samples": samples["unseen_holdout"],
        "decided_on_distinct_samples": samples["decide"],
        "split": f"a permutation of the sample indices seeded with {split.seed} (split_seed)",
        "max_rel": error.max_rel,
        "max_sample_rel": error.sample_rel,
        "worst_output": error.worst_output,
        "outputs": {output.output: output.max_rel for output in error.outputs},
        "checked": OUTPUT_RULE,
        "allowed": ctx.rtol,
        "dtype": ctx.dtype["compiled_dtype"],
        "tolerance": ctx.options.tolerance,
        "min_observations": ctx.options.min_observations,
        "strict": ctx.options.strict,
        "site_bound": "each rewritten neuron stayed in its region on all n observations of the decide split "
        "(n counts distinct samples only); its rate of leaving it is below 3/n with 95% confidence (rule of "
        "three), see 'evidence'",
        "perturbation_search": attempt.crossings.to_dict() if attempt.crossings else
        {"skipped": "every statistical rewrite was withdrawn", "radius": None},
    }


def _sites_leaving_region(ctx: CompileContext, plans: dict[str, SitePlan]) -> list[str]:
    """Sites with neurons that stayed in one region on calibration data but not on held-out data.

    Those neurons were rewritten (linearized or masked as dead) on the strength
    of the calibration data alone; they are the usual cause of a failed check.
    """
    held = {s.name: s for s in ctx.shards.calibrate(ctx.fresh_graph(), ctx.split.holdout)}
    moved = []
    for site in ctx.sites:
        other = held.get(site.name)
        if other is None or site.spec.smooth:
            continue
        left = plans[site.name].rewritten_neurons() & (other.neuron_region != site.neuron_region)
        if bool(left.any()):
            moved.append(f"{site.name} ({int(left.sum())} neurons)")
    return moved


def _site_outcomes(sites: list[SiteStats], rewrites: list[Rewrite], refusals: list[Refusal]) -> dict[str, dict]:
    """Per activation site: whether it was linearized or masked, and the sentence the report shows for it.

    The sentence is the site's linearization if any, else its dead-neuron
    mask, else the first reason the linearizer gave for keeping it.
    """
    linearized = {r.nodes[0]: r for r in rewrites if r.kind is RewriteKind.LINEARIZED}
    masked = {r.nodes[0]: r for r in rewrites if r.kind is RewriteKind.DEAD_MASKED}
    kept: dict[str, Refusal] = {}
    for refusal in refusals:
        if refusal.pass_name == LinearizeActivations.name:
            kept.setdefault(refusal.node, refusal)
    outcomes = {}
    for site in sites:
        if site.name in linearized:
            action = describe_rewrite(linearized[site.name])
        elif site.name in masked:
            action = describe_rewrite(masked[site.name])
        elif site.name in kept:
            action = f"kept: {describe_refusal(kept[site.name])}"
        else:
            action = "kept"
        outcomes[site.name] = {
            "linearized": site.name in linearized, "rewritten": site.name in linearized or site.name in masked,
            "action": action,
        }
    return outcomes


def _verification_error(
    error: ErrorStats, rtol: float, split: CalibrationSplit, hint: str
) -> VerificationError:
    if error.nonfinite_mismatches:
        sample = int(split.holdout.indices[error.first_bad_sample or 0])
        return VerificationError(
            f"{error.nonfinite_mismatches} output values are inf/NaN in the original or the compiled model but not "
            f"the same in both, first on verification sample {error.first_bad_sample} (calibration sample {sample}); "
            "non-finite outputs are never within tolerance. Check that sample and the model's numerics (overflow, "
            "division by zero) or drop such samples from the calibration data."
        )
    return VerificationError(
        f"the compiled model differs from the original on held-out data: {error.describe()} > allowed {rtol:g} "
        f"(each output on its own scale).{hint}"
    )


