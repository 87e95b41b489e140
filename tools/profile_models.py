"""Benchmark: baseline (as-is export) vs compiled latency for torchvision models with engineered linear blocks.

Usage:
    python tools/profile_models.py --out docs/latency-cpu.md [--input-size 64] [--backends ort-cpu ...]

For ResNet-18 and MobileNetV2 it engineers linear activations the way
tests/test_torchvision_e2e.py does (BatchNorm biases far inside one region of
the activation that follows, then every BatchNorm's running statistics
recalibrated on random data so the network is well scaled), compiles with
egp_export.compile, exports the model as it is and the compiled module with
export_onnx (onnx-simplifier on both), and times the two interleaved in one
process (profiler.compare: A/B rounds, bootstrap interval of the speedup) on
every backend available here. ONNX backends time the two ONNX files; the
PyTorch CUDA backends time the original module against the compiled fx module.

MobileNetV2: the 10 inverted-residual blocks with a skip connection
(features 3, 5, 6, 8, 9, 10, 12, 13, 15, 16 of 17) get both ReLU6 inputs inside
(0, 6), so each such block is affine. Its "block-collapse limit" is the same
network with those 10 blocks replaced by identities: the latency no merge of
theirs can beat (a reference point, not the same function).

Writes a Markdown table (the exact command line at the top) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torchvision
from torch import nn

import egp_export
from egp_export.export.onnx import count_ops, export_onnx
from egp_export.io.fileio import write_text_atomic
from egp_export.runtime.backends import BACKENDS, backend_availability
from egp_export.runtime.gate import check_numerics
from egp_export.runtime.profiler import compare
from egp_export.testing import recalibrate_batchnorm
from egp_export.testing import set_parameter as _set

MOBILENET_LINEAR_BLOCKS = (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)
CALIBRATION_SAMPLES = 96






def engineer_resnet18(model: nn.Module) -> str:
    _set(model.layer1[0].bn1.bias, 10.0)  # ReLU always on: identity
    bias = torch.full((128,), 10.0)
    bias[:64] = -10.0  # half the channels always off: dead, removed
    _set(model.layer2[0].bn1.bias, bias)
    return "layer1.0's first ReLU always on; layer2.0's first ReLU half always on, half always off (dead channels)"


def engineer_mobilenet_v2(model: nn.Module) -> str:
    for index in MOBILENET_LINEAR_BLOCKS:
        block = model.features[index].conv
        for bn in (block[0][1], block[1][1]):  # expansion and depthwise BN, each followed by ReLU6
            _set(bn.weight, 0.3)
            _set(bn.bias, 3.0)  # ReLU6 input ~ N(3, 0.3^2): inside (0, 6), identity
    return f"{len(MOBILENET_LINEAR_BLOCKS)} of 17 blocks affine (features {', '.join(map(str, MOBILENET_LINEAR_BLOCKS))})"


def collapse_mobilenet_v2(model: nn.Module) -> nn.Module:
    import copy

    collapsed = copy.deepcopy(model)
    for index in MOBILENET_LINEAR_BLOCKS:
        collapsed.features[index] = nn.Identity()
    return collapsed.eval()


@dataclass
class Case:
    build: Callable[[], nn.Module]
    engineer: Callable[[nn.Module], str]
    collapse: Callable[[nn.Module], nn.Module] | None = None


CASES = {
    "resnet18": Case(lambda: torchvision.models.resnet18(num_classes=10), engineer_resnet18),
    "mobilenet_v2": Case(lambda: torchvision.models.mobilenet_v2(num_classes=10), engineer_mobilenet_v2, collapse_mobilenet_v2),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; {platform.system()} {platform.release()}; load average {load} at the end"


def versions() -> str:
    import onnxruntime

    parts = [f"egp-export {egp_export.__version__}", f"torch {torch.__version__}", f"onnxruntime {onnxruntime.__version__}"]
    for module in ("tensorrt", "tensorrt_rtx"):
        try:
            parts.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Markdown file to write (e.g. docs/latency-cpu.md)")
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--input-size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), help="default: every backend available here")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--fp16", action="store_true", help="TensorRT engines in fp16")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    command = "python tools/profile_models.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.out.exists() and not args.force:
        parser.error(f"{args.out} exists; pass --force to overwrite it")

    availability = backend_availability()
    names = args.backends or [name for name, (ok, _) in availability.items() if ok]
    for name in names:
        if not availability[name][0]:
            parser.error(f"backend {name} is not available here: {availability[name][1]}")
    torch.set_num_threads(max(1, args.threads))
    shape = (3, args.input_size, args.input_size)

    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="egp-profile-models-") as folder:
        for model_name in args.models:
            case = CASES[model_name]
            torch.manual_seed(0)
            model = case.build()
            description = case.engineer(model)
            model = recalibrate_batchnorm(model, shape, seed=1)
            calibration = torch.randn(CALIBRATION_SAMPLES, *shape, generator=torch.Generator().manual_seed(2))
            log(f"{model_name}: compiling ({description})")
            started = time.perf_counter()
            result = egp_export.compile(model, calibration)
            compile_seconds = time.perf_counter() - started
            report = result.report
            example = calibration[:2]
            fresh = torch.randn(8, *shape, generator=torch.Generator().manual_seed(3))
            rtol = max(1e-4, report["verification"]["pytorch"]["rtol"])
            variants = {
                "baseline": model,
                "compiled": result.module,
            }
            if case.collapse is not None:
                variants["collapse limit"] = case.collapse(model)
            files = {
                label: export_onnx(module, example, Path(folder) / f"{model_name}_{label.replace(' ', '_')}.onnx",
                                   verify_inputs=fresh, rtol=rtol).path
                for label, module in variants.items()
            }  # fmt: skip
            ops = {label: sum(count_ops(onnx.load(str(path))).values()) for label, path in files.items()}
            notes.append(
                f"- **{model_name}**: {description}. Compile: depth {report['before']['depth']} → {report['after']['depth']}, "
                f"{report['activations_linearized']} of {report['before']['activations']} activations linearized, "
                f"conv/linear layers {report['before']['layers']} → {report['after']['layers']}, MACs/sample "
                f"{report['before']['macs']:,} → {report['after']['macs']:,}; ONNX nodes "
                + ", ".join(f"{label} {count}" for label, count in ops.items())
                + f"; compiled in {compile_seconds:.0f} s."
            )
            numeric = check_numerics(files["baseline"], files["compiled"], max_rel_error=rtol, threads=args.threads)
            for backend in names:
                accepts = BACKENDS[backend].accepts
                options = {"fp16": True} if args.fp16 and backend.startswith("tensorrt") else None
                for batch in args.batch_sizes:
                    artifacts = files if accepts == "onnx" else variants
                    log(f"{model_name}: {backend}, batch {batch}")
                    timing = {
                        "backend": backend,
                        "batch_size": batch,
                        "input_shape": shape,
                        "rounds": args.rounds,
                        "iterations": args.iterations,
                        "warmup": args.warmup,
                        "threads": args.threads,
                        "backend_options": options,
                    }
                    measured = {"compiled": compare(artifacts["baseline"], artifacts["compiled"], **timing)}
                    if "collapse limit" in artifacts:  # compiled vs limit directly: "within 10%" is this ratio
                        measured["limit"] = compare(artifacts["compiled"], artifacts["collapse limit"], **timing)
                    rows.append((model_name, backend, batch, measured, numeric))

    lines = [
        "# Latency: as-is export vs egp-export compiled",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {machine()}. Software: {versions()}.",
        f"Input {'×'.join(map(str, shape))}, ONNX Runtime threads {args.threads}; {args.rounds} interleaved rounds × "
        f"{args.iterations} iterations per model after {args.warmup} warm-up runs; speedup = baseline median / "
        "candidate median, with its 95% bootstrap interval over rounds (profiler.compare).",
        "",
        "| model | backend | batch | baseline ms | compiled ms | speedup [95% CI] | collapse-limit ms "
        "| compiled / limit [95% CI] | max rel error |",
        "|---|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for model_name, backend, batch, measured, numeric in rows:
        compiled = measured["compiled"]
        limit = measured.get("limit")
        limit_cells = ["—", "—"]
        if limit is not None:
            limit_cells = [f"{limit.candidate_stats.median:.3f}", f"{limit.speedup:.2f} [{limit.ci[0]:.2f}, {limit.ci[1]:.2f}]"]
        error = "—" if numeric.error is None else f"{numeric.error.max_rel:.1e}"
        lines.append(
            f"| {model_name} | {backend} | {batch} | {compiled.baseline_stats.median:.3f} | "
            f"{compiled.candidate_stats.median:.3f} | {compiled.speedup:.2f}x [{compiled.ci[0]:.2f}, {compiled.ci[1]:.2f}] | "
            + " | ".join(limit_cells)
            + f" | {error} |"
        )
    skipped = [f"{name} ({reason})" for name, (ok, reason) in availability.items() if name not in names]
    if skipped:
        lines += ["", "Not measured here: " + "; ".join(skipped) + "."]
    lines += [
        "",
        "Columns: medians in ms. *speedup*: baseline vs compiled, interleaved. *collapse limit*: the engineered affine "
        "blocks replaced by identities (not the same function: the latency no merge of those blocks can beat); "
        "*compiled / limit*: compiled vs collapse limit in their own interleaved comparison (1.00 = at the limit; "
        "the issue's target accepts <= 1.10 where the limit is below 1.42x the baseline). *max rel error*: compiled "
        "vs baseline ONNX on ONNX Runtime CPU, 8 random samples. The intervals cover drift within one run (interleaved "
        "rounds); on a shared machine a second run can land outside them (other jobs change cache and memory "
        "bandwidth, and not every model suffers alike), so compare runs, not digits.",
        "",
        *notes,
        "",
    ]
    write_text_atomic(args.out, "\n".join(lines), force=args.force)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
