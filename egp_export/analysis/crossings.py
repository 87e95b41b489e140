"""Searching near the validation samples for inputs that move a rewritten neuron out of its region.

A rewrite that rests on statistics (a linearized site, a dead-channel mask)
holds for the samples seen; a fresh input from the same distribution can
still put one neuron across a boundary (measured: a random ResNet-18 that
verified on its held-out part differed by 3.2e-5 on fresh inputs). This
validation stage looks for such inputs on purpose: starting from a capped
number of samples it takes a few signed-gradient steps (PGD) on the
*original* model, inside a box of half-width ``radius`` x the per-feature
standard deviation of the decide samples, that drive the rewritten neurons
toward the nearest boundary of the region they were rewritten in (always
OFF, always ON, or one region of ReLU6/Hardtanh/Hardswish). Every neuron seen
outside its region at any step is withdrawn; it can only take rewrites away.

The objective, per sample: the soft minimum over every rewritten neuron of
its signed margin (distance to the nearest boundary of its region, negative
outside it; the minimum over positions), each divided by that neuron's
calibrated spread (high - low) so that neurons are compared at their own
scale. The soft minimum concentrates the step on the neurons nearest to a
boundary, and different samples reach different neurons.

It is a search, not a proof: what it did not flip within the radius may
still flip (proofs over an input domain by bound propagation were measured
far too loose at ResNet-18 size, see DESIGN.md). Integer and bool inputs
(token ids, attention masks) have no neighbourhood to search: of a model with
several inputs only the floating ones are perturbed, the others are held as
they are and named in the result (``unsearched_inputs``); smooth-activation
surrogates are validated on their range instead (compiler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from egp_export.analysis import inputs
from egp_export.analysis.batches import Batches
from egp_export.analysis.plans import SitePlan
from egp_export.analysis.stats import SiteStats
from egp_export.records import Reason, RefusalCode

# Half-width of the search box per input feature, as a fraction of that feature's standard deviation on the decide
# samples: a tenth of the data's own spread. 0 disables the search.
DEFAULT_CROSSING_RADIUS = 0.1
# The cost is bounded: (STEPS + 1) forward and STEPS backward passes of the original model over at most SAMPLES samples.
CROSSING_STEPS = 5
CROSSING_SAMPLES = 32
# Temperature of the soft minimum over neurons' normalized margins.
_SOFTMIN_TEMPERATURE = 0.05
# PGD's usual step: 2.5 x radius / steps, so the walk can reach the box's far side and come back.
_STEP_FACTOR = 2.5


@dataclass
class CrossingSearch:
    """What the search covered and which rewritten neurons it moved out of their region."""

    radius: float
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    searched_neurons: int = 0
    crossed: dict[str, torch.Tensor] = field(default_factory=dict)  # site name -> bool mask of neurons
    reasons: list[tuple[str, Reason]] = field(default_factory=list)  # (site name, why) per withdrawal made
    skipped: str | None = None  # why nothing was searched
    unsearched_inputs: list[str] = field(default_factory=list)  # inputs held as they are: "input_ids (int64)"

    @property
    def crossed_neurons(self) -> int:
        return sum(int(mask.sum()) for mask in self.crossed.values())

    def to_dict(self) -> dict:
        return {
            "radius": self.radius,
            "radius_unit": "fraction of each input feature's standard deviation on the decide samples (box)",
            "samples": self.samples,
            "steps": self.steps,
            "passes": f"{self.steps + 1} forward and {self.steps} backward passes of the original model"
            if self.samples else "none",
            "searched_neurons": self.searched_neurons,
            "crossed_neurons": self.crossed_neurons,
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "unsearched_inputs": list(self.unsearched_inputs),
            "unsearched_because": "integer and bool inputs (token ids, masks) have no neighbourhood to search"
            if self.unsearched_inputs else None,
        }


class _Target:
    """The rewritten neurons of one site, their region's bounds, and what the search saw of them."""

    def __init__(self, site: SiteStats, neurons: torch.Tensor) -> None:
        self.site, self.index = site, neurons.nonzero().flatten()
        bounds = (float("-inf"), *site.spec.boundaries, float("inf"))
        region = site.neuron_region[self.index]
        self.lower = torch.tensor([bounds[r] for r in region.tolist()], dtype=torch.float32)
        self.upper = torch.tensor([bounds[r + 1] for r in region.tolist()], dtype=torch.float32)
        spread = (site.high - site.low)[self.index].to(torch.float32)
        self.spread = torch.where(spread > 0, spread, torch.ones_like(spread))
        self.crossed = torch.zeros(len(self.index), dtype=torch.bool)
        self.margins: torch.Tensor | None = None

    def see(self, z: torch.Tensor) -> None:
        """Per sample, the normalized signed margin of each neuron (minimum over positions); flag crossings."""
        if z.dim() < 2:  # a statistic over the batch (rank 1): one neuron, seen by every sample alike
            values = z.reshape(1, 1, -1)
        else:
            dim = self.site.dim if self.site.dim >= 0 else z.dim() + self.site.dim
            values = z.movedim(dim, 1).reshape(z.shape[0], z.shape[dim], -1)
        values = values.index_select(1, self.index.to(z.device))
        lower, upper = self.lower.to(z.device)[None, :, None], self.upper.to(z.device)[None, :, None]
        # Region r holds lower < z <= upper (stats.py): on the lower boundary a neuron has already left it.
        self.crossed |= ((values <= lower) | (values > upper)).any(2).any(0).cpu()
        signed = torch.minimum(values - lower, upper - values).amin(2)
        self.margins = signed / self.spread.to(z.device)[None, :]


