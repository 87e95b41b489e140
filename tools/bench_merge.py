"""Merge-engine benchmark: ONNX Runtime CPU latency of four versions of a model with linear blocks.

Usage:
    python tools/bench_merge.py --model mobilenet_v2 --size 224 --linear-blocks 10 --out docs/merge-bench-mnv2-224.md
    python tools/bench_merge.py --model resnet18 --size 96 --linear-blocks 4
    python tools/bench_merge.py --model vit --linear-blocks 2

Variants, all exported with egp_export.export_onnx (dynamo + onnx-simplifier):
  (a) as-is      the model as it is (what a user ships today);
  (b) merge-all  Layer-Folding style: every linear chain merged whole, border error and all;
  (c) egp        egp-export's plan (exact merges only, where the cost model says they pay);
  (d) limit      each linear block replaced by ONE plain layer of the block's shape
                 (not equivalent: the timing floor a perfect merge could reach).
Latencies are medians over interleaved rounds (all four variants in every round,
rotating the order) on ONNX Runtime CPU with a fixed thread count; ratios are
to (a), with a bootstrap interval for (c)/(a). Outputs of (b) and (c) are
compared with (a) on the same random inputs.
"""

from __future__ import annotations

import argparse
import copy
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision

from egp_export import compile as egp_compile
from egp_export.analysis.numerics import compare, fp32_noise
from egp_export.analysis.plans import plan_site, store_plans
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.export.onnx import export_onnx
from egp_export.io.fileio import write_text_atomic
from egp_export.passes import PassManager, default_steps
from egp_export.runtime.backends import get_backend
from egp_export.runtime.profiler import bootstrap_ratio_ci, run_interleaved
from egp_export.testing import recalibrate_batchnorm
from egp_export.testing import set_parameter as _set

VARIANTS = ("as-is", "merge-all", "egp", "limit")






# Model builders: (model with engineered linear blocks, limit model) -------------------------


def mobilenet_v2(blocks: int, size: int):
    model = torchvision.models.mobilenet_v2(num_classes=1000)
    limit = copy.deepcopy(model)
    chosen = list(range(1, 1 + blocks))  # features[1..17] are the inverted residual blocks
    for index in chosen:
        for layer in model.features[index].conv:
            if isinstance(layer, torchvision.ops.Conv2dNormActivation):
                _set(layer[1].weight, 0.3)
                _set(layer[1].bias, 3.0)  # ReLU6 input in (0, 6): identity on the data
        block = model.features[index]
        first = block.conv[0][0]
        last = [m for m in block.conv.modules() if isinstance(m, nn.Conv2d)][-1]
        stride = max(m.stride[0] for m in block.conv.modules() if isinstance(m, nn.Conv2d))
        limit.features[index] = nn.Conv2d(first.in_channels, last.out_channels, 3, stride=stride, padding=1)
    return model, limit, chosen


def resnet18(blocks: int, size: int):
    model = torchvision.models.resnet18(num_classes=1000)
    limit = copy.deepcopy(model)
    all_blocks = [(layer, i) for layer in ("layer1", "layer2", "layer3", "layer4") for i in (0, 1)]
    chosen = all_blocks[:blocks]
    for layer, i in chosen:
        block = getattr(model, layer)[i]
        _set(block.bn1.bias, 10.0)  # inner ReLU always ON
        getattr(limit, layer)[i] = nn.Sequential(
            nn.Conv2d(block.conv1.in_channels, block.conv2.out_channels, 3, stride=block.conv1.stride, padding=1), nn.ReLU()
        )
    return model, limit, chosen


def vit(blocks: int, size: int):
    from torchvision.models import VisionTransformer

    def build():
        return VisionTransformer(
            image_size=size, patch_size=16, num_layers=6, num_heads=4, hidden_dim=192, mlp_dim=768, num_classes=1000
        )

    model = build()
    # torchvision zero-initialises the ViT head: every output would be 0 and every error trivially 0.
    nn.init.normal_(model.heads.head.weight, std=0.02)
    limit = copy.deepcopy(model)
    chosen = list(range(blocks))
    for index in chosen:
        mlp = model.encoder.layers[index].mlp
        _set(mlp[0].bias, 30.0)  # GELU identity within 1e-10
        limit.encoder.layers[index].mlp = nn.Sequential(nn.Linear(192, 192))
    return model, limit, chosen


BUILDERS = {"mobilenet_v2": mobilenet_v2, "resnet18": resnet18, "vit": vit}


