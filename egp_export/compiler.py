"""``compile``: trace → calibrate → rewrite → verify on held-out data → report.

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

import hashlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.algebra.costmodel import AnalyticCost
from egp_export.analysis import inputs
from egp_export.analysis.batches import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SPLIT_SEED,
    Batches,
    CalibrationSplit,
    SplitIndices,
    as_batches,
    fitted_to,
    split_holdout,
)
from egp_export.analysis.capture import capture, resolved_frontend
from egp_export.analysis.crossings import DEFAULT_CROSSING_RADIUS, CrossingSearch, search_crossings
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.inputs import Batch
from egp_export.analysis.numerics import (
    FP32_RTOL,
    NOISE_CAP,
    NOISE_FACTOR,
    SAMPLE_SCALE_FLOOR,
    ErrorAccumulator,
    ErrorStats,
    compare,
    fp32_noise,
)
from egp_export.analysis.regions import site_regions
from egp_export.analysis.stats import SiteStats, calibrate, rejected_sample, summarize_sites
from egp_export.analysis.summary import summarize
from egp_export.analysis.trace import owned_copy, trace, trace_facts
from egp_export.compiler_backoff import EVERY_NODE, attach_sites, back_off_in_steps, withdraw_exact_rewrites
from egp_export.errors import CalibrationError, EgpExportError, VerificationError
from egp_export.measured_cost import MeasuredCost
from egp_export.passes import (
    CHANNEL_ALIGNMENT,
    LinearizeActivations,
    PassManager,
    PipelineResult,
    Step,
    conv_seconds,
    default_steps,
)
from egp_export.records import Reason, Refusal, RefusalCode, Rewrite, RewriteKind
from egp_export.report.messages import describe_refusal, describe_rewrite, with_text
from egp_export.version import __version__


@dataclass(frozen=True)
class StageEvent:
    """A compile stage starting (``done`` False) or finished (``done`` True, with its seconds and facts).

    Stages in order: "trace", "calibrate", "rewrite", "verify"; a failed check
    adds "back-off" (the stepwise back-off, its held-out checks included) and,
    when that does not pass, a second "back-off" (re-calibrate and rewrite
    without any statistical rewrite) and a second "verify"; a failure with only exact rewrites left adds a
    "back-off" that withholds the responsible folds and merges. ``facts`` are numbers (sites, rewrites, max_rel, ...).
    """

    stage: str
    done: bool
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)


class _Stages:
    """Times the compile's stages and tells ``on_stage`` (if any) when each starts and ends."""

    def __init__(self, on_stage: Callable[[StageEvent], None] | None) -> None:
        self.on_stage, self.started, self.name = on_stage, 0.0, ""

    def start(self, name: str) -> None:
        self.name, self.started = name, time.perf_counter()
        if self.on_stage is not None:
            self.on_stage(StageEvent(name, False))

    def done(self, **facts) -> None:
        if self.on_stage is not None:
            self.on_stage(StageEvent(self.name, True, time.perf_counter() - self.started, facts))


@dataclass
class CompileResult:
    """The compiled module (same call signature, fewer layers), the JSON-serialisable report, and which samples
    each part of the split held (``split.holdout``: what the final check ran on, for checks that follow)."""

    module: fx.GraphModule
    report: dict
    sites: list[SiteStats]
    split: SplitIndices


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
# More duplicates than this fraction of a part (decide or held-out) are warned about and noted in the report.
DUPLICATE_WARNING_FRACTION = 0.1
# Models in these dtypes are compiled and verified in float32 (half-precision
# rounding would hide wrong rewrites: 5e-2 relative error "verified" in bf16).
_WIDENED_DTYPES = (torch.float16, torch.bfloat16)

# Two runs of the model on the same input may differ by this much (relative):
# nondeterministic GPU reductions round differently (~1e-7), far below what
# verification allows; dropout left on differs by O(1).
DETERMINISM_RTOL = 1e-6

# What "max_rel <= allowed" means, stated in the report's guarantee and verification sections.
OUTPUT_RULE = (
    "every output tensor (each tuple/list/dict leaf) on its own scale: max|compiled - original| / max|original| per "
    f"output, and per sample on max(the sample's own max|original|, {SAMPLE_SCALE_FLOOR:g} x the output's); "
    "both within the allowance; an all-zero output fails on any difference; inf/NaN only where the original has "
    "the same"
)