class _MarginInterpreter(fx.Interpreter):
    """Runs the traced original model and hands each target site's activation input to its ``_Target``."""

    def __init__(self, gm: fx.GraphModule, targets: dict[str, _Target]) -> None:
        super().__init__(gm)
        self.targets = targets

    def run_node(self, n: fx.Node):
        target = self.targets.get(n.name)
        if target is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            target.see(args[0])  # before the call: an inplace activation overwrites z
        return super().run_node(n)


def _feature_std(decide: Batches, leaf: int) -> torch.Tensor:
    """Per feature of input ``leaf`` (every element of a sample), the standard deviation over the decide samples
    (float64)."""
    total = squares = None
    count = 0
    for batch in decide:
        values = inputs.leaves(batch)[leaf].detach().to(torch.float64).cpu()
        total = values.sum(0) if total is None else total + values.sum(0)
        squares = (values**2).sum(0) if squares is None else squares + (values**2).sum(0)
        count += values.shape[0]
    mean = total / count
    return (squares / count - mean**2).clamp_min(0.0).sqrt()



def search_crossings(
    reference: Callable[[], fx.GraphModule], sites: list[SiteStats], plans: dict[str, SitePlan], start: Batches,
    decide: Batches, *, radius: float = DEFAULT_CROSSING_RADIUS, steps: int = CROSSING_STEPS,
    samples: int = CROSSING_SAMPLES,
) -> CrossingSearch:
    """Search around the first ``samples`` of ``start`` for inputs that move rewritten neurons out of their region.

    ``reference()`` captures the original model (called only when there is
    something to search; the graph is run, never changed); the neurons
    searched are those ``plans`` rewrite; the box is ``radius`` x the
    per-feature standard deviation of ``decide``. Every neuron seen outside
    its region is in ``crossed`` with a CROSSED_UNDER_PERTURBATION reason
    (the caller withdraws it); the result says what was searched.
    """
    search = CrossingSearch(radius)
    started = time.perf_counter()
    candidates = {
        site.name: plans[site.name].rewritten_neurons() for site in sites
        if not site.spec.smooth and site.num_neurons and site.dim != 0
    }
    targets = {name: _Target(site, candidates[name]) for site in sites
               if (name := site.name) in candidates and candidates[name].any()}
    search.searched_neurons = sum(len(t.index) for t in targets.values())
    if radius == 0:
        search.skipped = "disabled (radius 0)"
    elif not targets:
        search.skipped = "no rewrite rests on piecewise-linear region statistics"
    elif not start.samples:
        search.skipped = "no samples to start from"
    if search.skipped:
        return search
    batch = inputs.concat(list(start.part(0, min(samples, start.samples))))
    leaves, floating = inputs.leaves(batch), inputs.floating(batch)
    search.unsearched_inputs = [
        f"{name} ({str(leaf.dtype).removeprefix('torch.')})"
        for name, leaf, searched in zip(inputs.names(batch), leaves, floating) if not searched
    ]
    if not any(floating):
        dtypes = ", ".join(dict.fromkeys(str(leaf.dtype).removeprefix("torch.") for leaf in leaves))
        search.skipped = f"{dtypes} inputs have no neighbourhood to search"
        return search
    searched = [index for index, is_float in enumerate(floating) if is_float]
    boxes = {i: (radius * _feature_std(decide, i)).to(leaves[i].dtype).to(leaves[i].device) for i in searched}
    gm = reference()
    interpreter = _MarginInterpreter(gm, targets)
    deltas = {i: torch.zeros_like(leaves[i], requires_grad=True) for i in searched}
    step = 0
    for step in range(steps + 1):
        with torch.enable_grad():
            moved = [leaf + deltas[i] if i in deltas else leaf for i, leaf in enumerate(leaves)]
            interpreter.run(*inputs.positional(gm, inputs.with_leaves(batch, moved)))
            if step == steps:
                break
            margins = torch.cat([t.margins.expand(inputs.batch_size(batch), -1) for t in targets.values()], dim=1)
            # Soft minimum over neurons, per sample: the nearest boundaries get the step.
            objective = -_SOFTMIN_TEMPERATURE * torch.logsumexp(-margins / _SOFTMIN_TEMPERATURE, dim=1)
            if not objective.requires_grad:  # the searched sites see no floating input: no step moves them
                break
            gradients = torch.autograd.grad(objective.sum(), list(deltas.values()), allow_unused=True)
        with torch.no_grad():
            for (i, delta), gradient in zip(deltas.items(), gradients):
                if gradient is None:  # this input does not reach a searched site
                    continue
                delta -= _STEP_FACTOR * boxes[i] / steps * gradient.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, boxes[i]), -boxes[i]))
    for target in targets.values():
        target.margins = None
    search.samples, search.steps, search.seconds = inputs.batch_size(batch), step, time.perf_counter() - started
    for name, target in targets.items():
        if not target.crossed.any():
            continue
        mask = torch.zeros(target.site.num_neurons, dtype=torch.bool)
        mask[target.index[target.crossed]] = True
        search.crossed[name] = mask
        detail = {
            "neurons": int(mask.sum()), "neuron_indices": [int(i) for i in mask.nonzero().flatten()[:32]],
            "radius": radius, "samples": search.samples, "steps": steps,
        }
        search.reasons.append((name, Reason(RefusalCode.CROSSED_UNDER_PERTURBATION, detail)))
    search.seconds = time.perf_counter() - started
    return search
