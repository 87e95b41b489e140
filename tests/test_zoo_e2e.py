"""End to end over the model zoo (egp_export.testing.ZOO): torchvision and timm architectures, random weights.

Every architecture is compiled twice: *engineered* (one activation made linear
by construction, see ``engineer_linear_site``) and *untouched*. Both times
every BatchNorm is recalibrated on random data first (random-init BatchNorm
statistics make some networks output ~1e-13, and every relative check
meaningless). The compiled module must match the original on FRESH inputs
drawn like the calibration data; the engineered site must be linearized; the
engineered compile must export to ONNX and match in ONNX Runtime, every node
of the file naming the source modules it came from (provenance). A model the
registry marks unsupported must raise the project error it names.

Run ``python -m tests.test_zoo_e2e`` for the pass/fail table over the whole zoo.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export import errors
from egp_export.analysis.numerics import NOISE_FACTOR, ORT_CPU_RTOL, compare, fp32_noise
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.testing import ZOO, ZOO_BY_NAME, ZooModel, engineer_linear_site, recalibrate_batchnorm

CALIBRATION_SAMPLES = 64
FRESH_SAMPLES = 8


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core runner two OpenMP threads made a batch-1 MobileNetV2
    forward 3.8 s instead of 0.01 s (spinning at every op's barrier); shape propagation runs batch 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reinitialize_zero_weights(model: nn.Module) -> None:
    """Zero-initialised layers (torchvision ViT's head) make every output 0 and every comparison trivially exact."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not bool(module.weight.any()):
            with torch.no_grad():
                module.weight.normal_(0.0, module.weight[0].numel() ** -0.5)


def build_subject(entry: ZooModel, engineered: bool) -> tuple[nn.Module, str | None]:
    """The model (eval mode, recalibrated BatchNorm) and the engineered site's name (or None)."""
    torch.manual_seed(0)
    model = entry.build()
    _reinitialize_zero_weights(model)
    site = engineer_linear_site(model, entry.sample(2, seed=0), frontend=entry.frontend).site if engineered else None
    return recalibrate_batchnorm(model, entry.input_shape, seed=1, batch_size=16), site


def _data(entry: ZooModel, samples: int, seed: int) -> torch.Tensor:
    return entry.sample(samples, seed)


@dataclass
class Compiled:
    """A compiled zoo subject, the fresh inputs it was checked on and what the table shows."""

    module: nn.Module
    fresh: torch.Tensor
    reference: torch.Tensor
    rtol: float
    facts: dict


def compile_and_check(entry: ZooModel, engineered: bool) -> Compiled:
    """Compile one zoo subject and check it on fresh inputs. Raises AssertionError on a failed check."""
    model, site = build_subject(entry, engineered)
    calibration = _data(entry, CALIBRATION_SAMPLES, seed=2)
    # Random-weight networks are ill-conditioned: their own fp32 noise can exceed the 1e-4 cap on the automatic
    # floor (a trained network's is ~1e-5). A user compiling such a model states the tolerance: its noise level.
    tolerance = max(1e-5, NOISE_FACTOR * fp32_noise(model, [calibration[:4]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, calibration, tolerance, frontend=entry.frontend)
    leaves = [leaf["name"] for leaf in result.report["trace"]["leaf_modules"] if leaf["reason"].startswith("untraceable")]
    assert leaves == list(entry.leaves), f"automatic leaves {leaves}, registry expects {list(entry.leaves)}"
    rows = {row["name"]: row for row in result.report["analysis"]["sites"]}
    if site is not None:
        assert rows[site]["linearized"], f"engineered site {site}: {rows[site]['action']}"
    fresh = _data(entry, FRESH_SAMPLES, seed=3)
    # The model's own noise on the very inputs every check below runs on (each sample on its own scale, as the
    # checks judge it): a few samples would understate the worst sample's noise.
    rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [fresh]))
    with torch.no_grad():
        reference = model(fresh)
        error = compare(reference, result.module(fresh))
    assert error.max_rel <= rtol, f"fresh inputs: {error} > {rtol:g}"
    facts = {
        "sites": len(rows),
        "linearized": result.report["activations_linearized"],
        "layers": f"{result.report['before']['layers']}->{result.report['after']['layers']}",
        "max_rel": error.max_rel,
    }
    return Compiled(result.module, fresh, reference, rtol, facts)


def check_onnx(compiled: Compiled, path: Path, exporter: str, batch: int) -> float:
    """Export from a batch-``batch`` example, verify in ONNX Runtime on the fresh inputs; the error against the original."""
    ort_rtol = max(ORT_CPU_RTOL, compiled.rtol)
    exported = export_onnx(
        compiled.module, compiled.fresh[:batch], path, verify_inputs=compiled.fresh, rtol=ort_rtol, force=True,
        exporter=exporter, simplify=exporter != "torchscript",
    )
    outputs = run_onnx(ort_session(exported.path), compiled.fresh)
    reference = compiled.reference
    ort_error = compare(reference, outputs[0] if isinstance(reference, torch.Tensor) else type(reference)(outputs))
    assert ort_error.max_rel <= 2 * ort_rtol, f"ONNX Runtime: {ort_error}"
    # Every node of the file names the modules of the original model it computes, or which tool added it and why.
    unmapped = [row for row in exported.provenance if not row.mapped]
    assert not unmapped, f"ONNX nodes without provenance: {unmapped[:3]}"
    return ort_error.max_rel


def _expected_error(support: str) -> tuple[type[Exception], str]:
    kind, _, phrase = support.partition(": ")
    return getattr(errors, kind), phrase


TRANSFORMERS_MISSING = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="Hugging Face transformers is not installed (pip install 'egp-export[transformers]')",
)


