"""Comparing outputs: one error measure and explicit tolerances per backend.

The error of a candidate output ``y`` against a reference ``r`` is reported two
ways: ``max_abs = max |y - r|`` and ``max_rel = max_abs / max |r|`` (relative to
the reference's scale, not element-wise, so outputs that cross zero do not
blow it up). Verification passes when ``max_rel <= rtol``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

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


@dataclass(frozen=True)
class ErrorStats:
    """Largest absolute and scale-relative difference between two outputs.

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

    def within(self, rtol: float) -> bool:
        return bool(math.isfinite(self.max_rel) and math.isfinite(rtol) and self.max_rel <= rtol)

    def to_dict(self) -> dict:
        """max_abs and max_rel; the non-finite fields only when there is a mismatch to report."""
        fields = asdict(self)
        if not self.nonfinite_mismatches:
            del fields["nonfinite_mismatches"], fields["first_bad_sample"]
        return fields


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def flatten_outputs(outputs) -> list:
    """Tensors of a (possibly nested tuple/list/dict) model output, in order."""
    if isinstance(outputs, (tuple, list)):
        return [leaf for item in outputs for leaf in flatten_outputs(item)]
    if isinstance(outputs, dict):
        return [leaf for key in sorted(outputs) for leaf in flatten_outputs(outputs[key])]
    return [outputs]


def _first_sample(bad: np.ndarray) -> int:
    # Outputs are [batch, ...]: the sample is the first index; a scalar output is sample 0.
    return int(np.argwhere(bad)[0][0]) if bad.ndim else 0


class ErrorAccumulator:
    """``compare`` over batches, one at a time: the outputs of a large held-out set are never held together.

    The result equals ``compare`` of the concatenated outputs (the error and the
    scale are maxima; a non-finite mismatch's sample index counts from the first
    batch).
    """

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.scale = 0.0
        self.mismatches = 0
        self.first_bad: int | None = None
        self.samples = 0

    def add(self, reference, candidate) -> None:
        refs = [_as_numpy(r) for r in flatten_outputs(reference)]
        cands = [_as_numpy(c) for c in flatten_outputs(candidate)]
        if len(refs) != len(cands):
            raise ValueError(f"output count differs: {len(refs)} reference vs {len(cands)} candidate")
        for ref, cand in zip(refs, cands):
            if ref.shape != cand.shape:
                raise ValueError(f"output shape differs: {ref.shape} reference vs {cand.shape} candidate")
            if ref.size == 0:
                continue
            ref_finite, cand_finite = np.isfinite(ref), np.isfinite(cand)
            same_nonfinite = ~ref_finite & ~cand_finite & ((ref == cand) | (np.isnan(ref) & np.isnan(cand)))
            bad = ~(ref_finite & cand_finite) & ~same_nonfinite
            if bad.any():
                self.mismatches += int(bad.sum())
                if self.first_bad is None:
                    self.first_bad = self.samples + _first_sample(bad)
            both = ref_finite & cand_finite
            if both.any():
                self.max_abs = max(self.max_abs, float(np.abs(ref[both] - cand[both]).max()))
            if ref_finite.any():
                self.scale = max(self.scale, float(np.abs(ref[ref_finite]).max()))
        self.samples += len(refs[0]) if refs and refs[0].ndim else 1

    def all_reduce(self, runtime, offset: int) -> None:
        """Merge every rank's accumulator (``runtime``: sum and max over ranks, as prune's Runtime); ``offset`` is
        this rank's first sample, so the first bad sample is numbered over all ranks' samples."""
        first_bad = -(self.first_bad + offset) if self.first_bad is not None else -math.inf
        maxima = runtime.max(torch.tensor([self.max_abs, self.scale, first_bad], dtype=torch.float64))
        sums = runtime.sum(torch.tensor([self.mismatches, self.samples], dtype=torch.int64))
        self.max_abs, self.scale = float(maxima[0]), float(maxima[1])
        self.first_bad = None if maxima[2] == -math.inf else int(-maxima[2])
        self.mismatches, self.samples = int(sums[0]), int(sums[1])

    def result(self) -> ErrorStats:
        if self.mismatches:
            return ErrorStats(
                max_abs=math.inf, max_rel=math.inf, nonfinite_mismatches=self.mismatches, first_bad_sample=self.first_bad
            )
        max_rel = self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else math.inf)
        return ErrorStats(max_abs=self.max_abs, max_rel=max_rel)


def compare(reference, candidate) -> ErrorStats:
    """Error of ``candidate`` against ``reference`` (tensors, arrays or nests of them).

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


def fp32_noise(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """The model's own rounding error: max_rel of its fp32 output against the fp64 one.

    Returns 0.0 when the model cannot run in fp64 (custom kernels); callers
    then fall back on the fixed fp32 floor.
    """
    from egp_export.analysis.trace import owned_copy

    try:
        wide = owned_copy(model).double().eval()
        with torch.no_grad():
            exact = [wide(b.double() if b.is_floating_point() else b) for b in batches]  # token ids stay integers
            rounded = [model(b.clone()) for b in batches]  # a model may write into its input
    except Exception:  # noqa: BLE001 - whatever stops the fp64 run, the fixed floor applies
        return 0.0
    return compare(exact, rounded).max_rel
