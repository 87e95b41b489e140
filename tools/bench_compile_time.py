"""Compile time versus graph size: ResNet-18/50, MobileNetV2, EfficientNet-B0.

Usage: python tools/bench_compile_time.py [--size 224] [--calibration 16] [--models resnet18 resnet50 ...]

For each model: fx graph nodes, and egp_export.compile's wall time per stage
(report["seconds"], from the stage events: prepare, capture, calibrate (running
the data through the captured graph), decide (plans, validation, perturbation
search), rewrite (the pass pipeline), verify (original vs compiled on the
held-out part), report), with
``torch.get_num_threads()`` threads. No engine build is included. BatchNorm
statistics are recalibrated on random data first so the networks are well
scaled (see tests/test_torchvision_e2e.py); nothing is engineered to be
linear, so this is the cost of analysing and rewriting, not of merging.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

import egp_export
from egp_export.analysis.trace import trace
from egp_export.stages import PIPELINE
from egp_export.testing import recalibrate_batchnorm

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")




def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    shape = (3, args.size, args.size)
    print(
        f"torch threads: {torch.get_num_threads()}; input {args.size}x{args.size}; {args.calibration} calibration samples "
        "(20% held out)"
    )
    # One untimed compile first: the first convolutions of a process pay for kernel selection.
    warm = recalibrate_batchnorm(torchvision.models.resnet18(num_classes=10), shape, batches=1, batch_size=8)
    egp_export.compile(warm, torch.randn(8, *shape))
    stages = [stage.name for stage in PIPELINE] + ["report"]
    print(f"| model | graph nodes | {' | '.join(f'{name} s' for name in stages)} | total s |")
    print("|---|---|" + "---|" * (len(stages) + 1))
    for name in args.models:
        torch.manual_seed(0)
        model = recalibrate_batchnorm(getattr(torchvision.models, name)(num_classes=1000), shape, batches=1, batch_size=8)
        nodes = len(trace(model).graph.nodes)
        data = torch.randn(args.calibration, *shape, generator=torch.Generator().manual_seed(2))
        started = time.perf_counter()
        result = egp_export.compile(model, data)
        total = time.perf_counter() - started
        seconds = result.report["seconds"]
        print(f"| {name} | {nodes} | {' | '.join(f'{seconds.get(stage, 0.0):.2f}' for stage in stages)} | {total:.2f} |")


if __name__ == "__main__":
    main()
