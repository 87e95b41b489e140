"""What writing provenance costs the export: a compiled graph module exported scoped by node and as it is.

Usage: python tools/bench_provenance.py [--rounds 2]

The zoo's ResNet-18 with an engineered linear site (compiled as
tests/test_zoo_e2e.py compiles it: same seeds, 64 calibration samples) is exported with each exporter, alternately scoped (what
``export_onnx`` does, export/provenance.py) and unscoped (the module as it is,
no provenance from graph nodes), ``--rounds`` times. Prints the exporter's own
seconds (``ExportResult.seconds["export"]``), the whole ``export_onnx`` call,
the ops written and ONNX Runtime's error: the last two must be equal.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

import egp_export
import egp_export.export.onnx as export_module
from egp_export.analysis.numerics import NOISE_FACTOR, fp32_noise
from egp_export.export.provenance import Scoped, scoped_module
from egp_export.testing import ZOO_BY_NAME, engineer_linear_site, recalibrate_batchnorm


def _unscoped(module: torch.nn.Module) -> Scoped:
    return Scoped(module, None, module_names=frozenset(name for name, _ in module.named_modules()))


def _compiled_resnet18() -> tuple[torch.nn.Module, torch.Tensor]:
    entry = ZOO_BY_NAME["torchvision/resnet18"]
    torch.manual_seed(0)
    model = entry.build()
    engineer_linear_site(model)
    model = recalibrate_batchnorm(model, entry.input_shape, seed=1, batch_size=16)
    calibration = torch.randn(64, *entry.input_shape, generator=torch.Generator().manual_seed(2))
    tolerance = max(1e-5, NOISE_FACTOR * fp32_noise(model, [calibration[:4]]))
    fresh = torch.randn(8, *entry.input_shape, generator=torch.Generator().manual_seed(3))
    return egp_export.compile(model, calibration, tolerance).module, fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    module, fresh = _compiled_resnet18()
    print("| round | exporter | module | exporter s | export_onnx s | ops | ORT max_rel |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            for exporter in ("torchscript", "dynamo"):
                for label, scope in (("scoped", scoped_module), ("unscoped", _unscoped)):
                    export_module.scoped_module = scope
                    start = time.perf_counter()
                    result = export_module.export_onnx(
                        module, fresh[:2], Path(folder) / "model.onnx", verify_inputs=fresh,
                        rtol=1e-3, force=True, exporter=exporter,
                    )
                    total = time.perf_counter() - start
                    print(
                        f"| {round_} | {exporter} | {label} | {result.seconds['export']:.2f} | {total:.2f} | "
                        f"{sum(result.op_counts.values())} | {result.error.max_rel:.2e} |"
                    )


if __name__ == "__main__":
    main()
