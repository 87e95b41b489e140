"""Calibration cost relative to a plain forward pass (the number docs/calibration.md reports).

    PYTHONPATH=. python tools/bench_calibration.py [--samples 64] [--size 224] [--threads 2] [--repeats 3]

For each model: the traced GraphModule's plain forward over the samples, and
``calibrate`` (the statistics interpreter) over the same batches, interleaved
``--repeats`` times; the best of each is reported with their ratio. Random
weights and inputs: the cost does not depend on the values.
"""

from __future__ import annotations

import argparse
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
    return {"model": name, "forward_s": min(plain), "calibrate_s": min(stats), "ratio": min(stats) / min(plain)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples at {args.size}^2, "
          f"batch {args.batch_size}, best of {args.repeats}")
    for name in args.models:
        row = bench(name, args.samples, args.size, args.repeats, args.batch_size)
        print(f"{row['model']:14s} forward {row['forward_s']:7.2f} s  calibrate {row['calibrate_s']:7.2f} s  "
              f"ratio {row['ratio']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
