"""fp16 on random-weight zoo models: each model's own fp16 noise and the compiled file's fp16 check.

Usage: python tools/fp16_zoo.py [ZOO NAME ...]   (default: torchvision/resnet18 timm/resnet10t timm/regnetx_002)

Each subject is built as the zoo tests build it (seeded random weights, an engineered linear site, BatchNorm
recalibrated on N(0, 1) inputs), compiled on 256 N(0, 1) samples (tolerance 1e-3), and both the original and the
compiled model are exported; the original's fp16 noise (export/fp16.py: converted, emulated, against its fp32
outputs on the held-out samples) and the compiled fp16 file's error and top-1 agreement are printed.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

import egp_export
from egp_export.analysis.numerics import NOISE_FACTOR, fp32_noise
from egp_export.export.fp16 import export_fp16, fp16_noise
from egp_export.export.onnx import export_onnx
from egp_export.testing import ZOO_BY_NAME, engineer_linear_site, recalibrate_batchnorm

DEFAULT = ("torchvision/resnet18", "timm/resnet10t", "timm/regnetx_002")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(DEFAULT))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.names:
        entry = ZOO_BY_NAME[name]
        torch.manual_seed(0)
        model = entry.build()
        engineer_linear_site(model)
        model = recalibrate_batchnorm(model, entry.input_shape, seed=1, batch_size=16)
        data = torch.randn(256, *entry.input_shape, generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = egp_export.compile(model, data, 1e-3)
        decide, held = data.index_select(0, result.split.decide), data.index_select(0, result.split.holdout)
        rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [held]))  # random weights: fp32 noise above the 1e-4 cap
        with tempfile.TemporaryDirectory() as folder:
            original, compiled = Path(folder) / "original.onnx", Path(folder) / "compiled.onnx"
            export_onnx(model, data[:1], original, verify_inputs=[held], exporter=entry.exporter, rtol=rtol)
            export_onnx(result.module, data[:1], compiled, verify_inputs=[held], exporter=entry.exporter, rtol=rtol)
            ranges = list(decide.split(64))
            noise = fp16_noise(original.read_bytes(), model, ranges, [held])
            try:
                _, checked = export_fp16(compiled.read_bytes(), result.module, ranges, [held], noise=noise)
                print(f"{name}: {checked.summary()}")
            except egp_export.VerificationError as error:
                print(f"{name}: original's fp16 noise {noise:.3g}; refused: {error}")


if __name__ == "__main__":
    main()
