"""Turning what a user calls "calibration data" into validated batches, and holding part out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from egp_export.errors import CalibrationError

DEFAULT_BATCH_SIZE = 64


@dataclass
class CalibrationSplit:
    """The calibration samples in three disjoint parts, each with one job.

    ``calibrate`` (decide): the activation statistics every rewrite is planned
    on. ``validate``: run only to withdraw rewrites whose neurons leave their
    region there; it never adds one. ``holdout`` (verify): never used to
    decide anything; the final check runs on it.
    """

    calibrate: list[torch.Tensor]
    holdout: list[torch.Tensor]
    validate: list[torch.Tensor] = field(default_factory=list)

    @property
    def calibration_samples(self) -> int:
        """Samples the compile learned from: decided on or validated on."""
        return self.decide_samples + self.validation_samples

    @property
    def decide_samples(self) -> int:
        return sum(len(b) for b in self.calibrate)

    @property
    def validation_samples(self) -> int:
        return sum(len(b) for b in self.validate)

    @property
    def holdout_samples(self) -> int:
        return sum(len(b) for b in self.holdout)


def _input_of(item, index: int) -> torch.Tensor:
    # (input, target) tuples from datasets/DataLoaders: the input is first.
    if isinstance(item, (tuple, list)):
        if not item:
            raise CalibrationError(f"calibration item {index} is an empty tuple; expected a tensor or (input, target).")
        item = item[0]
    if isinstance(item, dict):
        raise CalibrationError(
            f"calibration item {index} is a dict; pass tensors or (input, target) tuples "
            "(e.g. a generator yielding batch['input'])."
        )
    if not isinstance(item, torch.Tensor):
        try:
            item = torch.as_tensor(item)
        except Exception:
            raise CalibrationError(
                f"calibration item {index} is a {type(item).__name__}, not a tensor; "
                "pass a tensor batch, an iterable of tensors or (input, target) tuples, or a DataLoader."
            ) from None
    return item


def as_batches(calibration, *, batch_size: int = DEFAULT_BATCH_SIZE) -> list[torch.Tensor]:
    """Validated batches ``[B, ...]`` from a tensor, an iterable of tensors / (x, y), or a DataLoader.

    Samples keep their dtype (integer token ids stay integers).

    A single tensor is one batch of samples along dim 0, cut into ``batch_size``
    chunks so no activation of the whole set is ever held at once.
    """
    if isinstance(calibration, torch.Tensor):
        items: Iterable = [calibration]
    elif isinstance(calibration, (str, bytes)):
        raise CalibrationError("calibration must be tensors, not a path; load the file first (egp_export.io.datasets).")
    else:
        try:
            items = iter(calibration)
        except TypeError:
            raise CalibrationError(
                f"calibration of type {type(calibration).__name__} is not iterable; pass a tensor batch, "
                "an iterable of tensors or (input, target) tuples, or a DataLoader."
            ) from None
    batches: list[torch.Tensor] = []
    sample_shape: tuple[int, ...] | None = None
    for index, item in enumerate(items):
        tensor = _input_of(item, index)
        if tensor.dim() == 0:
            raise CalibrationError(f"calibration item {index} is a scalar; each item must be a batch [B, ...].")
        if tensor.is_complex():
            raise CalibrationError(f"calibration item {index} is complex ({tensor.dtype}); give real-valued inputs.")
        # Integer inputs (token ids for an nn.Embedding) keep their dtype: cast to float they would be refused.
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CalibrationError(
                f"calibration item {index} has {bad} NaN/Inf values; clean or drop those samples first."
            )
        if sample_shape is None:
            sample_shape = tuple(tensor.shape[1:])
        elif tuple(tensor.shape[1:]) != sample_shape:
            raise CalibrationError(
                f"calibration item {index} has samples of shape {tuple(tensor.shape[1:])}, "
                f"but earlier items have {sample_shape}; all samples must share one shape."
            )
        batches.extend(chunk for chunk in torch.split(tensor.detach(), batch_size) if len(chunk))
    if not batches:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    return batches


def split_holdout(batches: list[torch.Tensor], holdout: float, validation: float = 0.0) -> CalibrationSplit:
    """Hold out the last ``holdout`` fraction of samples (at least one) for verification,
    and the ``validation`` fraction before them (at least one when asked for) for validation.

    ``holdout=0`` verifies on the calibration data itself, which only checks the
    rewrite, not the claim that activations stay linear on unseen inputs.
    """
    for name, fraction in (("holdout", holdout), ("validation", validation)):
        if not 0.0 <= fraction < 1.0:
            raise CalibrationError(f"{name} fraction must be in [0, 1), got {fraction}.")
    total = sum(len(b) for b in batches)
    held = max(1, round(total * holdout)) if holdout > 0 else 0
    validated = max(1, round(total * validation)) if validation > 0 else 0
    if held + validated >= total:
        raise CalibrationError(
            f"only {total} calibration sample(s): too few to keep {holdout:.0%} for verification and "
            f"{validation:.0%} for validation and still decide on the rest; pass more samples or smaller fractions."
        )
    flat = torch.cat(batches)
    size = max(len(b) for b in batches)
    decide_end = total - held - validated

    def cut(start: int, stop: int) -> list[torch.Tensor]:
        return list(torch.split(flat[start:stop], size)) if stop > start else []

    calibrate = cut(0, decide_end)
    holdout_batches = cut(total - held, total) if held else calibrate
    return CalibrationSplit(calibrate=calibrate, holdout=holdout_batches, validate=cut(decide_end, total - held))
