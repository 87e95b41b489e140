"""egp-export: compile depth-reduced (entropy-guided pruned) PyTorch networks.

    result = egp_export.compile(model, calibration_batch)      # CompileResult(module, report, sites)
    egp_export.export_onnx(result.module, example, "model.onnx", verify_inputs=held_out)
    egp_export.analyze(model, calibration_batch)               # per-site activation statistics only
    egp_export.inspect_onnx("model.onnx")                      # each ONNX node's source modules and rewrites

The error types are imported eagerly (they are light); ``compile``,
``analyze``, ``export_onnx`` and the result types load torch, onnx and
onnxruntime on first use, so ``egp-export --help`` and ``import egp_export``
stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from egp_export.errors import (
    ArchitectureError,
    CalibrationError,
    CheckpointError,
    EgpExportError,
    ExportError,
    OptionError,
    OutputError,
    ReportError,
    TraceError,
    TrainingError,
    UnsupportedModelError,
    VerificationError,
)
from egp_export.version import __version__

# Public name -> the submodule that defines it, imported on first access.
_LAZY = {
    "compile": "compiler",
    "CompileResult": "compiler",
    "analyze": "analysis.plans",
    "export_onnx": "export.onnx",
    "ExportResult": "export.onnx",
    "inspect_onnx": "export.inspect",
    "padding_plan": "padding",
    "apply_padding_plan": "padding",
    "profile": "runtime.profiler",
    "build_engine": "runtime.engines",
    "recheck": "runtime.recheck",
    "RecheckResult": "runtime.recheck",
}

if TYPE_CHECKING:
    from egp_export.analysis.plans import analyze
    from egp_export.compiler import CompileResult, compile  # noqa: A004 - the issue's public name
    from egp_export.export.inspect import inspect_onnx
    from egp_export.export.onnx import ExportResult, export_onnx
    from egp_export.padding import apply_padding_plan, padding_plan
    from egp_export.runtime.engines import build_engine
    from egp_export.runtime.profiler import profile
    from egp_export.runtime.recheck import RecheckResult, recheck

__all__ = [
    "ArchitectureError",
    "CalibrationError",
    "CheckpointError",
    "CompileResult",
    "EgpExportError",
    "ExportError",
    "ExportResult",
    "OptionError",
    "OutputError",
    "RecheckResult",
    "ReportError",
    "TraceError",
    "TrainingError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "analyze",
    "apply_padding_plan",
    "build_engine",
    "compile",
    "export_onnx",
    "inspect_onnx",
    "padding_plan",
    "profile",
    "recheck",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
