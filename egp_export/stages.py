"""The compile's stages and the context they share: prepare -> capture -> calibrate -> decide -> rewrite -> verify.

Each stage is a function of the ``CompileContext``: it reads what earlier
stages left there, adds its own result and returns the facts its
``StageEvent`` carries. ``CompileContext.run`` runs a list of them, tells
``on_stage`` when each starts and ends and keeps their timings (the report's
``seconds`` are these, and nothing else). The back-off (compiler_backoff.py)
re-runs capture -> decide -> rewrite under a withdrawal policy
(``rebuild``); the report stage lives with the report (compiler.py).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.batches import Batches, CalibrationSplit, as_batches, fitted_to, split_holdout
from egp_export.analysis.capture import capture as capture_graph
from egp_export.analysis.capture import resolved_frontend
from egp_export.analysis.crossings import CrossingSearch, search_crossings
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.inputs import Batch, batch_size, call, call_on_copy, signature, structured, take
from egp_export.analysis.numerics import FP32_RTOL, NOISE_CAP, NOISE_FACTOR, ErrorAccumulator, ErrorStats, compare, fp32_noise
from egp_export.analysis.plans import plan_site, store_plans
from egp_export.analysis.stats import META_KEY, SiteStats, rejected_sample
from egp_export.analysis.stats import calibrate as calibrate_graph
from egp_export.analysis.summary import summarize
from egp_export.analysis.trace import owned_copy, trace, trace_facts
from egp_export.compile_options import CompileOptions, resolve_cost_model
from egp_export.errors import CalibrationError, VerificationError
from egp_export.passes import PassManager, PipelineResult, conv_seconds, default_steps
from egp_export.plan_filters import (
    Plans,
    withdraw_crossings,
    withdraw_on_validation,
    withdraw_thin_evidence,
)
from egp_export.records import Refusal, Rewrite, RewriteKind

# Samples the fp32-vs-fp64 noise of the original model is measured on (fp64
# convolutions are slow on CPU; a few samples show the conditioning).
NOISE_SAMPLES = 4
# Models in these dtypes are compiled and verified in float32 (half-precision
# rounding would hide wrong rewrites: 5e-2 relative error "verified" in bf16).
_WIDENED_DTYPES = (torch.float16, torch.bfloat16)
# ``rebuild``'s ``withheld`` for the last resort of the exact back-off: withhold every node of the fresh capture.
EVERY_NODE = frozenset({"*"})
# Two runs of the model on the same input may differ by this much (relative):
# nondeterministic GPU reductions round differently (~1e-7), far below what
# verification allows; dropout left on differs by O(1).
DETERMINISM_RTOL = 1e-6


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


@dataclass(frozen=True)
class StageEvent:
    """A compile stage starting (``done`` False) or finished (``done`` True, with its seconds and facts).

    Stages in order: "prepare", "capture", "calibrate", "decide", "rewrite",
    "verify"; a failed check adds "back-off" stages (compiler_backoff.py; the
    one that withdraws every statistical rewrite is followed by a second
    "verify"); "report" ends a compile that passed. ``facts`` are numbers
    (sites, rewrites, max_rel, ...).
    """

    stage: str
    done: bool
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A named step of the compile: ``run(ctx)`` returns the facts its StageEvent carries."""

    name: str
    run: Callable[[CompileContext], dict]


class StageLog:
    """Tells ``on_stage`` (if any) when each stage starts and ends; the only clock of the compile."""

    def __init__(self, on_stage: Callable[[StageEvent], None] | None) -> None:
        self.on_stage = on_stage
        self.timings: list[tuple[str, float]] = []

    def run(self, stage: Stage, ctx: CompileContext) -> None:
        if self.on_stage is not None:
            self.on_stage(StageEvent(stage.name, False))
        started = time.perf_counter()
        facts = stage.run(ctx)
        seconds = time.perf_counter() - started
        self.timings.append((stage.name, seconds))
        if self.on_stage is not None:
            self.on_stage(StageEvent(stage.name, True, seconds, facts))

    def seconds(self) -> dict[str, float]:
        """Seconds per stage name (a stage run twice: the sum), in the order the stages first ran."""
        total: dict[str, float] = {}
        for name, seconds in self.timings:
            total[name] = total.get(name, 0.0) + seconds
        return {name: round(seconds, 3) for name, seconds in total.items()}


