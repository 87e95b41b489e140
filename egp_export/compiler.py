"""``compile``: trace → calibrate → rewrite → verify on held-out data → report."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export import __version__
from egp_export.algebra.costmodel import AnalyticCost, MeasuredCost
from egp_export.analysis.batches import DEFAULT_BATCH_SIZE, as_batches, split_holdout
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.numerics import FP32_RTOL, NOISE_FACTOR, compare, fp32_noise
from egp_export.analysis.stats import SiteStats, calibrate, summarize_sites
from egp_export.analysis.summary import summarize
from egp_export.analysis.trace import owned_copy, trace, trace_facts
from egp_export.errors import VerificationError
from egp_export.passes import CHANNEL_ALIGNMENT, LinearizeActivations, PassManager, Step, conv_seconds, default_steps
from egp_export.records import Refusal, Rewrite, RewriteKind
from egp_export.report.messages import describe_refusal, describe_rewrite, with_text


@dataclass
class CompileResult:
    """The compiled module (same call signature, fewer layers) and the JSON-serialisable report."""

    module: fx.GraphModule
    report: dict
    sites: list[SiteStats]


# Samples the fp32-vs-fp64 noise of the original model is measured on (fp64
# convolutions are slow on CPU; a few samples show the conditioning).
NOISE_SAMPLES = 4


def verification_rtol(tolerance: float, noise: float = 0.0) -> float:
    """Exact rewrites are held to fp32 rounding; approximate ones to the user's tolerance.

    The fp32 floor is the larger of 1e-5 and NOISE_FACTOR times the original
    model's own fp32-vs-fp64 error on the held-out data.
    """
    return max(tolerance, FP32_RTOL, NOISE_FACTOR * noise)



def _outputs(module: nn.Module, batches: list[torch.Tensor]) -> list:
    with torch.no_grad():
        return [module(batch) for batch in batches]


def _sites_leaving_region(
    model: nn.Module, sites: list[SiteStats], holdout: list[torch.Tensor], tolerance: float, leaf_modules: tuple = ()
) -> list[str]:
    """Sites with neurons that stayed in one region on calibration data but not on held-out data.

    Those neurons were rewritten (linearized or masked as dead) on the strength
    of the calibration data alone; they are the usual cause of a failed check.
    """
    held = {s.name: s for s in calibrate(trace(model, leaf_modules=leaf_modules), holdout)}
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


def _site_outcomes(sites: list[SiteStats], rewrites: list[Rewrite], refusals: list[Refusal]) -> dict[str, dict]:
    """Per activation site: whether it was linearized, and the sentence the report shows for it.

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
        outcomes[site.name] = {"linearized": site.name in linearized, "action": action}
    return outcomes


