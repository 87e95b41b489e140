"""The dynamo and TorchScript exporters side by side: export time, ops, ONNX Runtime error.

Usage: python tools/bench_exporters.py [--repeats 3] [--example-batch 2]

The measurements behind the exporter order in egp_export/export/onnx.py. For
resnet18, mobilenet_v2, a 2-layer ViT at 32 px and an fx-traced resnet18
(random weights, eval mode): ``export_onnx`` with each exporter named
explicitly (no fallback), an example of ``--example-batch`` 3x32x32 samples,
verified on a batch of 5. Export seconds are the median of ``--repeats`` runs
after one warm-up export per exporter (one-time import and compilation costs
are not the exporter's speed). Prints a Markdown table and the versions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime
import torch
import torchvision
from torch import fx, nn

from egp_export.errors import ExportError, VerificationError
from egp_export.export.onnx import EXPORTERS, export_onnx


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    built = {
        "resnet18": torchvision.models.resnet18(num_classes=10),
        "mobilenet_v2": torchvision.models.mobilenet_v2(num_classes=10),
        "ViT 32px, 2 layers": torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ),
    }
    nn.init.normal_(built["ViT 32px, 2 layers"].heads.head.weight, std=0.1)  # zero-initialized: its output would be all 0
    built["resnet18, fx-traced"] = fx.symbolic_trace(built["resnet18"])
    return {name: model.eval() for name, model in built.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--example-batch", type=int, default=2)
    args = parser.parse_args()

    example, verify = torch.randn(args.example_batch, 3, 32, 32), torch.randn(5, 3, 32, 32)
    warmup = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    import onnxscript  # noqa: PLC0415 - only for its version
    import onnxsim  # noqa: PLC0415 - only for its version

    print(
        f"torch {torch.__version__}, onnxscript {onnxscript.__version__}, onnx {onnx.__version__}, "
        f"onnxsim {onnxsim.__version__}, onnxruntime {onnxruntime.__version__}; {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as folder:
        for exporter in EXPORTERS:
            export_onnx(warmup, example, Path(folder) / f"warmup_{exporter}.onnx", exporter=exporter, rtol=1e-5)
        print("| model | exporter | export s (median) | total s | ops exported -> written | ORT max_rel |")
        print("|---|---|---:|---:|---|---:|")
        for name, model in models().items():
            for exporter in EXPORTERS:
                export_times, total_times, result = [], [], None
                try:
                    for run in range(args.repeats):
                        start = time.perf_counter()
                        result = export_onnx(
                            model, example, Path(folder) / f"{run}.onnx", verify_inputs=verify, exporter=exporter,
                            rtol=1e-5, force=True,
                        )
                        total_times.append(time.perf_counter() - start)
                        export_times.append(result.seconds["export"])
                except (ExportError, VerificationError) as error:
                    print(f"| {name} | {exporter} | FAIL: {str(error)[:200]} | | | |")
                    continue
                print(
                    f"| {name} | {exporter} | {statistics.median(export_times):.2f} | {statistics.median(total_times):.2f} | "
                    f"{sum(result.op_counts_exported.values())} -> {sum(result.op_counts.values())} | "
                    f"{result.error.max_rel:.1e} |"
                )


if __name__ == "__main__":
    main()