# Withdrawals are refusals recorded by this stage (report["withdrawals"], codes in records.RefusalCode).
WITHDRAWAL = "verification"


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


def check_tolerance(tolerance: float) -> None:
    """Refuse a tolerance no check can use: negative, inf or NaN (inf would make every check fail, "8.5e-08 >
    allowed inf", and NaN compares false with everything)."""
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not math.isfinite(tolerance) or tolerance < 0:
        raise CalibrationError(
            f"tolerance must be a finite number >= 0, got {tolerance!r}; give the relative error smooth-activation "
            "surrogates and border-approximate merges may add (e.g. 1e-5, the default)."
        )


def noise_floor(noise: float) -> float:
    """max(1e-5, 8 x noise), never above NOISE_CAP; a non-finite noise measurement counts as the cap."""
    raised = NOISE_FACTOR * noise if noise == noise else NOISE_CAP
    return max(FP32_RTOL, min(raised, NOISE_CAP))


def _outputs(module: nn.Module, batches: list[Batch]) -> list:
    with torch.no_grad():
        return [inputs.call_on_copy(module, batch) for batch in batches]  # a model may write into its input


class _Shards:
    """Which samples this process works on, and the merges that make every process agree.

    One process: all of them, nothing to merge. Under torchrun (``runtime``
    with ``world_size`` > 1, e.g. ``prune.distributed.runtime_from_env()``):
    each rank calibrates, validates and verifies on a contiguous share of each
    part (every rank draws the same seeded permutation, so the parts agree),
    and the statistics, errors and sample digests are all-reduced, so every
    rank decides the same rewrites and sees the same error as one process on
    all samples.
    """

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.rank, self.world = getattr(runtime, "rank", 0), getattr(runtime, "world_size", 1)

    def check(self, split: CalibrationSplit) -> None:
        parts = (("decide", split.calibrate), ("validation", split.validate), ("held-out", split.holdout))
        small = [f"{name} {part.samples}" for name, part in parts if 0 < part.samples < self.world]
        if small:
            raise CalibrationError(
                f"{self.world} processes need at least {self.world} samples in each part of the calibration data; "
                f"got {', '.join(small)}: pass more samples or run fewer processes."
            )

    def check_same_model(self, model: nn.Module) -> None:
        """Refuse ranks holding different weights (e.g. each initialised at random): their statistics cannot merge."""
        if self.world == 1:
            return
        digest = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        value = int.from_bytes(digest.digest()[:7], "little")  # below 2**56: exact in int64 on every backend
        extremes = self.runtime.max(torch.tensor([value, -value], dtype=torch.int64))
        if int(extremes[0]) != value or int(extremes[1]) != -value:
            raise CalibrationError(
                "the processes of this torchrun job hold different weights (a model initialised at random in each "
                "process?); give every process the same weights (--checkpoint) so their statistics can be merged."
            )

    def merge_digests(self, split: CalibrationSplit, part: Batches) -> None:
        """Every rank hashed its share of ``part``: make each rank hold all of its digests."""
        if self.world > 1:
            split.digests.merge(self.runtime, part)

    def of(self, batches: Batches) -> Batches:
        return batches if self.world == 1 else batches.shard(self.rank, self.world)

    def calibrate(self, gm: fx.GraphModule, batches: Batches, *, progress: bool = False) -> list[SiteStats]:
        sites = calibrate(gm, self.of(batches), progress=progress)
        if self.world > 1:
            self.runtime.reduce_sites(sites)
        return sites

    def error(self, reference: nn.Module, candidate: nn.Module, batches: Batches) -> ErrorStats:
        """The candidate's error against the reference over ``batches``, a batch at a time (no outputs are kept)."""
        errors, share = ErrorAccumulator(), self.of(batches)
        with torch.no_grad():
            read = 0
            for number, batch in enumerate(share):
                errors.add(_reference_output(reference, share, number, batch, read), inputs.call(candidate, batch))
                read += inputs.batch_size(batch)
        if self.world > 1:
            errors.all_reduce(self.runtime, share.start - batches.start)
        return errors.result()


def _widened(batch: Batch) -> Batch:
    return inputs.structured(batch, lambda leaf: leaf.float() if leaf.dtype in _WIDENED_DTYPES else leaf)


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


