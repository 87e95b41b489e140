"""Time single convolutions on ONNX Runtime CPU and compare with the analytic cost model.

Usage: python tools/fit_cost_model.py [--threads 1]

Prints one row per layer shape (MACs, measured median, analytic prediction,
achieved GMAC/s); the analytic constants in egp_export/algebra/costmodel.py were read
off this table. The shapes are those of MobileNetV2 / ResNet blocks at small
input sizes.
"""

from __future__ import annotations

import argparse

import torch

from egp_export.algebra.convchain import ConvLayer
from egp_export.algebra.costmodel import AnalyticCost
from egp_export.measured_cost import time_onnx_conv


def conv(cin: int, cout: int, kernel: int, groups: int = 1, stride: int = 1) -> ConvLayer:
    weight = torch.zeros(cout, cin // groups, kernel, kernel, dtype=torch.float64)
    pad = kernel // 2
    return ConvLayer(weight, torch.zeros(cout, dtype=torch.float64), (stride, stride), (pad, pad), (1, 1), groups)


SHAPES = [
    (conv(64, 64, 3), (32, 32)),
    (conv(64, 64, 1), (32, 32)),
    (conv(144, 144, 3, 144), (32, 32)),
    (conv(24, 144, 1), (32, 32)),
    (conv(144, 24, 1), (32, 32)),
    (conv(24, 24, 3), (32, 32)),
    (conv(24, 24, 5), (32, 32)),
    (conv(16, 16, 3), (8, 8)),
    (conv(96, 96, 3, 96), (56, 56)),
    (conv(32, 192, 1), (28, 28)),
    (conv(32, 32, 3), (28, 28)),
    (conv(256, 256, 3), (14, 14)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model = AnalyticCost()
    print("| in | out | kernel | groups | input | MMACs | measured us | analytic us | GMAC/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for layer, size in SHAPES:
        seconds = time_onnx_conv(layer, size, threads=args.threads)
        predicted = model.conv_seconds(layer, size)
        macs = layer.macs(size)
        print(
            f"| {layer.in_channels} | {layer.out_channels} | {layer.kernel[0]}x{layer.kernel[1]} | {layer.groups} | "
            f"{size[0]}x{size[1]} | {macs / 1e6:.2f} | {seconds * 1e6:.1f} | {predicted * 1e6:.1f} | {macs / seconds / 1e9:.1f} |"
        )


if __name__ == "__main__":
    main()
