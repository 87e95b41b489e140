"""Calibration cost relative to a plain forward pass (the number docs/calibration.md reports).

    PYTHONPATH=. python tools/bench_calibration.py [--samples 64] [--size 224] [--threads 2] [--repeats 5]
    PYTHONPATH=. python tools/bench_calibration.py --ops --models mobilenet_v2
    PYTHONPATH=. python tools/bench_calibration.py --memory 512 4096

For each model: the traced GraphModule's plain forward over the samples, and
``calibrate`` (the statistics interpreter) over the same batches, interleaved
``--repeats`` times (forward, calibrate, forward, ...). Reported: the median
of each, and the median of the per-repeat ratios (each calibrate over the
forward run just before it: on a shared machine the speed drifts between
repeats, a ratio of neighbours does not). Random weights and inputs: the
cost does not depend on the values, except where a boundary is straddled.

``--ops`` instead captures every site's input z on one batch and times each
reduction alone over all of them (best of 3): the activation itself, amin,
amax, the ON count as calibrate computes it, and the plain
``(z > 0).sum(dims)`` it replaced.

``--memory N ...`` runs ``egp_export.compile`` on torchvision's ResNet-18 (10
classes, 32x32 inputs) in a fresh process per sample count N and calibration
form, and prints the process's peak resident memory: the samples given as a
DataLoader over a Dataset that makes sample i from a seed (nothing stored),
or as one tensor. With the Dataset the peak should not grow with N; with the
tensor it grows by the tensor alone (N x 12 KiB), not by a copy of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from egp_export.analysis.batches import as_batches
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace

MODELS = {
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
}


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench(name: str, samples: int, size: int, repeats: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    gm = trace(MODELS[name]().eval())
    batches = as_batches(torch.randn(samples, 3, size, size), batch_size=batch_size)

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                gm(batch)

    forward()  # warm-up (allocator, oneDNN primitives)
    plain, stats = [], []
    for _ in range(repeats):
        plain.append(_seconds(forward))
        stats.append(_seconds(lambda: calibrate(gm, batches)))
    ratios = [c / f for c, f in zip(stats, plain)]
    return {"model": name, "forward_s": statistics.median(plain), "calibrate_s": statistics.median(stats),
            "ratio": statistics.median(ratios), "ratios": ratios}


def bench_ops(name: str, samples: int, size: int) -> dict[str, float]:
    """Seconds per reduction, summed over the sites' inputs of one batch (see the module docstring)."""
    from egp_export.analysis.stats import ActivationStatsInterpreter, Scratch, _count_greater

    torch.manual_seed(0)
    gm = trace(MODELS[name]().eval())
    interpreter = ActivationStatsInterpreter(gm)
    captured: list[tuple[torch.Tensor, tuple[int, ...], object]] = []
    for site in interpreter.sites.values():
        site.observe = lambda z, scratch=None, site=site: captured.append(  # type: ignore[method-assign]
            (z.detach().clone(), site._reduce_dims(z), site.spec.fn))
    with torch.no_grad():
        interpreter.run(torch.randn(samples, 3, size, size))
    scratch = Scratch()
    ops = {
        "activation": lambda z, dims, fn: fn(z),
        "amin": lambda z, dims, fn: z.amin(dims),
        "amax": lambda z, dims, fn: z.amax(dims),
        "on count (calibrate)": lambda z, dims, fn: _count_greater(z, dims, 0.0, z.numel() // z.shape[1], scratch),
        "on count ((z > 0).sum)": lambda z, dims, fn: (z > 0).sum(dims),
    }
    times = {}
    for label, op in ops.items():
        total = 0.0
        for z, dims, fn in captured:
            op(z, dims, fn)
            total += min(_seconds(lambda op=op, z=z, dims=dims, fn=fn: op(z, dims, fn)) for _ in range(3))
        times[label] = total
    return times


class _SeededImages(torch.utils.data.Dataset):
    """Sample i is drawn from seed i: any number of samples, none stored."""

    def __init__(self, samples: int) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int):
        return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(index)), 0


def _memory_child(samples: int, form: str) -> None:
    import resource

    import egp_export

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    dataset = _SeededImages(samples)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    data = loader if form == "dataset" else torch.stack([dataset[i][0] for i in range(samples)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    egp_export.compile(model, data, tolerance=1e-3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{form:8s} {samples:6d} samples: peak RSS {peak / 1024:7.0f} MiB (before compile {before / 1024:6.0f} MiB), "
          f"{time.perf_counter() - started:5.1f} s", flush=True)


def bench_memory(counts: list[int], threads: int) -> None:
    import subprocess
    import sys

    for form in ("dataset", "tensor"):
        for samples in counts:
            subprocess.run(
                [sys.executable, __file__, "--memory-child", str(samples), form, "--threads", str(threads)], check=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--ops", action="store_true", help="time each reduction alone on the captured site inputs")
    parser.add_argument("--memory", type=int, nargs="*", help="peak memory of compile for these sample counts")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    if args.memory:
        bench_memory(args.memory, args.threads)
        return
    if args.ops:
        for name in args.models:
            times = bench_ops(name, args.samples, args.size)
            print(f"{name}: " + ", ".join(f"{label} {seconds:.3f} s" for label, seconds in times.items()), flush=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples at {args.size}^2, "
          f"batch {args.batch_size}, medians of {args.repeats} interleaved repeats")
    for name in args.models:
        row = bench(name, args.samples, args.size, args.repeats, args.batch_size)
        spread = ", ".join(f"{r:.2f}" for r in row["ratios"])
        print(f"{row['model']:14s} forward {row['forward_s']:7.2f} s  calibrate {row['calibrate_s']:7.2f} s  "
              f"ratio {row['ratio']:.2f}x  (per repeat: {spread})", flush=True)


if __name__ == "__main__":
    main()
