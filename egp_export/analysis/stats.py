"""Per-call-site activation statistics on calibration data, stored on fx nodes.

``ActivationStatsInterpreter`` runs the traced model batch by batch and, at
every activation call site, accumulates per-neuron facts about the
activation's *input* z (before the call: an inplace activation overwrites it):

- how many observations fell in each linear region of the activation,
- how many were ON (z > 0): EGP's state, whose per-neuron frequency p gives
  the binary entropy h(p) and the site entropy mean_c h(p_c),
- the smallest and largest z,
- the margin: the smallest distance of any z to a region boundary, for
  neurons that stayed in one region (a neuron seen in two regions crossed a
  boundary: its margin is 0, whatever the batching, and the report leaves it
  out),
- how many samples and observations (samples x positions) each neuron saw:
  the evidence a "never left its region" claim rests on.

With n observations of a neuron and none outside its region, the rate at
which it leaves the region is below 3/n with 95% confidence (the rule of
three: (1 - p)^n >= 0.05 needs p <= -ln(0.05)/n ~ 3/n). Positions inside one
sample are correlated, so the report gives the bound per observation (3/n)
and per sample (3/samples, the conservative one); ``min_observations`` is
held against observations, which for pooled sites (squeeze-excitation) are
samples alone.

What a site's facts support (linearize, mask dead neurons, keep) is decided
from them once, in analysis/plans.py (``plan_site``); the facts here are
never changed after calibration.

Everything accumulates as counts, minima and maxima, so memory does not grow
with the data and two ranks' statistics merge exactly (``SiteStats.merge``).
The results live in ``node.meta["egp_activation"]``; passes read them there
and never run the model again.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis import inputs
from egp_export.analysis.activations import ActivationSpec, activation_spec, binary_entropy, categorical_entropy, fit_affine
from egp_export.analysis.batches import Batches
from egp_export.analysis.fx import propagate_shapes, site_neuron_dim
from egp_export.analysis.inputs import Batch
from egp_export.analysis.ops import named_modules
from egp_export.errors import CalibrationError
from egp_export.records import Reason, RefusalCode

META_KEY = "egp_activation"


def _describe_target(node: fx.Node) -> tuple[str, str]:
    """(form, target) of a call site: ('module', 'layer1.0.relu'), ('function', 'relu'), ..."""
    if node.op == "call_module":
        return "module", str(node.target)
    if node.op == "call_method":
        return "method", f".{node.target}()"
    return "function", getattr(node.target, "__name__", str(node.target))


@dataclass
class LinearMap:
    """The affine map a site is on its data, or why it is not one."""

    scale: torch.Tensor | None
    shift: torch.Tensor | None
    max_error: float  # 0 for exact piecewise-linear regions
    refusal: Reason | None  # None when the map is valid

    @property
    def ok(self) -> bool:
        return self.refusal is None


@dataclass
class SiteStats:
    """Per-neuron statistics of one activation call site, accumulated over batches."""

    name: str
    form: str
    target: str
    spec: ActivationSpec
    dim: int
    num_neurons: int = 0
    observations: int = 0
    region_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    on_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    low: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    high: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    margin: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    samples: int = 0

    def _reduce_dims(self, z: torch.Tensor) -> tuple[int, ...]:
        """Every axis but the neuron axis: statistics reduce over batch and space without copying z."""
        dim = self.dim if self.dim >= 0 else z.dim() + self.dim
        if z.dim() < 2 or dim >= z.dim():
            raise CalibrationError(
                f"activation '{self.name}' got an input of shape {tuple(z.shape)}; expected at least [batch, neurons]."
            )
        return tuple(d for d in range(z.dim()) if d != dim)

    def observe(self, z: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Add one batch's z; ``scratch`` (a reusable buffer, see :class:`Scratch`) makes the counts cheaper."""
        z = z.detach()
        scratch = scratch or Scratch()
        if z.dim() < 2:
            # A vector or scalar has no batch axis to tell apart from neurons: one neuron, every element observed.
            z = z.reshape(-1, 1)
        dims = self._reduce_dims(z)
        neurons = z.shape[self.dim]
        if self.observations == 0:
            self.num_neurons = neurons
            self.region_counts = torch.zeros(len(self.spec.regions), neurons, dtype=torch.int64)
            self.on_counts = torch.zeros(neurons, dtype=torch.int64)
            self.low = torch.full((neurons,), float("inf"), dtype=torch.float64)
            self.high = torch.full((neurons,), float("-inf"), dtype=torch.float64)
            self.margin = torch.full((neurons,), float("inf"), dtype=torch.float64)
        elif neurons != self.num_neurons:
            raise CalibrationError(
                f"activation '{self.name}' saw {neurons} neurons in one batch and {self.num_neurons} in another; "
                "calibration samples must all have the same shape."
            )
        count = z.numel() // neurons
        self.observations += count
        # A neuron axis at dim 0 (no batch axis) means one sample per call.
        self.samples += z.shape[0] if dims[0] == 0 else 1
        # Reductions run where z lives (GPU too); the accumulators stay on the CPU. Every full pass over z
        # costs about as much as the activation itself, so passes that low/high already decide are skipped.
        low, high = z.amin(dims), z.amax(dims)
        if not bool(low.isfinite().all() and high.isfinite().all()):  # amin/amax propagate NaN
            raise CalibrationError(
                f"activation '{self.name}' ({self.form} {self.target}) got {int((~z.isfinite()).sum())} NaN/Inf "
                "inputs: NaN is in no region, so nothing can be decided there. The model computes non-finite values "
                "on this data (overflowing or diverged weights, or NaN/Inf in the data): check the checkpoint."
            )
        positive = _count_greater(z, dims, 0.0, count, scratch)
        self.on_counts += positive.cpu()
        self.low = torch.minimum(self.low, low.cpu().to(torch.float64))
        self.high = torch.maximum(self.high, high.cpu().to(torch.float64))
        if not self.spec.boundaries:
            self.region_counts[0] += count
            return
        # Region r holds boundaries[r-1] < z <= boundaries[r]: count how many exceed each boundary.
        above = [self._count_above(z, dims, b, positive, low, high, count, scratch).cpu() for b in self.spec.boundaries]
        self.region_counts[0] += count - above[0]
        for r in range(1, len(above)):
            self.region_counts[r] += above[r - 1] - above[r]
        self.region_counts[-1] += above[-1]
        for b in self.spec.boundaries:
            self.margin = torch.minimum(self.margin, self._distance(b, low, high).cpu().to(torch.float64))
        self.zero_crossed_margins()

    def zero_crossed_margins(self) -> None:
        """A neuron seen in two regions has margin 0, however the data were batched or sharded."""
        if self.spec.boundaries and self.num_neurons:
            self.margin = torch.where((self.region_counts > 0).sum(0) > 1, 0.0, self.margin)

    @staticmethod
    def _count_above(z, dims, boundary, positive, low, high, count, scratch) -> torch.Tensor:
        """Per neuron, how many z > boundary: the ON count at 0; no pass when no neuron straddles it."""
        if boundary == 0.0:
            return positive
        if bool((low > boundary).all()):
            return torch.full_like(positive, count)
        if bool((high <= boundary).all()):
            return torch.zeros_like(positive)
        return _count_greater(z, dims, boundary, count, scratch)

    @staticmethod
    def _distance(boundary, low, high) -> torch.Tensor:
        """Per neuron, min |z - boundary| without a pass over z: a neuron on one side of it is nearest at low
        (above) or high (below); a neuron whose range straddles it (the difference is negative) was seen on both
        sides, so it left its region and its margin is 0 (the report only quotes one-region neurons' margins)."""
        return torch.where(low > boundary, low - boundary, boundary - high).clamp_min(0.0)

    def merge(self, other: SiteStats) -> None:
        """Add another shard's statistics of the same site (e.g. another DDP rank)."""
        if other.observations == 0:
            return
        if self.observations == 0:
            self.num_neurons, self.observations, self.samples = other.num_neurons, other.observations, other.samples
            self.region_counts, self.on_counts = other.region_counts.clone(), other.on_counts.clone()
            self.low, self.high, self.margin = other.low.clone(), other.high.clone(), other.margin.clone()
            return
        self.observations += other.observations
        self.samples += other.samples
        self.region_counts += other.region_counts
        self.on_counts += other.on_counts
        self.low = torch.minimum(self.low, other.low)
        self.high = torch.maximum(self.high, other.high)
        self.margin = torch.minimum(self.margin, other.margin)
        self.zero_crossed_margins()

    # Derived facts -------------------------------------------------------

    @property
    def positions(self) -> int:
        """Observations per sample: 1 for pooled sites, H x W for convolutions, tokens for transformers."""
        return self.observations // max(self.samples, 1)

    def one_region_margins(self) -> torch.Tensor:
        """The finite margins of the neurons that stayed in one region (those a rewrite rests on)."""
        if not self.num_neurons:
            return self.margin
        kept = torch.isfinite(self.margin)
        if not self.spec.smooth:
            kept &= self.neuron_region >= 0
        return self.margin[kept]

    def distinct_observations(self, distinct: int | None = None, total: int | None = None) -> int:
        """Observations per neuron with each distinct sample counted once: ``distinct`` of the ``total`` samples
        calibrated on differ (a repeated sample adds no evidence); None: every sample taken as distinct."""
        if distinct is None or not total:
            return self.observations
        return self.observations * min(distinct, total) // total

    def evidence(self, distinct: int | None = None, total: int | None = None) -> dict:
        """What a rewrite of this site rests on: counts of distinct samples (``distinct`` of ``total`` differ, as in
        :meth:`distinct_observations`), the smallest margin, and the rule-of-three bounds on those counts."""
        finite = self.one_region_margins()
        observations = self.distinct_observations(distinct, total)
        samples = self.samples if distinct is None or not total else self.samples * min(distinct, total) // total
        return {
            "samples": self.samples,
            "distinct_samples": samples,
            "observations_per_neuron": observations,
            "positions_per_sample": self.positions,
            "min_margin": float(finite.min()) if finite.numel() else None,
            # With n observations and no crossing, P(crossing) < 3/n at 95% confidence (rule of three).
            "crossing_rate_bound_95": 3.0 / observations if observations else None,
            "crossing_rate_per_sample_bound_95": 3.0 / samples if samples else None,
            "bound": "rule of three over distinct samples: no crossing in n observations => rate < 3/n (95%)",
        }

    @property
    def on_fraction(self) -> torch.Tensor:
        return self.on_counts.to(torch.float64) / max(self.observations, 1)

    @property
    def neuron_entropy(self) -> torch.Tensor:
        """EGP's per-neuron entropy h(p_c) in bits, p_c = P(z > 0)."""
        return binary_entropy(self.on_fraction)

    @property
    def entropy(self) -> float:
        """EGP's layer entropy: the mean of h(p_c) over neurons (0 iff every neuron is constant ON/OFF)."""
        return float(self.neuron_entropy.mean()) if self.num_neurons else 0.0

    @property
    def region_entropy(self) -> float:
        """Mean per-neuron entropy of the region distribution (0 iff every neuron stays in one region)."""
        return float(categorical_entropy(self.region_counts).mean()) if self.num_neurons else 0.0

    @property
    def neuron_region(self) -> torch.Tensor:
        """The region each neuron always stayed in, or -1 for neurons seen in several."""
        occupied = self.region_counts > 0
        single = occupied.sum(0) == 1
        return torch.where(single, occupied.to(torch.int64).argmax(0), torch.full_like(single, -1, dtype=torch.int64))

    @property
    def constant_fraction(self) -> float:
        """Fraction of neurons that stayed in one region (for smooth sites: fraction never changing sign)."""
        if not self.num_neurons:
            return 0.0
        if self.spec.smooth:
            return float(((self.on_counts == 0) | (self.on_counts == self.observations)).to(torch.float64).mean())
        return float((self.neuron_region >= 0).to(torch.float64).mean())

    @property
    def region_fractions(self) -> list[float]:
        total = int(self.region_counts.sum())
        return [int(c) / total if total else 0.0 for c in self.region_counts.sum(1)]

    def dead_neurons(self) -> torch.Tensor:
        """Neurons whose output was exactly zero on every observation (and f(0) = 0)."""
        dead = torch.zeros(self.num_neurons, dtype=torch.bool)
        if self.spec.smooth or not self.spec.zero_at_zero:
            return dead
        region = self.neuron_region
        for r, (slope, intercept) in enumerate(self.spec.regions):
            if slope is not None and intercept == 0 and torch.all(torch.as_tensor(slope) == 0):
                dead |= region == r
        return dead

    def output_scale(self) -> float:
        """max |f(z)| over the calibrated input range: the activation's own scale at this site."""
        return float(torch.maximum(self.spec.fn(self.low).abs(), self.spec.fn(self.high).abs()).max())

    def linear_map(self, tolerance: float) -> LinearMap:
        """The per-neuron affine map this site is on its calibration data, if it is one.

        Piecewise-linear activations: exact when every neuron stayed in one
        region whose map is affine. Smooth activations: the best affine fit on
        each neuron's input range, accepted when its largest deviation is at
        most ``tolerance`` times the site's own output scale (max |f(z)| on the
        range; not max(1, ...), which let a SiLU layer whose outputs are all
        ~1e-4 become zero). Read by ``plans.plan_site``, the one decision.
        """
        if self.observations == 0:
            return LinearMap(None, None, 0.0, Reason(RefusalCode.NO_CALIBRATION_DATA))
        if self.spec.smooth:
            scale = self.output_scale()
            slope, intercept, error = fit_affine(self.spec.fn, self.low, self.high, allowed_error=tolerance * scale)
            worst = float(error.max())
            if worst > tolerance * scale:
                over = int((error > tolerance * scale).sum())
                detail = {"over": over, "neurons": self.num_neurons, "worst": worst, "tolerance": tolerance, "scale": scale}
                return LinearMap(None, None, worst, Reason(RefusalCode.SURROGATE_ERROR, detail))
            return LinearMap(slope, intercept, worst, None)
        region = self.neuron_region
        mixed = int((region < 0).sum())
        if mixed:
            detail = {"crossing": mixed, "neurons": self.num_neurons}
            return LinearMap(None, None, 0.0, Reason(RefusalCode.NEURONS_CROSS_BOUNDARY, detail))
        scale = torch.empty(self.num_neurons, dtype=torch.float64)
        shift = torch.empty(self.num_neurons, dtype=torch.float64)
        for r in range(len(self.spec.regions)):
            members = region == r
            if not members.any():
                continue
            affine = self.spec.region_map(r, self.num_neurons)
            if affine is None:
                detail = {"count": int(members.sum()), "activation": self.spec.kind}
                return LinearMap(None, None, 0.0, Reason(RefusalCode.NONAFFINE_REGION, detail))
            scale[members] = affine[0][members]
            shift[members] = affine[1][members]
        return LinearMap(scale, shift, 0.0, None)

    def to_dict(self) -> dict:
        """The calibration facts of the report's row for this site (JSON-serialisable; ``plans.site_row`` adds
        what was decided)."""
        finite_margin = self.one_region_margins()
        return {
            "name": self.name,
            "form": self.form,
            "target": self.target,
            "activation": self.spec.kind,
            "neuron_dim": self.dim,
            "neurons": self.num_neurons,
            "observations": self.observations,
            "entropy": self.entropy,
            "region_entropy": self.region_entropy,
            "constant_fraction": self.constant_fraction,
            "region_fractions": self.region_fractions,
            "min_margin": float(finite_margin.min()) if finite_margin.numel() else None,
            "samples": self.samples,
            "median_margin": float(finite_margin.median()) if finite_margin.numel() else None,
            "input_range": [float(self.low.min()), float(self.high.max())] if self.num_neurons else None,
        }