def merge_all(model: nn.Module, calibration: torch.Tensor) -> torch.fx.GraphModule:
    """Layer-Folding-style compile: the same pipeline, every chain merged whole, no verification."""
    gm = trace(model)
    store_plans(gm, {site.name: plan_site(site, 1e-5) for site in calibrate(gm, [calibration])})
    PassManager(default_steps(approximate=True, plan="all"), example_input=calibration[:1]).run(gm)
    return gm


def time_variants(paths: dict[str, Path], shape, *, rounds: int, iterations: int, threads: int, seed: int = 0):
    runners = {name: get_backend("ort-cpu", threads=threads) for name in paths}
    for name, runner in runners.items():
        runner.prepare(str(paths[name]), batch_sizes=(1,))
    inputs = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    bounds = {name: runner.bind(inputs) for name, runner in runners.items()}
    for bound in bounds.values():
        for _ in range(10):
            bound()
    clocks = {name: runner.clock() for name, runner in runners.items()}
    names = list(paths)
    orders = [tuple(names[(r + k) % len(names)] for k in range(len(names))) for r in range(rounds)]

    def measure(name):
        def block(count: int) -> np.ndarray:
            bounds[name]()  # one untimed run so each block starts warm
            return clocks[name].measure(bounds[name], count)

        return block

    timings = run_interleaved({name: measure(name) for name in names}, orders, iterations, progress=True)
    for runner in runners.values():
        runner.close()
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mobilenet_v2")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--linear-blocks", type=int, default=10)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="Markdown file to write (with the command at the top)")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model, limit, chosen = BUILDERS[args.model](args.linear_blocks, args.size)
    model = recalibrate_batchnorm(model, shape, batch_size=16)
    limit = recalibrate_batchnorm(limit, shape, batch_size=16)
    calibration = torch.randn(args.calibration, *shape, generator=torch.Generator().manual_seed(2))
    fresh = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))

    started = time.perf_counter()
    compiled = egp_compile(model, calibration)
    compile_seconds = time.perf_counter() - started
    folded = merge_all(model, calibration)
    modules = {"as-is": model, "merge-all": folded, "egp": compiled.module, "limit": limit}
    with tempfile.TemporaryDirectory() as tmp:
        paths, errors, ops = {}, {}, {}
        for name, module in modules.items():
            # Variants that are not meant to equal the model are only checked against themselves.
            result = export_onnx(module, fresh, Path(tmp) / f"{name}.onnx", rtol=1e-4 if name != "merge-all" else 1.0)
            paths[name] = result.path
            ops[name] = sum(result.op_counts.get(op, 0) for op in ("Conv", "Gemm", "MatMul"))
            if name in ("merge-all", "egp"):
                with torch.no_grad():
                    errors[name] = compare(model(fresh), module(fresh))
        timings = time_variants(paths, shape, rounds=args.rounds, iterations=args.iterations, threads=args.threads)

    medians = {name: float(np.median(t)) for name, t in timings.items()}
    low, high = bootstrap_ratio_ci(timings["egp"], timings["as-is"])  # interval of median(egp) / median(as-is)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    lines = [
        f"## {args.model}, {args.size}x{args.size}, {len(chosen)} linear blocks",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads available; ONNX Runtime CPU with "
        f"{args.threads} thread(s); {args.rounds} interleaved rounds x {args.iterations} runs, batch 1.",
        f"egp-export compile time: {compile_seconds:.1f} s ({args.calibration} calibration samples). "
        f"The as-is model's own fp32 rounding (fp32 vs fp64 run, max_rel): {fp32_noise(model, [fresh]):.2e}.",
        "",
        "| variant | median ms | ratio to (a) | conv/gemm/matmul ops | max_rel vs (a) |",
        "|---|---|---|---|---|",
    ]
    for label, name in zip("abcd", VARIANTS):
        error = f"{errors[name].max_rel:.2e}" if name in errors else ("-" if name == "as-is" else "not equivalent")
        lines.append(
            f"| ({label}) {name} | {medians[name]:.3f} | {medians[name] / medians['as-is']:.3f} | {ops[name]} | {error} |"
        )
    ratio_c = medians["egp"] / medians["as-is"]
    ratio_d = medians["limit"] / medians["as-is"]
    lines += [
        "",
        f"(c)/(a) = {ratio_c:.3f} (95% bootstrap interval of the ratio of medians: {low:.3f}-{high:.3f}); "
        f"(d)/(a) = {ratio_d:.3f}; (c)/(a) - (d)/(a) = {ratio_c - ratio_d:+.3f}.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n", force=args.force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