def _reference_output(reference: nn.Module, part: Batches, number: int, batch: Batch, read: int):
    """The original model's output on ``batch`` (batch ``number`` of ``part``, after ``read`` samples of it).

    The held-out part is first run here, not in calibration: a sample the model rejects (a token id beyond the
    vocabulary) is named in a CalibrationError, as calibration names one.
    """
    try:
        with torch.no_grad():
            return inputs.call_on_copy(reference, batch)  # a model may write into its input
    except (CalibrationError, MemoryError):
        raise
    except Exception as error:  # the model ran on the decide part, so this is the data
        raise rejected_sample(reference, part, number, batch, read, error) from None


def _check_deterministic(reference: nn.Module, part: Batches) -> None:
    """Refuse a model that gives different outputs for the same input twice: nothing could be verified against it."""
    batch = part[0]
    first, (second,) = _reference_output(reference, part, 0, batch, 0), _outputs(reference, [batch])
    drift = compare(first, second)
    if not drift.within(DETERMINISM_RTOL):
        raise VerificationError(
            f"the model is not deterministic: the same input gave outputs {drift.max_rel:.3g} apart (relative) on two "
            "runs in eval mode, so no compiled copy can be verified against it. Remove randomness from forward() in "
            "eval mode (dropout with training=True, torch.rand*, state updated in forward) before compiling."
        )


def _withdraw_thin_evidence(
    sites: list[SiteStats], tolerance: float, min_observations: int, distinct: int, total: int
) -> None:
    """Sites whose rewrite would rest on fewer than ``min_observations`` observations per neuron stay as they are;
    only distinct samples count (``distinct`` of the ``total`` decide samples differ)."""
    for site in sites:
        observations = site.distinct_observations(distinct, total)
        if observations >= min_observations or site.observations == 0:
            continue
        if site.linear_map(tolerance).ok or site.dead_neurons().any():
            evidence = site.evidence(distinct, total)
            detail = {
                "observations": observations, "samples": evidence["distinct_samples"], "positions": site.positions,
                "min_observations": min_observations,
            }
            if site.samples > evidence["distinct_samples"]:
                detail["duplicates"] = site.samples - evidence["distinct_samples"]
            site.withdraw(torch.ones(site.num_neurons, dtype=torch.bool), Reason(RefusalCode.THIN_EVIDENCE, detail))


def _surrogate_error(site: SiteStats, low: torch.Tensor, high: torch.Tensor, tolerance: float) -> float:
    """Largest deviation of the site's decided affine surrogate from the activation on [low, high] per neuron."""
    linear = site.linear_map(tolerance)
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    grid = low[:, None] + (high - low)[:, None] * t[None, :]
    return float((site.spec.fn(grid) - (linear.scale[:, None] * grid + linear.shift[:, None])).abs().max())


def _withdraw_on_validation(
    reference: nn.Module, sites: list[SiteStats], validate: Batches, tolerance: float, leaf_modules: tuple,
    shards: _Shards, frontend: str = "fx",
) -> list[Refusal]:
    """Withdraw the rewrites of neurons the validation samples show outside the region they were decided in.

    Validation can only take rewrites away: a piecewise-linear neuron that
    was seen in a second region keeps its activation (the site stays) or
    leaves the dead mask; a smooth site whose surrogate is off by more than
    the tolerance on the validation range keeps its activation.
    """
    if not validate.samples:
        return []
    graph = capture(reference, validate[0], frontend=frontend, leaf_modules=leaf_modules)
    seen = {s.name: s for s in shards.calibrate(graph, validate)}
    withdrawals = []
    samples = validate.samples
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
                detail = {
                    "neurons": site.num_neurons, "rewrite": "affine surrogate", "error": error, "allowed": allowed,
                    "validation_samples": samples,
                }
                reason = Reason(RefusalCode.SURROGATE_OFF_ON_VALIDATION, detail)
                site.withdraw(torch.ones(site.num_neurons, dtype=torch.bool), reason)
                withdrawals.append(Refusal(WITHDRAWAL, site.name, reason))
            continue
        rewritten = site.neuron_region >= 0 if linear.ok else site.dead_neurons()
        region = site.neuron_region.clamp_min(0)
        elsewhere = other.region_counts > 0
        elsewhere[region, torch.arange(site.num_neurons)] = False
        left = rewritten & elsewhere.any(0)
        if not left.any():
            continue
        detail = {
            "neurons": int(left.sum()), "rewrite": "linearized" if linear.ok else "dead mask",
            "neuron_indices": [int(i) for i in left.nonzero().flatten()[:32]], "validation_samples": samples,
        }
        reason = Reason(RefusalCode.LEFT_REGION_ON_VALIDATION, detail)
        site.withdraw(left, reason)
        withdrawals.append(Refusal(WITHDRAWAL, site.name, reason))
    return withdrawals


