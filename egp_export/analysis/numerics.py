"""Comparing outputs: one error measure and explicit tolerances per backend.

Every output tensor (each leaf of a tuple/list/dict output, named by its path:
``output``, ``output[1]``, ``output['boxes']``) is judged on its own scale, so
boxes in the thousands cannot hide an error in scores near 1:

- per output: ``max_abs = max |y - r|`` and ``max_rel = max_abs / max |r|``
  (relative to the reference's scale, not element-wise, so outputs that cross
  zero do not blow it up); the reported ``max_rel`` is the worst output's;
- per sample: for each sample ``i`` (dim 0 of an output batched like the
  first) ``max |y_i - r_i| / max(max |r_i|, SAMPLE_SCALE_FLOOR * max |r|)``,
  the error on the sample's own scale, with a floor at a tenth of the output's
  largest scale so that near-zero samples do not blow it up: a sample at
  least a tenth as large as the largest is judged on its own scale, so a few
  large samples cannot hide an error on the typical ones; a smaller sample is
  judged against a tenth of the largest, still 10x stricter than the
  per-output rule (``max_sample_rel``, the worst over outputs and samples;
  never below ``max_rel``).

Verification passes when both are ``<= rtol``. An output whose reference is
all zeros fails on any non-zero difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from egp_export.analysis import inputs

# fp32 rounding floor: merged weights re-associate sums, so even exact rewrites
# differ from the original by a few ulps times the reduction length. Measured
# relative errors of exact rewrites on torchvision models stay below 1e-6.
FP32_RTOL = 1e-5
# How many times the original model's own fp32 rounding noise (its distance
# from the same model run in fp64) a rewrite may add: re-associated sums and
# folded weights round differently, and ill-conditioned networks (tiny
# BatchNorm variances) amplify that. Measured: torch.fx's own BN fusion moves a
# BN-recalibrated MobileNetV2 by 1.5x its fp64 noise (7.9e-5 vs 5.3e-5); an
# exactly merged EfficientNetV2-S FusedMBConv by 4.3x (4.9e-5 vs 1.15e-5, noise
# measured on 4 samples, the error on 10). The algebra itself is checked in
# fp64 (tests/test_convchain.py), so this factor only absorbs fp32 rounding.
NOISE_FACTOR = 8.0
# The noise-raised floor never exceeds this: one ill-conditioned branch must not
# let a wrong rewrite through elsewhere (8x an unbounded noise allowed 8.04
# relative error). Above FP32_RTOL the report carries a note.
NOISE_CAP = 1e-4
# ONNX Runtime (CPU) against PyTorch eager on the same module; DESIGN.md
# measured <= 2e-6 absolute on unit-scale outputs.
ORT_CPU_RTOL = 1e-5


# Per-sample errors are judged against max(the sample's own scale, this
# fraction of the output's largest scale): near-zero samples get a floor;
# samples within 1/this of the largest are judged on their own scale.
SAMPLE_SCALE_FLOOR = 0.1


@dataclass(frozen=True)
class OutputStats:
    """The error of one output tensor, on its own scale."""

    output: str  # path in the model's output: "output", "output[1]", "output['boxes']"
    max_abs: float
    max_rel: float  # max_abs / max |reference| of this output
    max_sample_rel: float  # worst sample on its own (floored) scale, see the module docstring
    scale: float  # max |reference| over finite values


@dataclass(frozen=True)
class ErrorStats:
    """Largest absolute and scale-relative difference between two outputs, the worst output's.

    ``max_rel`` and ``max_abs`` are those of the output with the largest
    relative error (``worst_output`` names it); ``max_sample_rel`` is the worst
    per-sample error on the sample's own scale (module docstring);
    ``outputs`` has one :class:`OutputStats` per output tensor.
    ``nonfinite_mismatches`` counts output values where the reference or the
    candidate is inf/NaN and the other is not the same non-finite value; any
    such value makes both errors inf, so it can never be "within tolerance".
    ``first_bad_sample`` is the index (along dim 0 of the first output that
    has one) of the first sample holding such a value, or None.
    """

    max_abs: float
    max_rel: float
    nonfinite_mismatches: int = 0
    first_bad_sample: int | None = None
    max_sample_rel: float | None = None  # None: as max_rel (no per-sample view)
    worst_output: str | None = None
    outputs: tuple[OutputStats, ...] = ()

    @property
    def sample_rel(self) -> float:
        return self.max_rel if self.max_sample_rel is None else self.max_sample_rel

    def within(self, rtol: float) -> bool:
        worst = max(self.max_rel, self.sample_rel)
        return bool(math.isfinite(worst) and math.isfinite(rtol) and worst <= rtol)

    def describe(self) -> str:
        """max_rel, max_abs and per-sample error, naming the output when there are several."""
        where = f" on {self.worst_output}" if self.worst_output and len(self.outputs) > 1 else ""
        text = f"max_rel={self.max_rel:.3g}{where} (max_abs={self.max_abs:.3g})"
        if self.max_sample_rel is not None and self.max_sample_rel > self.max_rel:
            worst = max(self.outputs, key=lambda o: o.max_sample_rel, default=None)
            named = f" on {worst.output}" if worst is not None and len(self.outputs) > 1 else ""
            text += f", per-sample max_rel={self.max_sample_rel:.3g}{named} (on each sample's own scale)"
        return text

    def to_dict(self) -> dict:
        """max_abs, max_rel, the worst output and one row per output; the non-finite fields only when there is a
        mismatch to report."""
        fields = {"max_abs": self.max_abs, "max_rel": self.max_rel}
        if self.max_sample_rel is not None:
            fields["max_sample_rel"] = self.max_sample_rel
        if self.worst_output is not None:
            fields["worst_output"] = self.worst_output
            fields["outputs"] = [asdict(output) for output in self.outputs]
        if self.nonfinite_mismatches:
            fields["nonfinite_mismatches"] = self.nonfinite_mismatches
            fields["first_bad_sample"] = self.first_bad_sample
        return fields


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def flatten_outputs(outputs) -> list:
    """Tensors of a (possibly nested tuple/list/dict) model output, in order."""
    return [leaf for _, leaf in output_leaves(outputs)]


def output_leaves(outputs, path: str = "output") -> list[tuple[str, object]]:
    """(path, tensor) for every leaf of a (possibly nested tuple/list/dict) output, in flatten_outputs' order:
    ``output`` for a single tensor, ``output[1]``, ``output['boxes']``, ``output[0]['scores']`` in a nest."""
    if isinstance(outputs, (tuple, list)):
        return [leaf for i, item in enumerate(outputs) for leaf in output_leaves(item, f"{path}[{i}]")]
    if isinstance(outputs, dict):
        return [leaf for key in sorted(outputs) for leaf in output_leaves(outputs[key], f"{path}[{key!r}]")]
    return [(path, outputs)]


def _first_sample(bad: np.ndarray) -> int:
    # Outputs are [batch, ...]: the sample is the first index; a scalar output is sample 0.
    return int(np.argwhere(bad)[0][0]) if bad.ndim else 0


def _per_sample_max(values: np.ndarray, batch: int) -> np.ndarray:
    """Max over each sample's values (dim 0); zeros where a sample has no values."""
    rows = values.reshape(batch, -1)
    return rows.max(1) if rows.shape[1] else np.zeros(batch)


