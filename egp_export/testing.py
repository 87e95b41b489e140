"""Helpers to make real architectures into test and benchmark subjects without trained weights.

No pretrained weights can be downloaded here, so tests and benchmarks build
torchvision models with random weights, *engineer* some activations to be
linear (a BatchNorm or Linear bias set far into one region of the activation
that follows), and recalibrate every BatchNorm's running statistics on random
data, so activations are normalised the way a trained network's are rather
than vanishing or exploding with depth.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def recalibrate_batchnorm(
    model: nn.Module, shape: tuple[int, ...], seed: int = 1, *, batches: int = 2, batch_size: int = 32
) -> nn.Module:
    """Running statistics measured on random data (cumulative average), then eval mode. Changes ``model``."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, *shape, generator=generator))
    return model.eval()


def set_parameter(parameter: torch.Tensor, value) -> None:
    """Fill a parameter with a scalar or a broadcastable tensor (engineering a site's bias or scale)."""
    with torch.no_grad():
        parameter.copy_(torch.as_tensor(value, dtype=parameter.dtype).expand_as(parameter))