class Scratch:
    """One reusable float32 buffer for the 0/1 flags the counts sum (grown as needed, on z's device).

    A fresh flag tensor per site and batch costs an allocation and its page faults, and summing bools is slow on
    CPU; writing the flags into this buffer as floats and summing those is 7x cheaper (MobileNetV2 and ResNet-50:
    ``tools/bench_calibration.py --ops``, docs/calibration.md).
    """

    def __init__(self) -> None:
        self.buffer = torch.empty(0)

    def like(self, z: torch.Tensor) -> torch.Tensor:
        if self.buffer.numel() < z.numel() or self.buffer.device != z.device:
            self.buffer = torch.empty(z.numel(), dtype=torch.float32, device=z.device)
        return self.buffer[: z.numel()].view(z.shape)


# Float32 sums of 0/1 flags are exact while every partial sum is an integer below 2**24.
_EXACT_FLOAT_COUNT = 2**24


def _count_greater(z: torch.Tensor, dims: tuple[int, ...], boundary: float, count: int, scratch: Scratch) -> torch.Tensor:
    """Per neuron, how many z > boundary (int64), exactly."""
    if not z.is_floating_point() or count >= _EXACT_FLOAT_COUNT:
        dtype = torch.int32 if count < 2**31 else torch.int64
        return (z > boundary).sum(dims, dtype=dtype).to(torch.int64)
    flags = scratch.like(z)
    torch.gt(z, boundary, out=flags)
    if z.dim() > 2 and dims == (0, *range(2, z.dim())):
        # [batch, neurons, positions...]: sum the contiguous positions first (vectorised), then the batch.
        counts = flags.view(z.shape[0], z.shape[1], -1).sum(-1).sum(0)
    else:
        counts = flags.sum(dims)
    return counts.to(torch.int64)


