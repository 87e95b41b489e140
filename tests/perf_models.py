"""Small ONNX models for the backend, profiler, gate and plot tests, exported with egp_export.export_onnx.

"deep" and "shallow" compute exactly the same function: deep inserts identity
convolutions (a 3x3 kernel with a single 1 at the centre tap of its own
channel, zero bias: x*1 + 0 + ... is exact in fp32), so a gate between them
has a clear speedup and zero numeric error. "perturbed" is deep with one
weight changed: the same speed, different outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from egp_export.export.onnx import export_onnx

CHANNELS = 8
IDENTITY_CONVS = 30  # enough for a >5x latency ratio on ONNX Runtime CPU at 16x16
SAMPLE_SHAPE = (3, 16, 16)
SMALL_SAMPLE_SHAPE = (3, 8, 8)


def identity_conv(channels: int = CHANNELS) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for channel in range(channels):
            conv.weight[channel, channel, 1, 1] = 1.0
    return conv


def conv_stack(identity_convs: int, *, perturb: bool = False) -> nn.Module:
    """conv(3->8), ReLU, ``identity_convs`` identity convs, conv(8->8); the same weights for every depth."""
    generator = torch.Generator().manual_seed(0)
    first = nn.Conv2d(3, CHANNELS, 3, padding=1)
    last = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
    with torch.no_grad():
        for conv in (first, last):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        if perturb:
            last.weight[0, 0, 1, 1] += 0.5
    return nn.Sequential(first, nn.ReLU(), *[identity_conv() for _ in range(identity_convs)], last).eval()


MODELS = {
    "shallow": (lambda: conv_stack(0), SAMPLE_SHAPE),
    "deep": (lambda: conv_stack(IDENTITY_CONVS), SAMPLE_SHAPE),
    "perturbed": (lambda: conv_stack(IDENTITY_CONVS, perturb=True), SAMPLE_SHAPE),
    "small": (lambda: conv_stack(2), SMALL_SAMPLE_SHAPE),
}


def export_model(name: str, folder: Path) -> Path:
    """Export MODELS[name] to ``folder/name.onnx`` (TorchScript exporter: the fastest; dynamic batch)."""
    build, shape = MODELS[name]
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    return export_onnx(build(), example, Path(folder) / f"{name}.onnx", exporter="torchscript").path