class Shards:
    """Which samples this process works on, and the merges that make every process agree.

    One process: all of them, nothing to merge. Under torchrun (``runtime``
    with ``world_size`` > 1, e.g. ``egp_export.distributed.runtime_from_env()``):
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
        sites = calibrate_graph(gm, self.of(batches), progress=progress)
        if self.world > 1:
            self.runtime.reduce_sites(sites)
        return sites

    def error(self, reference: nn.Module, candidate: nn.Module, batches: Batches) -> ErrorStats:
        """The candidate's error against the reference over ``batches``, a batch at a time (no outputs are kept)."""
        errors, share = ErrorAccumulator(), self.of(batches)
        with torch.no_grad():
            read = 0
            for number, batch in enumerate(share):
                errors.add(_reference_output(reference, share, number, batch, read), call(candidate, batch))
                read += batch_size(batch)
        if self.world > 1:
            errors.all_reduce(self.runtime, share.start - batches.start)
        return errors.result()


def _reference_output(reference: nn.Module, part: Batches, number: int, batch: Batch, read: int):
    """The original model's output on ``batch`` (batch ``number`` of ``part``, after ``read`` samples of it).

    The held-out part is first run here, not in calibration: a sample the model rejects (a token id beyond the
    vocabulary) is named in a CalibrationError, as calibration names one.
    """
    try:
        with torch.no_grad():
            return call_on_copy(reference, batch)  # a model may write into its input
    except (CalibrationError, MemoryError):
        raise
    except Exception as error:  # the model ran on the decide part, so this is the data
        raise rejected_sample(reference, part, number, batch, read, error) from None


@dataclass
class Attempt:
    """One capture rewritten with one set of plans, and what it produced."""

    gm: fx.GraphModule
    sites: list[SiteStats]
    plans: Plans
    pipeline: PipelineResult
    withdrawals: list[Refusal]
    crossings: CrossingSearch | None = None  # None after a full back-off: no statistical rewrite left to search

    @property
    def approximations(self) -> list[Rewrite]:
        """Rewrites that are not exact: smooth-activation surrogates and border-approximate merges."""
        smooth = {name for name, plan in self.plans.items() if plan.spec.smooth}
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


# A withdrawal policy turns the decided plans into the plans to apply: (plans, withdrawals, perturbation search).
Policy = Callable[["CompileContext", Plans], tuple[Plans, list[Refusal], CrossingSearch | None]]


@dataclass
class CompileContext:
    """What the stages share: the options, the working copy and its reference, the split and its shards, the cost
    model, the front end's graph, the noise, the plans and the current attempt, and the stage log."""

    options: CompileOptions
    model: nn.Module
    calibration: object
    log: StageLog = None
    policy: Policy | None = None  # None: the data's own filters (thin evidence, validation, perturbation search)
    working: nn.Module | None = None  # the copy compiled; in eval mode it is the reference every check runs
    reference: nn.Module | None = None
    dtype: dict = field(default_factory=dict)
    split: CalibrationSplit | None = None
    shards: Shards | None = None
    cost: object = None
    example: Batch | None = None
    noise: float | None = None
    noise_batch: list = field(default_factory=list)
    frontend: str | None = None  # the front end that captured the first graph ("auto" resolved once)
    gm: fx.GraphModule | None = None
    traced: dict = field(default_factory=dict)
    sites: list[SiteStats] = field(default_factory=list)
    before: dict = field(default_factory=dict)
    predicted_before: float = 0.0
    plans: Plans = field(default_factory=dict)
    crossings: CrossingSearch | None = None
    withdrawals: list[Refusal] = field(default_factory=list)  # every withdrawal so far, as the report lists them
    decided_withdrawals: list[Refusal] = field(default_factory=list)  # the last decide stage's own
    attempt: Attempt | None = None
    error: ErrorStats | None = None
    rtol: float = float("nan")
    held_out_checks: int = 0
    exact_withdrawn: bool = False
    report: dict | None = None

    def __post_init__(self) -> None:
        if self.log is None:
            self.log = StageLog(self.options.on_stage)

    def run(self, stages) -> None:
        for stage in stages:
            self.log.run(stage, self)

    @property
    def passed(self) -> bool:
        return self.error is not None and self.error.within(self.rtol)

    def fresh_graph(self) -> fx.GraphModule:
        """A fresh graph of the working copy from the chosen front end (the caller's model is never captured)."""
        return capture_graph(
            self.working, self.split.calibrate[0], frontend=self.frontend or self.options.frontend,
            leaf_modules=self.options.leaf_modules,
        )

    def allowance(self, approximated: bool) -> float:
        return verification_rtol(self.options.tolerance, self.noise or 0.0, approximated=approximated)

    @property
    def validation_part(self) -> Batches:
        """The part that validates back-off candidates: the validation part, the decide part when there is none."""
        return self.split.validate if self.split.validate.samples else self.split.calibrate


# The stages ------------------------------------------------------------------------------------------------------