def _sites_leaving_region(
    reference: nn.Module, sites: list[SiteStats], holdout: Batches, tolerance: float, leaf_modules: tuple,
    shards: _Shards, frontend: str = "fx",
) -> list[str]:
    """Sites with neurons that stayed in one region on calibration data but not on held-out data.

    Those neurons were rewritten (linearized or masked as dead) on the strength
    of the calibration data alone; they are the usual cause of a failed check.
    """
    graph = capture(reference, holdout[0], frontend=frontend, leaf_modules=leaf_modules)
    held = {s.name: s for s in shards.calibrate(graph, holdout)}
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


@dataclass
class _Attempt:
    """One trace-calibrate-rewrite of the model and what it produced."""

    gm: fx.GraphModule
    sites: list[SiteStats]
    pipeline: PipelineResult
    withdrawals: list[Refusal]
    crossings: CrossingSearch | None = None  # None after a full back-off: no statistical rewrite left to search

    @property
    def approximations(self) -> list[Rewrite]:
        """Rewrites that are not exact: smooth-activation surrogates and border-approximate merges."""
        smooth = {site.name for site in self.sites if site.spec.smooth}
        return [
            r for r in self.pipeline.rewrites
            if r.kind.is_approximate or (r.kind is RewriteKind.LINEARIZED and r.nodes[0] in smooth)
        ]

    @property
    def border_approximate(self) -> list[Rewrite]:
        return [r for r in self.approximations if r.kind is RewriteKind.MERGED_BORDER_APPROXIMATE]

    @property
    def statistical(self) -> list[Rewrite]:
        """The rewrites that rest on calibration statistics (linearized sites and dead masks)."""
        return [r for r in self.pipeline.rewrites if r.kind in (RewriteKind.LINEARIZED, RewriteKind.DEAD_MASKED)]


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


