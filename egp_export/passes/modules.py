"""Modules the rewrites insert into graphs."""

from __future__ import annotations

import torch
import torch.nn as nn


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a graph's weights are in (float64 while the pass manager folds in float64): inserted maps store theirs
    in it, so nothing is rounded to float32 before the end of the pipeline."""
    floating = (t.dtype for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())
    return next(floating, torch.float32)


class ChannelAffine(nn.Module):
    """``y = scale * x + shift`` per neuron along ``dim`` (1 for NC..., -1 for ...C).

    What a BatchNorm is in eval mode, and what a linear activation site is on
    its calibration data (ON → 1·x, OFF → 0, ReLU6 saturated → 0·x + 6, ...).
    The fold pass pushes it into a neighbouring conv/linear where exact; what is
    left exports as one Mul and one Add.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if scale.shape != shift.shape or scale.dim() != 1:
            raise ValueError("scale and shift must be vectors of the same length")
        self.dim = dim
        self.register_buffer("scale", scale.detach().to(dtype).clone())
        self.register_buffer("shift", shift.detach().to(dtype).clone())

    def _view(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.dim == -1 or self.dim == x.dim() - 1:
            return values
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return values.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.scale, x).to(x.dtype) + self._view(self.shift, x).to(x.dtype)

    @property
    def is_identity(self) -> bool:
        return bool(torch.all(self.scale == 1) and torch.all(self.shift == 0))

    def extra_repr(self) -> str:
        return f"neurons={self.scale.numel()}, dim={self.dim}"


class ConstantAdd(nn.Module):
    """``y = x + value``: a position-dependent bias (``value`` is ``[C, *spatial]``, broadcast over the batch).

    What an exactly merged conv chain adds when a later conv zero-pads an
    intermediate that carried a bias (see convchain.py). Needs the static
    spatial size the chain was merged for.
    """

    def __init__(self, value: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().to(dtype).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value.to(x.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}"