def prepare(ctx: CompileContext) -> dict:
    """The working copy (fp32), the batches, the seeded split, the shards, the cost model, the example."""
    options = ctx.options
    ctx.working, ctx.dtype = _working_copy(ctx.model)
    batches = as_batches(ctx.calibration, batch_size=options.batch_size, signature=signature(ctx.working))
    batches = fitted_to(ctx.working, batches.map(_widened))
    validation = 0.0 if options.strict else options.validation
    ctx.split = split_holdout(batches, options.holdout, validation, seed=options.split_seed)
    ctx.shards = Shards(options.runtime)
    ctx.shards.check(ctx.split)
    ctx.shards.check_same_model(ctx.working)
    ctx.cost = resolve_cost_model(options.cost_model)
    ctx.example = take(ctx.split.calibrate[0], slice(0, 1))
    ctx.noise_batch = [take(ctx.split.holdout[0], slice(0, NOISE_SAMPLES))]
    return {"samples": ctx.split.calibration_samples}


def capture(ctx: CompileContext) -> dict:
    """The graph to rewrite; the working copy becomes the eval-mode reference (capture warns about training mode)."""
    ctx.gm = ctx.fresh_graph()
    ctx.frontend = resolved_frontend(ctx.gm)  # every later graph from the front end that ran
    ctx.traced = trace_facts(ctx.gm).to_dict()
    ctx.reference = ctx.working.eval()
    # The fp64 reference run is slow on CPU: measured up front only in debug mode (every pass is checked against
    # it), else only if the plain fp32 floor is not met.
    ctx.noise = fp32_noise(ctx.reference, ctx.noise_batch) if ctx.options.debug else None
    return {"nodes": len(ctx.gm.graph.nodes), "leaf_modules": len(ctx.traced["leaf_modules"])}


def calibrate(ctx: CompileContext) -> dict:
    """Activation statistics on the decide part (first: data the model rejects raises CalibrationError)."""
    ctx.sites = ctx.shards.calibrate(ctx.gm, ctx.split.calibrate, progress=ctx.options.progress)
    ctx.shards.merge_digests(ctx.split, ctx.split.calibrate)
    ctx.before, ctx.predicted_before = summarize(ctx.gm), conv_seconds(ctx.gm, ctx.cost)
    return {"samples": ctx.split.decide_samples, "sites": len(ctx.sites)}


def decide(ctx: CompileContext) -> dict:
    """One plan per site from its statistics and the tolerance, filtered by the policy; stored on the nodes."""
    decided = {site.name: plan_site(site, ctx.options.tolerance) for site in ctx.sites}
    ctx.plans, withdrawals, ctx.crossings = (ctx.policy or filter_on_data)(ctx, decided)
    ctx.withdrawals += withdrawals
    ctx.decided_withdrawals = withdrawals
    attach(ctx.gm, ctx.sites, ctx.plans)
    actions = [plan.action.value for plan in ctx.plans.values()]
    return {**{action: actions.count(action) for action in ("linearize", "mask_dead", "keep")},
            "withdrawals": len(withdrawals)}


def filter_on_data(ctx: CompileContext, plans: Plans) -> tuple[Plans, list[Refusal], CrossingSearch]:
    """The default policy: thin evidence, then the validation part, then the perturbation search take rewrites away."""
    options, split = ctx.options, ctx.split
    distinct = split.distinct_decide_samples()
    plans = withdraw_thin_evidence(plans, ctx.sites, options.min_observations, distinct, split.decide_samples)
    withdrawals = []
    if split.validate.samples:
        seen = {s.name: s for s in ctx.shards.calibrate(ctx.fresh_graph(), split.validate)}
        plans, withdrawals = withdraw_on_validation(plans, ctx.sites, seen, split.validate.samples, options.tolerance)
    start = split.validate if split.validate.samples else split.calibrate
    search = search_crossings(ctx.fresh_graph, ctx.sites, plans, start, split.calibrate, radius=options.crossing_radius)
    plans, crossed = withdraw_crossings(plans, search)
    return plans, withdrawals + crossed, search


def rewrite(ctx: CompileContext) -> dict:
    """The pass pipeline over the captured graph, applying the plans stored on it."""
    ctx.attempt = run_passes(ctx, ctx.gm, ctx.plans, ctx.decided_withdrawals, ctx.crossings)
    pipeline = ctx.attempt.pipeline
    return {"rewrites": len(pipeline.rewrites), "refusals": len(pipeline.refusals)}