def compile(  # noqa: A001 - the issue's public name
    model: nn.Module,
    calibration,
    tolerance: float = 1e-5,
    *,
    holdout: float = 0.2,
    validation: float = DEFAULT_VALIDATION,
    strict: bool = False,
    min_observations: int = DEFAULT_MIN_OBSERVATIONS,
    crossing_radius: float = DEFAULT_CROSSING_RADIUS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    approximate: bool = False,
    cost_model=None,
    merge_plan: str = "cost",
    channel_alignment: int = CHANNEL_ALIGNMENT,
    steps: list[Step] | None = None,
    split_seed: int = DEFAULT_SPLIT_SEED,
    debug: bool = False,
    progress: bool = False,
    leaf_modules=(),
    on_stage: Callable[[StageEvent], None] | None = None,
    runtime=None,
    frontend: str = "fx",
) -> CompileResult:
    """Compile ``model`` into a shallower torch.fx GraphModule that computes the same function.

    ``calibration``: a tensor batch, an iterable of tensors or (input, target)
    tuples, or a DataLoader. The samples are split by a permutation seeded
    with ``split_seed`` (the same split every run; ``result.split`` lists
    each part's sample indices). The ``holdout`` fraction of them is not
    used to decide anything: the compiled module is checked against the
    original on it (see ``verification_rtol`` for what is allowed; inf/NaN
    never is). The ``validation`` fraction only withdraws rewrites whose
    neurons leave their region there. Duplicated samples count once as
    evidence (each sample is hashed as it is read; a warning says when many
    repeat), and the report says how many held-out samples are new. Every
    batch is a copy: a model that writes into its input never changes
    ``calibration``. Without ``strict`` a failed final check withdraws the
    statistically rewritten sites in steps, most marginal (on the decide
    split) first, each step re-validated on the validation part, with at most
    ``compiler_backoff.HELD_OUT_CHECKS`` more held-out checks; if none passes,
    every rewrite that rests on statistics is withdrawn and the rest
    compiled; then the exact folds and merges that move the float32 output
    beyond the allowance are found pass by pass on the validation part and
    withheld (``RefusalCode.EXACT_REWRITE_WITHDRAWN``), VerificationError only
    when the graph fails with every one withheld; with ``strict=True`` (and ``validation`` unused) it raises
    VerificationError as soon as the check fails. A site is only rewritten if
    each neuron was observed ``min_observations`` times (samples x positions).
    ``crossing_radius`` (0 disables) bounds a gradient search from the
    validation samples (analysis/crossings.py) for inputs within that fraction
    of each input feature's std that move a rewritten neuron out of its
    region; such neurons are withdrawn.
    ``tolerance`` (finite, >= 0, else CalibrationError) bounds what
    smooth-activation surrogates and border-approximate merges may add to the
    error. Every output tensor is checked on its own scale and every sample on
    its own (``OUTPUT_RULE``; the report's ``guarantee`` names the worst output). ``approximate`` allows
    conv merges that are exact only away from the border; ``cost_model``
    ("analytic", "measured", or a cost object from costmodel.py) decides which
    merges pay; ``merge_plan="all"`` merges every conv chain whole.
    ``channel_alignment`` (default 8) keeps channel counts left by dead-channel
    removal at multiples of it (ONNX Runtime's CPU kernels run odd counts far
    slower); 1 removes every dead channel. ``debug`` checks numerics after
    every pass and names the pass that broke them. fp16/bf16 models are
    compiled and verified in fp32 (with a warning). ``leaf_modules``
    (submodule names or types) are traced as single calls, as are submodules
    torch.fx cannot trace through; the report's ``trace`` section lists them
    (activations inside are not analysed). ``frontend`` captures the graphs:
    "fx" (symbolic tracing), "export" (torch.export, which runs the model and
    captures what fx cannot) or "auto" (fx, torch.export when fx fails); the
    report's ``trace`` section says which ran and why (analysis/capture.py). ``model`` is never run and never
    mutated; a model whose outputs differ for the same input twice is refused.
    ``on_stage`` is called with a :class:`StageEvent` as each stage starts and
    ends (the command line prints them on a terminal); ``progress`` shows a
    bar over the calibration batches. ``runtime`` (one rank of a torchrun
    job, ``egp_export.prune.distributed.runtime_from_env()``) splits the
    calibration, validation and verification work over the ranks and merges
    their statistics and errors exactly: every rank returns the same module
    and report, as one process on all samples would (every rank must be
    given the same calibration data; the measured cost model is refused, its
    timings differ between processes).
    """
    started = time.perf_counter()
    stages = _Stages(on_stage)
    if min_observations < 0:
        raise CalibrationError(f"min_observations must be >= 0, got {min_observations}.")
    check_tolerance(tolerance)
    if not crossing_radius >= 0 or crossing_radius == float("inf"):
        raise CalibrationError(
            f"crossing_radius must be a finite number >= 0 (0 disables the search), got {crossing_radius}."
        )
    working, dtype = _working_copy(model)
    batches = as_batches(calibration, batch_size=batch_size, signature=inputs.signature(working))
    batches = fitted_to(working, batches.map(_widened))
    split = split_holdout(batches, holdout, 0.0 if strict else validation, seed=split_seed)
    shards = _Shards(runtime)
    shards.check(split)
    shards.check_same_model(working)
    leaf_modules = tuple(leaf_modules)
    stages.start("trace")
    # warns about training mode; compiles the eval-mode behaviour
    gm = capture(working, split.calibrate[0], frontend=frontend, leaf_modules=leaf_modules)
    frontend = resolved_frontend(gm)  # every later graph from the front end that ran ("auto" decided once)
    traced = trace_facts(gm)
    stages.done(nodes=len(gm.graph.nodes), leaf_modules=len(traced.leaf_modules))
    reference = working.eval()
    noise_batch = [inputs.take(split.holdout[0], slice(0, NOISE_SAMPLES))]
    # The fp64 reference run is slow on CPU: measured up front only in debug
    # mode (every pass is checked against it), else only if the plain fp32
    # floor is not met.
    noise = fp32_noise(reference, noise_batch) if debug else None
    cost = resolve_cost_model(cost_model)
    if isinstance(cost, MeasuredCost) and shards.world > 1:
        raise EgpExportError(
            "the measured cost model times convolutions in each process, so processes could plan different merges; "
            "use the analytic cost model (the default) when compiling under torchrun."
        )
    example = inputs.take(split.calibrate[0], slice(0, 1))

    def rewrite(gm: fx.GraphModule, sites: list[SiteStats], withdraw_everything: Reason | None = None) -> _Attempt:
        withdrawals: list[Refusal] = []
        crossings = None
        if withdraw_everything:
            for site in sites:
                site.withdraw(torch.ones(site.num_neurons, dtype=torch.bool), withdraw_everything)
        else:
            _withdraw_thin_evidence(sites, tolerance, min_observations, distinct, split.decide_samples)
            withdrawals = _withdraw_on_validation(
                reference, sites, split.validate, tolerance, leaf_modules, shards, frontend
            )
            start = split.validate if split.validate.samples else split.calibrate
            crossings = search_crossings(
                reference, sites, start, split.calibrate, tolerance, radius=crossing_radius, leaf_modules=leaf_modules,
                frontend=frontend,
            )
            withdrawals += [Refusal(WITHDRAWAL, name, reason) for name, reason in crossings.reasons]
        return run_passes(gm, sites, withdrawals, crossings)

    def run_passes(
        gm: fx.GraphModule, sites: list[SiteStats], withdrawals: list[Refusal], crossings: CrossingSearch | None,
        withheld: frozenset[str] = frozenset(), on_pass=None,
    ) -> _Attempt:
        manager = PassManager(
            steps if steps is not None else default_steps(
                tolerance, approximate=approximate, cost=cost, plan=merge_plan, channel_alignment=channel_alignment
            ),
            example_input=example,
            debug_inputs=split.calibrate[0] if debug else None,
            debug_rtol=verification_rtol(tolerance, noise or 0.0, approximated=True),
            float64=True,
            withheld=withheld,
            on_pass=on_pass,
        )
        pipeline = manager.run(gm)
        propagate_shapes(gm, example)
        return _Attempt(gm, sites, pipeline, withdrawals, crossings)

    def rebuild(sites: list[SiteStats], withheld: frozenset[str] = frozenset(), on_pass=None) -> _Attempt:
        """A fresh trace rewritten with ``sites`` (decide-split statistics, withdrawals marked): no re-calibration.
        The folding and merging passes leave the nodes ``withheld`` alone (``EVERY_NODE``: every one)."""
        fresh = capture(working, example, frontend=frontend, leaf_modules=leaf_modules)
        attach_sites(fresh, sites)
        propagate_shapes(fresh, example)
        if withheld is EVERY_NODE:
            withheld = frozenset(node.name for node in fresh.graph.nodes)
        return run_passes(fresh, sites, [], attempt.crossings, withheld, on_pass)  # the first search still stands

    validation_part = split.validate if split.validate.samples else split.calibrate

    def validates(candidate: _Attempt) -> bool:
        """The candidate against the original on the validation part (the decide part when there is none)."""
        allowed = verification_rtol(tolerance, noise or 0.0, approximated=bool(candidate.approximations))
        return shards.error(reference, candidate.gm, validation_part).within(allowed)

    def check(attempt: _Attempt) -> tuple[ErrorStats, float]:
        nonlocal noise
        error = shards.error(reference, attempt.gm, split.holdout)
        approximated = bool(attempt.approximations)
        if not error.within(verification_rtol(tolerance, noise or 0.0, approximated=approximated)) and noise is None:
            noise = fp32_noise(reference, noise_batch)
        return error, verification_rtol(tolerance, noise or 0.0, approximated=approximated)

    stages.start("calibrate")
    sites = shards.calibrate(gm, split.calibrate, progress=progress)  # first: data the model rejects: CalibrationError
    shards.merge_digests(split, split.calibrate)
    distinct = split.distinct_decide_samples()
    stages.done(samples=split.decide_samples, sites=len(sites))
    calibrated = time.perf_counter()
    before = summarize(gm)
    predicted_before = conv_seconds(gm, cost)
    stages.start("rewrite")
    attempt = rewrite(gm, sites)
    stages.done(
        rewrites=len(attempt.pipeline.rewrites), refusals=len(attempt.pipeline.refusals),
        withdrawals=len(attempt.withdrawals),
    )
    _check_deterministic(reference, split.holdout)
    withdrawals = list(attempt.withdrawals)
    rewritten = time.perf_counter()
    stages.start("verify")
    error, rtol = check(attempt)
    stages.done(samples=split.holdout_samples, max_rel=error.max_rel, allowed=rtol)
    # Back off when statistics may be at fault; a failure with border-approximate merges (the user's
    # explicit approximate=True) is reported instead: their tolerance, not the data, decides those.
    held_out_checks = 1
    if not error.within(rtol) and not strict and attempt.statistical and not attempt.border_approximate:
        failed = Reason(
            RefusalCode.FINAL_CHECK_FAILED,
            {"max_rel": error.max_rel, "allowed": rtol, "verification_samples": split.holdout_samples},
        )
        if len({r.nodes[0] for r in attempt.statistical}) > 1:  # one site: the stepwise back-off is the last resort
            stages.start("back-off")
            stepped = back_off_in_steps(attempt, failed, rebuild, validates, check, WITHDRAWAL)
            held_out_checks += stepped.held_out_checks
            stages.done(withdrawn=len(stepped.withdrawals), held_out_checks=stepped.held_out_checks, passed=stepped.passed)
            if stepped.passed:
                attempt, error, rtol = stepped.attempt, stepped.error, stepped.rtol
                withdrawals += stepped.withdrawals
    if not error.within(rtol) and not strict and attempt.statistical and not attempt.border_approximate:
        withdrawals += [
            Refusal(WITHDRAWAL, r.nodes[0], Reason(failed.code, {**failed.detail, "rewrite": r.kind}))
            for r in attempt.statistical
        ]
        stages.start("back-off")
        fresh = capture(working, example, frontend=frontend, leaf_modules=leaf_modules)
        attempt = rewrite(fresh, shards.calibrate(fresh, split.calibrate), failed)
        stages.done(withdrawn=len(withdrawals), rewrites=len(attempt.pipeline.rewrites))
        stages.start("verify")
        error, rtol = check(attempt)
        held_out_checks += 1
        stages.done(samples=split.holdout_samples, max_rel=error.max_rel, allowed=rtol)
    exact_withdrawn = False
    if not error.within(rtol) and not strict and not attempt.statistical and not attempt.approximations:
        # Only exact rewrites are left: withhold those that move the float32 output, decided on the validation part.
        failed = Reason(
            RefusalCode.FINAL_CHECK_FAILED,
            {"max_rel": error.max_rel, "allowed": rtol, "verification_samples": split.holdout_samples},
        )
        stages.start("back-off")
        exact = withdraw_exact_rewrites(
            failed, attempt.pipeline.rewrites, lambda withheld, observe: rebuild(attempt.sites, withheld, observe),
            lambda gm: shards.error(reference, gm, validation_part), check, rtol,
            ("validation" if split.validate.samples else "decide", validation_part.samples), WITHDRAWAL,
        )
        held_out_checks += exact.held_out_checks
        stages.done(withdrawn=len(exact.withdrawals), held_out_checks=exact.held_out_checks, passed=exact.passed)
        attempt, error, rtol, exact_withdrawn = exact.attempt, exact.error, exact.rtol, True
        withdrawals += exact.withdrawals
    if not error.within(rtol):
        hint = _failure_hint(attempt, reference, split, tolerance, strict, leaf_modules, shards, exact_withdrawn, frontend)
        raise _verification_error(error, rtol, split, hint)
    if isinstance(cost, MeasuredCost):
        cost.save()
    shards.merge_digests(split, split.holdout)
    samples = _distinct_samples(split)
    if samples["note"]:
        warnings.warn(f"egp-export: {samples['note']}", UserWarning, stacklevel=2)
    report = _report(
        attempt, split, tolerance, before, predicted_before, cost, error, rtol, noise, dtype, withdrawals, samples,
        min_observations=min_observations, strict=strict, traced=traced.to_dict(),
        seconds={"start": started, "calibrated": calibrated, "rewritten": rewritten},
    )
    report["verification"]["held_out_checks"] = held_out_checks
    report["regions"] = site_regions(attempt.sites, attempt.pipeline.rewrites, tolerance, model=working)
    return CompileResult(module=attempt.gm, report=report, sites=attempt.sites, split=split.indices())