class ErrorAccumulator:
    """``compare`` over batches, one at a time: the outputs of a large held-out set are never held together.

    Kept per output: the largest error and scale; per sample and output: the
    sample's largest error and scale (two numbers, for the per-sample rule,
    whose floor depends on the output's final scale). The result equals
    ``compare`` of the concatenated outputs (a non-finite mismatch's sample
    index counts from the first batch). Outputs are named by the reference's
    structure; the candidate may be the same nest or its flat list of leaves
    (ONNX Runtime's outputs). An output whose dim 0 is not the batch size of
    the first output is judged per output only.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.max_abs = np.zeros(0)  # per output
        self.scale = np.zeros(0)  # per output
        self.sample_errors: list[np.ndarray] = []  # per batch: [samples, outputs, (error, scale)]
        self.mismatches = 0
        self.first_bad: int | None = None
        self.samples = 0

    def add(self, reference, candidate) -> None:
        leaves = output_leaves(reference)
        refs = [_as_numpy(r) for _, r in leaves]
        cands = [_as_numpy(c) for c in flatten_outputs(candidate)]
        if len(refs) != len(cands):
            raise ValueError(f"output count differs: {len(refs)} reference vs {len(cands)} candidate")
        names = [name for name, _ in leaves]
        if not self.names:
            self.names = names
            self.max_abs, self.scale = np.zeros(len(names)), np.zeros(len(names))
        elif len(names) != len(self.names):
            raise ValueError(f"output count differs between batches: {len(self.names)} then {len(names)}")
        batch = len(refs[0]) if refs and refs[0].ndim else 1
        per_sample = np.zeros((batch, len(refs), 2))
        for index, (ref, cand) in enumerate(zip(refs, cands)):
            if ref.shape != cand.shape:
                raise ValueError(
                    f"output shape differs at {names[index]}: {ref.shape} reference vs {cand.shape} candidate"
                )
            if ref.size == 0:
                continue
            ref_finite, cand_finite = np.isfinite(ref), np.isfinite(cand)
            same_nonfinite = ~ref_finite & ~cand_finite & ((ref == cand) | (np.isnan(ref) & np.isnan(cand)))
            bad = ~(ref_finite & cand_finite) & ~same_nonfinite
            if bad.any():
                self.mismatches += int(bad.sum())
                if self.first_bad is None:
                    self.first_bad = self.samples + _first_sample(bad)
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: masked out below
                difference = np.where(ref_finite & cand_finite, np.abs(ref - cand), 0.0)
            magnitude = np.where(ref_finite, np.abs(ref), 0.0)
            self.max_abs[index] = max(self.max_abs[index], float(difference.max()))
            self.scale[index] = max(self.scale[index], float(magnitude.max()))
            if ref.ndim and ref.shape[0] == batch:
                per_sample[:, index, 0] = _per_sample_max(difference, batch)
                per_sample[:, index, 1] = _per_sample_max(magnitude, batch)
        self.sample_errors.append(per_sample)
        self.samples += batch

    def all_reduce(self, runtime, offset: int) -> None:
        """Merge every rank's accumulator (``runtime``: sum and max over ranks, as prune's Runtime); ``offset`` is
        this rank's first sample, so the first bad sample is numbered over all ranks' samples. Every rank must
        have compared the same outputs (the same model) on a contiguous share of the samples."""
        first_bad = -(self.first_bad + offset) if self.first_bad is not None else -math.inf
        maxima = runtime.max(torch.tensor([*self.max_abs, *self.scale, first_bad], dtype=torch.float64))
        sums = runtime.sum(torch.tensor([self.mismatches, self.samples], dtype=torch.int64))
        outputs = len(self.names)
        self.max_abs, self.scale = maxima[:outputs].numpy().copy(), maxima[outputs : 2 * outputs].numpy().copy()
        self.first_bad = None if maxima[-1] == -math.inf else int(-maxima[-1])
        self.mismatches, total = int(sums[0]), int(sums[1])
        # Each rank's per-sample rows go to their place among all samples; the sum gathers them.
        gathered = torch.zeros(total, outputs, 2, dtype=torch.float64)
        mine = np.concatenate(self.sample_errors) if self.sample_errors else np.zeros((0, outputs, 2))
        gathered[offset : offset + len(mine)] = torch.from_numpy(mine)
        self.sample_errors, self.samples = [runtime.sum(gathered).numpy()], total

    def result(self) -> ErrorStats:
        if self.mismatches:
            return ErrorStats(
                max_abs=math.inf, max_rel=math.inf, nonfinite_mismatches=self.mismatches, first_bad_sample=self.first_bad
            )
        samples = np.concatenate(self.sample_errors) if self.sample_errors else np.zeros((0, len(self.names), 2))
        outputs = []
        for index, name in enumerate(self.names):
            max_abs, scale = float(self.max_abs[index]), float(self.scale[index])
            errors, own_scale = samples[:, index, 0], samples[:, index, 1]
            floored = np.maximum(own_scale, SAMPLE_SCALE_FLOOR * scale)
            outputs.append(OutputStats(
                output=name,
                max_abs=max_abs,
                max_rel=_relative(max_abs, scale),
                max_sample_rel=max([_relative(e, s) for e, s in zip(errors.tolist(), floored.tolist())], default=0.0),
                scale=scale,
            ))
        if not outputs:
            return ErrorStats(max_abs=0.0, max_rel=0.0)
        worst = max(outputs, key=lambda output: output.max_rel)
        return ErrorStats(
            max_abs=worst.max_abs,
            max_rel=worst.max_rel,
            max_sample_rel=max(max(output.max_sample_rel for output in outputs), worst.max_rel),
            worst_output=worst.output,
            outputs=tuple(outputs),
        )


def _relative(error: float, scale: float) -> float:
    # An all-zero reference fails on any non-zero difference.
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


def compare(reference, candidate) -> ErrorStats:
    """Error of ``candidate`` against ``reference`` (tensors, arrays or nests of them), each output on its own
    scale (module docstring).

    Non-finite values are compared explicitly: the same inf (sign included)
    or NaN at the same position in both counts as equal and is left out of
    the error and the scale; anything else non-finite is a mismatch (errors
    inf). The scale is max |r| over the finite reference values only, so an
    inf in the reference cannot divide the error away.
    """
    accumulator = ErrorAccumulator()
    accumulator.add(reference, candidate)
    return accumulator.result()


def nonfinite_samples(outputs) -> list[int]:
    """Indices (dim 0) of the samples whose output holds an inf or NaN anywhere."""
    bad: set[int] = set()
    for leaf in flatten_outputs(outputs):
        flags = ~np.isfinite(_as_numpy(leaf))
        if flags.ndim == 0:
            bad.update({0} if flags else set())
        elif flags.size:
            bad.update(int(i) for i in np.flatnonzero(flags.reshape(len(flags), -1).any(1)))
    return sorted(bad)


def fp32_noise(model: torch.nn.Module, batches: list) -> float:
    """The model's own rounding error: its fp32 output against the fp64 one, by the rule the checks apply (the
    worst output, and the worst sample on its own floored scale: ``sample_rel``).

    Returns 0.0 when the model cannot run in fp64 (custom kernels); callers
    then fall back on the fixed fp32 floor. ``batches`` may hold several
    inputs each (analysis/inputs.py): floating ones run in fp64, token ids and
    masks stay as they are.
    """
    from egp_export.analysis.trace import owned_copy

    def wide_inputs(batch):
        return inputs.structured(batch, lambda leaf: leaf.double() if leaf.is_floating_point() else leaf)

    try:
        wide = owned_copy(model).double().eval()
        with torch.no_grad():
            exact = [inputs.call(wide, wide_inputs(b)) for b in batches]  # token ids stay integers
            rounded = [inputs.call_on_copy(model, b) for b in batches]  # a model may write into its input
    except Exception:  # noqa: BLE001 - whatever stops the fp64 run, the fixed floor applies
        return 0.0
    return compare(exact, rounded).sample_rel