class ActivationStatsInterpreter(fx.Interpreter):
    """Runs a GraphModule and records ``SiteStats`` for every activation call site."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        # fx would append "While executing %node ..." to our CalibrationErrors: they already name the site.
        self.extra_traceback = False
        modules = named_modules(gm)
        self.sites: dict[fx.Node, SiteStats] = {}
        self.scratch = Scratch()
        for node in gm.graph.nodes:
            spec = activation_spec(node, modules)
            if spec is None or not node.all_input_nodes:
                continue
            form, target = _describe_target(node)
            self.sites[node] = SiteStats(node.name, form, target, spec, site_neuron_dim(node, modules))

    def run_node(self, n: fx.Node):
        site = self.sites.get(n)
        if site is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            site.observe(args[0], self.scratch)  # before the call: inplace activations overwrite z
        return super().run_node(n)

    def store(self) -> None:
        for node, site in self.sites.items():
            node.meta[META_KEY] = site


def calibrate(gm: fx.GraphModule, batches: Iterable[Batch], *, progress: bool = False) -> list[SiteStats]:
    """Run ``batches`` through ``gm``, store SiteStats on its activation nodes, return them in graph order.

    ``batches`` is consumed once, one batch at a time (a generator or DataLoader
    is never held whole): memory does not grow with the number of samples. A
    batch is a tensor, a tuple or a dict of tensors (analysis/inputs.py); the
    interpreter gets them one per placeholder, in ``forward``'s order.
    """
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    interpreter = ActivationStatsInterpreter(gm)
    try:
        # A plain forward first: ShapeProp prints a traceback of its own before re-raising.
        with torch.no_grad():
            inputs.call_on_copy(gm, inputs.take(first, slice(0, 1)))  # a model may write into its input
    except Exception as error:  # any failure here is the model rejecting the data
        if any(_runs(gm, inputs.take(first, slice(index, index + 1))) for index in range(1, inputs.batch_size(first))):
            raise rejected_sample(gm, batches, 0, first, 0, error) from None  # one bad sample, not the input form
        raise CalibrationError(
            f"the model rejects calibration samples of {inputs.describe(first)}: "
            f"{_first_line(error)}. "
            "Check the input size, channel count and dtype the model expects (token ids: integers; images: floats)."
        ) from None
    propagate_shapes(gm, inputs.take(first, slice(0, 1)))
    # Shapes are known now, so the neuron axis can fall back on ranks.
    modules = named_modules(gm)
    for node, site in interpreter.sites.items():
        site.dim = site_neuron_dim(node, modules)
    iterator = itertools.chain([first], stream)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="calibrating", unit="batch", leave=False)
    read = 0
    with torch.no_grad():
        for number, batch in enumerate(iterator):
            try:
                interpreter.run(*inputs.positional(gm, batch))
            except (CalibrationError, MemoryError):
                raise  # already says what is wrong, or is not the data's fault
            except Exception as error:  # the first sample ran, so this is a bad sample (or batch) further on
                raise rejected_sample(gm, batches, number, batch, read, error) from None
            read += inputs.batch_size(batch)
    interpreter.store()
    return list(interpreter.sites.values())


def rejected_sample(gm: nn.Module, batches, number: int, batch: Batch, read: int,
                     error: Exception) -> CalibrationError:
    """A CalibrationError naming the sample of ``batch`` (batch ``number``, read after ``read`` samples) the model
    rejects: each sample of the batch is run alone to find the first one that fails."""
    size = inputs.batch_size(batch)
    # A Batches names the source's own sample indices (its part of the data); a plain iterable, positions read.
    names = batches.indices[read : read + size] if isinstance(batches, Batches) else range(read, read + size)
    with torch.no_grad():
        for offset in range(size):
            try:
                inputs.call_on_copy(gm, inputs.take(batch, slice(offset, offset + 1)))
            except Exception as sample_error:  # noqa: BLE001 - this sample's own failure is the one to report
                return CalibrationError(
                    f"the model rejects calibration sample {int(names[offset])} (sample {offset} of calibration "
                    f"batch {number}), although other samples ran: {_first_line(sample_error)}. Fix or drop that "
                    "sample (e.g. token ids must be below the embedding's vocabulary size)."
                )
    return CalibrationError(
        f"the model rejects calibration batch {number} ({size} samples from sample {int(names[0])}) although it "
        f"accepts each of its samples alone: {_first_line(error)}. Check that the model works at batch size "
        f"{size}, or pass a smaller batch_size."
    )


def _runs(model: nn.Module, sample: Batch) -> bool:
    try:
        with torch.no_grad():
            inputs.call_on_copy(model, sample)
    except Exception:  # noqa: BLE001 - any failure means "not this sample"
        return False
    return True


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def site_stats(node: fx.Node) -> SiteStats | None:
    return node.meta.get(META_KEY)