def verify(ctx: CompileContext) -> dict:
    """The compiled module against the original on the held-out part (first refusing a nondeterministic model)."""
    if not ctx.held_out_checks:
        _check_deterministic(ctx.reference, ctx.split.holdout)
    ctx.error, ctx.rtol = check(ctx, ctx.attempt)
    return {"samples": ctx.split.holdout_samples, "max_rel": ctx.error.max_rel, "allowed": ctx.rtol}


PIPELINE = (
    Stage("prepare", prepare),
    Stage("capture", capture),
    Stage("calibrate", calibrate),
    Stage("decide", decide),
    Stage("rewrite", rewrite),
    Stage("verify", verify),
)


# What the stages and the back-off share -----------------------------------------------------------------------


def run_passes(
    ctx: CompileContext, gm: fx.GraphModule, plans: Plans, withdrawals: list[Refusal],
    crossings: CrossingSearch | None, withheld: frozenset[str] = frozenset(), on_pass=None,
) -> Attempt:
    """Rewrite ``gm`` (its nodes carry ``plans``); the folding and merging passes leave ``withheld`` nodes alone."""
    options = ctx.options
    steps = list(options.steps) if options.steps is not None else default_steps(
        approximate=options.approximate, cost=ctx.cost, plan=options.merge_plan,
        channel_alignment=options.channel_alignment, conv_merging=options.conv_merging,
    )
    manager = PassManager(
        steps, example_input=ctx.example, debug_inputs=ctx.split.calibrate[0] if options.debug else None,
        debug_rtol=ctx.allowance(True), float64=True, withheld=withheld, on_pass=on_pass,
    )
    pipeline = manager.run(gm)
    propagate_shapes(gm, ctx.example)
    return Attempt(gm, ctx.sites, plans, pipeline, withdrawals, crossings)


def rebuild(ctx: CompileContext, plans: Plans, withheld: frozenset[str] = frozenset(), on_pass=None) -> Attempt:
    """capture -> decide (``plans``, already filtered) -> rewrite on a fresh graph: no re-calibration. The folding
    and merging passes leave the nodes ``withheld`` alone (compiler_backoff.EVERY_NODE: every one)."""
    fresh = ctx.fresh_graph()
    attach(fresh, ctx.sites, plans)
    propagate_shapes(fresh, ctx.example)
    if withheld is EVERY_NODE:
        withheld = frozenset(node.name for node in fresh.graph.nodes)
    return run_passes(ctx, fresh, plans, [], ctx.attempt.crossings, withheld, on_pass)  # the first search stands


def attach(gm: fx.GraphModule, sites: list[SiteStats], plans: Plans) -> None:
    """The decide-split statistics and the plans on the nodes of the same names (a fresh capture names them alike):
    the passes require the statistics and apply the plans."""
    by_name = {site.name: site for site in sites}
    for node in gm.graph.nodes:
        if node.name in by_name:
            node.meta[META_KEY] = by_name[node.name]
    store_plans(gm, plans)


def validates(ctx: CompileContext, candidate: Attempt) -> bool:
    """The candidate against the original on the validation part (the decide part when there is none)."""
    allowed = ctx.allowance(bool(candidate.approximations))
    return ctx.shards.error(ctx.reference, candidate.gm, ctx.validation_part).within(allowed)


def check(ctx: CompileContext, attempt: Attempt) -> tuple[ErrorStats, float]:
    """The held-out check (counted): the error and what it allows; a failure first measures the model's own noise."""
    error = ctx.shards.error(ctx.reference, attempt.gm, ctx.split.holdout)
    ctx.held_out_checks += 1
    approximated = bool(attempt.approximations)
    if not error.within(ctx.allowance(approximated)) and ctx.noise is None:
        ctx.noise = fp32_noise(ctx.reference, ctx.noise_batch)
    return error, ctx.allowance(approximated)


def _widened(batch: Batch) -> Batch:
    return structured(batch, lambda tensor: tensor.float() if tensor.dtype in _WIDENED_DTYPES else tensor)


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
        warnings.warn(f"egp-export: {facts['note']}", UserWarning, stacklevel=6)
    return working, facts


def _check_deterministic(reference: nn.Module, part: Batches) -> None:
    """Refuse a model that gives different outputs for the same input twice: nothing could be verified against it."""
    batch = part[0]
    first = _reference_output(reference, part, 0, batch, 0)
    with torch.no_grad():
        second = call_on_copy(reference, batch)
    drift = compare(first, second)
    if not drift.within(DETERMINISM_RTOL):
        raise VerificationError(
            f"the model is not deterministic: the same input gave outputs {drift.max_rel:.3g} apart (relative) on two "
            "runs in eval mode, so no compiled copy can be verified against it. Remove randomness from forward() in "
            "eval mode (dropout with training=True, torch.rand*, state updated in forward) before compiling."
        )
