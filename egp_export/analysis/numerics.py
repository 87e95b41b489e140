"""Comparing outputs: one error measure and explicit tolerances per backend.

The error of a candidate output ``y`` against a reference ``r`` is reported two
ways: ``max_abs = max |y - r|`` and ``max_rel = max_abs / max |r|`` (relative to
the reference's scale, not element-wise, so outputs that cross zero do not
blow it up). Verification passes when ``max_rel <= rtol``.
"""

from __future__ import annotations

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
# ONNX Runtime (CPU) against PyTorch eager on the same module; DESIGN.md
# measured <= 2e-6 absolute on unit-scale outputs.
ORT_CPU_RTOL = 1e-5


@dataclass(frozen=True)
class ErrorStats:
    """Largest absolute and scale-relative difference between two outputs."""

    max_abs: float
    max_rel: float

    def within(self, rtol: float) -> bool:
        return bool(self.max_rel <= rtol)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


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


def compare(reference, candidate) -> ErrorStats:
    """Error of ``candidate`` against ``reference`` (tensors, arrays or nests of them)."""
    refs = [_as_numpy(r) for r in flatten_outputs(reference)]
    cands = [_as_numpy(c) for c in flatten_outputs(candidate)]
    if len(refs) != len(cands):
        raise ValueError(f"output count differs: {len(refs)} reference vs {len(cands)} candidate")
    max_abs = 0.0
    scale = 0.0
    for ref, cand in zip(refs, cands):
        if ref.shape != cand.shape:
            raise ValueError(f"output shape differs: {ref.shape} reference vs {cand.shape} candidate")
        if ref.size == 0:
            continue
        diff = np.abs(ref - cand)
        # A NaN anywhere makes the comparison fail rather than silently pass.
        max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max()))
        scale = max(scale, float(np.abs(ref).max()))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return ErrorStats(max_abs=max_abs, max_rel=max_rel)


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
            rounded = [model(b) for b in batches]
    except Exception:  # noqa: BLE001 - whatever stops the fp64 run, the fixed floor applies
        return 0.0
    return compare(exact, rounded).max_rel