def _failure_hint(
    attempt: _Attempt, reference: nn.Module, split: CalibrationSplit, tolerance: float, strict: bool, leaf_modules: tuple,
    shards: _Shards, exact_withdrawn: bool = False, frontend: str = "fx",
) -> str:
    if exact_withdrawn:
        return (
            " Even with every fold and merge withheld the compiled graph differs from the original, so no rewrite is "
            "at fault: this is the model's own numerics (float32 rounding above the allowance) or a forward that "
            "computes differently when traced; state the error you accept with tolerance (--tolerance)."
        )
    hint = ""
    statistical = bool(attempt.statistical)
    moved = (
        _sites_leaving_region(reference, attempt.sites, split.holdout, tolerance, leaf_modules, shards, frontend)
        if statistical else []
    )
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


def _report(
    attempt: _Attempt, split: CalibrationSplit, tolerance: float, before: dict, predicted_before: float, cost,
    error: ErrorStats, rtol: float, noise: float | None, dtype: dict, withdrawals: list[Refusal], samples: dict, *,
    min_observations: int, strict: bool, seconds: dict, traced: dict,
) -> dict:
    gm, pipeline, sites = attempt.gm, attempt.pipeline, attempt.sites
    outcomes = _site_outcomes(sites, pipeline.rewrites, pipeline.refusals)
    analysis = summarize_sites(sites, tolerance)
    for row in analysis["sites"]:
        row["linearized"] = outcomes[row["name"]]["linearized"]
        row["action"] = outcomes[row["name"]]["action"]
    notes = [note for note in (dtype["note"], samples["note"]) if note]
    if noise is not None and noise_floor(noise) > FP32_RTOL:
        notes.append(
            f"the original model's own fp32 noise ({noise:.3g} vs fp64) raised the floor for exact rewrites to "
            f"{noise_floor(noise):.3g} (8x the noise, capped at {NOISE_CAP:g})"
        )
    verified = split.holdout_samples if split.holdout is not split.calibrate else 0
    evidence = [
        {"site": site.name, "action": outcomes[site.name]["action"], **site.evidence(samples["decide"], split.decide_samples)}
        for site in sites if outcomes[site.name]["rewritten"]
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
            "distinct_decide_samples": samples["decide"],
            "distinct_holdout_samples": samples["holdout"],
            "split_seed": split.seed,
            "sample_shape": inputs.sample_shape(split.calibrate[0]),
        },
        "trace": traced,
        "analysis": analysis,
        "rewrites": with_text(pipeline.rewrites, describe_rewrite, "action"),
        "refusals": with_text(pipeline.refusals, describe_refusal, "reason"),
        "withdrawals": with_text(withdrawals, describe_refusal, "reason"),
        "evidence": evidence,
        "steps": [{"step": name, "iterations": n} for name, n in pipeline.steps_run],
        "before": before,
        "after": summarize(gm),
        "predicted_conv_latency_us": {
            "cost_model": cost.name,
            "before": round(predicted_before * 1e6, 2),
            "after": round(conv_seconds(gm, cost) * 1e6, 2),
        },
        "activations_linearized": sum(1 for outcome in outcomes.values() if outcome["linearized"]),
        "verification": {
            "fp32_noise": noise,
            "dtype": dtype["compiled_dtype"],
            "model_dtype": dtype["model_dtype"],
            "approximations": len(attempt.approximations),
            "notes": notes,
            "pytorch": {**error.to_dict(), "rtol": rtol, "passed": True},
            "rule": OUTPUT_RULE,
        },
        "guarantee": {
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
            "allowed": rtol,
            "dtype": dtype["compiled_dtype"],
            "tolerance": tolerance,
            "min_observations": min_observations,
            "strict": strict,
            "site_bound": "each rewritten neuron stayed in its region on all n observations of the decide split "
            "(n counts distinct samples only); its rate of leaving it is below 3/n with 95% confidence (rule of "
            "three), see 'evidence'",
            "perturbation_search": attempt.crossings.to_dict() if attempt.crossings else
            {"skipped": "every statistical rewrite was withdrawn", "radius": None},
        },
        "compile_seconds": round(finished - seconds["start"], 3),
        "seconds": {
            "calibrate": round(seconds["calibrated"] - seconds["start"], 3),
            "rewrite": round(seconds["rewritten"] - seconds["calibrated"], 3),
            "verify": round(finished - seconds["rewritten"], 3),
        },
    }