def _marks(entry: ZooModel) -> list:
    return ([pytest.mark.slow] if entry.slow else []) + ([TRANSFORMERS_MISSING] if entry.name.startswith("transformers/") else [])


def _params():
    return [pytest.param(entry.name, marks=_marks(entry)) for entry in ZOO]


@pytest.mark.parametrize("name", _params())
def test_engineered_zoo_model_compiles_matches_and_exports(name, tmp_path):
    entry = ZOO_BY_NAME[name]
    if entry.expected(engineered=True) != "compiles":
        error, phrase = _expected_error(entry.expected(engineered=True))
        with pytest.raises(error, match=phrase):
            compile_and_check(entry, engineered=True)
        return
    check_onnx(compile_and_check(entry, engineered=True), tmp_path / "model.onnx", entry.exporter, entry.onnx_batch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [pytest.param(entry.name, marks=_marks(entry)) for entry in ZOO if entry.expected(engineered=True) == "compiles"],
)
def test_engineered_zoo_model_exports_with_the_default_exporter(name, tmp_path):
    """torch.export + onnx-simplifier: about 20 s a model here, so the default run mostly uses the TorchScript exporter."""
    entry = ZOO_BY_NAME[name]
    check_onnx(compile_and_check(entry, engineered=True), tmp_path / "model.onnx", "dynamo", entry.onnx_batch)


@pytest.mark.parametrize("name", _params())
def test_untouched_zoo_model_compiles_and_matches(name):
    entry = ZOO_BY_NAME[name]
    if entry.expected(engineered=False) != "compiles":
        error, phrase = _expected_error(entry.expected(engineered=False))
        with pytest.raises(error, match=phrase):
            compile_and_check(entry, engineered=False)
        return
    compile_and_check(entry, engineered=False)


def test_zoo_covers_the_families_the_issue_names():
    families = " ".join(entry.name for entry in ZOO)
    for family in (
        "resnet", "resnetv2", "regnet", "mobilenetv2", "mobilenetv3", "efficientnet", "ghostnet", "repvgg", "rexnet",
        "dla", "hrnet", "convnext", "vit", "deit", "swin", "levit", "mixer", "poolformer", "edgenext", "fastvit",
        "mobilevit", "vgg",
    ):
        assert family in families, family
    assert len(ZOO) >= 30
    assert len(ZOO_BY_NAME) == len(ZOO)


def _first_line(error: Exception) -> str:
    message = str(error).strip()
    return f"{type(error).__name__}: {message.splitlines()[0][:150] if message else ''}"


def _table_row(entry: ZooModel, engineered: bool, directory: Path) -> str:
    """PASS/FAIL and facts; engineered subjects are exported with the default exporter from batch 1, else batch 2."""
    expected = entry.expected(engineered)
    try:
        compiled = compile_and_check(entry, engineered)
    except Exception as error:  # the table reports every failure, whatever its type
        if expected != "compiles":
            kind, phrase = _expected_error(expected)
            if isinstance(error, kind) and re.search(phrase, str(error)):
                return f"PASS refused as the registry expects: {_first_line(error)}"
        return f"FAIL {_first_line(error)}"
    if expected != "compiles":
        return f"FAIL compiled, but the registry expects {expected}"
    facts = " ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in compiled.facts.items())
    if not engineered:
        return f"PASS {facts}"
    failures = []
    for batch in (1, 2):
        try:
            ort = check_onnx(compiled, directory / f"{entry.family}.onnx", "dynamo", batch)
            return f"PASS {facts} onnx=batch{batch} ort_max_rel={ort:.2g}" + (f" (batch 1: {failures[0]})" if failures else "")
        except Exception as error:  # as above
            failures.append(_first_line(error)[:100])
    return f"FAIL {facts} onnx: {failures[-1]} (batch 1: {failures[0]})"


def main(names: list[str]) -> int:
    """Print the pass/fail table: one line per model and variant, with the first line of any failure."""
    torch.set_num_threads(1)  # see one_thread
    with tempfile.TemporaryDirectory() as directory:
        rows = []
        for entry in [ZOO_BY_NAME[n] for n in names] if names else ZOO:
            for engineered in (True, False):
                started = time.perf_counter()
                row = _table_row(entry, engineered, Path(directory))
                variant = "engineered" if engineered else "untouched"
                print(f"{entry.name:32s} {variant:10s} {time.perf_counter() - started:6.1f}s {row}", flush=True)
                rows.append(row)
    return 0 if all(row.startswith("PASS") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