def compile(  # noqa: A001 - the issue's public name
    model: nn.Module,
    calibration,
    tolerance: float = 1e-5,
    *,
    holdout: float = 0.2,
    batch_size: int = DEFAULT_BATCH_SIZE,
    approximate: bool = False,
    cost_model=None,
    merge_plan: str = "cost",
    channel_alignment: int = CHANNEL_ALIGNMENT,
    steps: list[Step] | None = None,
    debug: bool = False,
    progress: bool = False,
    leaf_modules=(),
) -> CompileResult:
    """Compile ``model`` into a shallower torch.fx GraphModule that computes the same function.

    ``calibration``: a tensor batch, an iterable of tensors or (input, target)
    tuples, or a DataLoader. The last ``holdout`` fraction of samples is not
    used to decide anything: the compiled module is checked against the
    original on it, and a mismatch beyond ``max(tolerance, 1e-5)`` relative
    to the output scale (see numerics.py) raises VerificationError. ``tolerance`` also bounds
    the error of smooth-activation surrogates. The fp32 floor rises to
    8x the original model's own fp32-vs-fp64 error where that is larger
    (ill-conditioned networks). ``approximate`` allows conv merges that are
    exact only away from the border (the measured error is then checked
    against ``tolerance`` like everything else); ``cost_model`` ("analytic",
    "measured", or a cost object from costmodel.py) decides which merges pay;
    ``merge_plan="all"`` merges every conv chain whole. ``channel_alignment``
    (default 8) keeps channel counts left by dead-channel removal at multiples
    of it: ONNX Runtime's CPU kernels run odd counts far slower (see
    passes/eliminate_dead_channels.py); 1 removes every dead channel. ``debug`` checks numerics after
    every pass and names the pass that broke them. ``leaf_modules`` (submodule names or
    types) are traced as single calls, as are submodules torch.fx cannot trace through; the
    report's ``trace`` section lists them (activations inside are not analysed). ``model`` is
    never mutated.
    """
    started = time.perf_counter()
    split = split_holdout(as_batches(calibration, batch_size=batch_size), holdout)
    # The user's model is only run as is when that cannot change it (eval mode).
    reference = owned_copy(model).eval() if model.training else model
    noise_batch = [split.holdout[0][:NOISE_SAMPLES]]
    # The fp64 reference run is slow on CPU: measured up front only in debug
    # mode (every pass is checked against it), else only if the plain fp32
    # floor is not met.
    noise = fp32_noise(reference, noise_batch) if debug else None
    rtol = verification_rtol(tolerance, noise or 0.0)
    leaf_modules = tuple(leaf_modules)
    gm = trace(model, leaf_modules=leaf_modules)
    traced = trace_facts(gm)
    sites = calibrate(gm, split.calibrate, progress=progress)
    calibrated = time.perf_counter()
    before = summarize(gm)
    cost = resolve_cost_model(cost_model)
    predicted_before = conv_seconds(gm, cost)
    example = split.calibrate[0][:1]
    manager = PassManager(
        steps if steps is not None else default_steps(
            tolerance, approximate=approximate, cost=cost, plan=merge_plan, channel_alignment=channel_alignment
        ),
        example_input=example,
        debug_inputs=split.calibrate[0] if debug else None,
        debug_rtol=rtol,
    )
    pipeline = manager.run(gm)
    propagate_shapes(gm, example)
    after = summarize(gm)
    predicted_after = conv_seconds(gm, cost)
    if isinstance(cost, MeasuredCost):
        cost.save()
    rewritten = time.perf_counter()

    error = compare(_outputs(reference, split.holdout), _outputs(gm, split.holdout))
    if not error.within(rtol) and noise is None:
        noise = fp32_noise(reference, noise_batch)
        rtol = verification_rtol(tolerance, noise)
    if not error.within(rtol):
        moved = _sites_leaving_region(model, sites, split.holdout, tolerance, leaf_modules)
        approximate_merges = [r for r in pipeline.rewrites if r.kind.is_approximate]
        hint = ""
        if moved:
            hint += (
                " Neurons rewritten as linear or dead on the strength of the calibration data left their region "
                f"on held-out data at: {', '.join(moved)}; calibrate on more (and more varied) data."
            )
        if approximate_merges:
            hint += (
                f" {len(approximate_merges)} border-approximate conv merges were made (approximate=True): "
                "raise the tolerance to accept their border error, or leave approximate off."
            )
        if not hint:
            hint = " Lower the tolerance if smooth activations were approximated."
        raise VerificationError(
            f"the compiled model differs from the original on held-out data: max_rel={error.max_rel:.3g} "
            f"(max_abs={error.max_abs:.3g}) > allowed {rtol:g}.{hint}"
        )

    outcomes = _site_outcomes(sites, pipeline.rewrites, pipeline.refusals)
    analysis = summarize_sites(sites, tolerance)
    for row in analysis["sites"]:
        row.update(outcomes[row["name"]])
    report = {
        "egp_export_version": __version__,
        "tolerance": tolerance,
        "calibration": {
            "samples": split.calibration_samples,
            "holdout_samples": split.holdout_samples if holdout > 0 else 0,
            "sample_shape": list(split.calibrate[0].shape[1:]),
        },
        "trace": traced.to_dict(),
        "analysis": analysis,
        "rewrites": with_text(pipeline.rewrites, describe_rewrite, "action"),
        "refusals": with_text(pipeline.refusals, describe_refusal, "reason"),
        "steps": [{"step": name, "iterations": n} for name, n in pipeline.steps_run],
        "before": before,
        "after": after,
        "predicted_conv_latency_us": {
            "cost_model": cost.name,
            "before": round(predicted_before * 1e6, 2),
            "after": round(predicted_after * 1e6, 2),
        },
        "activations_linearized": sum(1 for outcome in outcomes.values() if outcome["linearized"]),
        "verification": {
            "fp32_noise": noise,
            "pytorch": {**error.to_dict(), "rtol": rtol, "passed": True},
        },
        "compile_seconds": round(time.perf_counter() - started, 3),
        "seconds": {
            "calibrate": round(calibrated - started, 3),
            "rewrite": round(rewritten - calibrated, 3),
            "verify": round(time.perf_counter() - rewritten, 3),
        },
    }
    return CompileResult(module=gm, report=report, sites=sites)

