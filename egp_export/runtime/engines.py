"""Verified TensorRT engine files: build in memory (tensorrt.py), check against ONNX Runtime, write.

Apart from tensorrt.py because the check runs the engine through the
inference backends (backends.py), which themselves build engines with
tensorrt.py: this module imports both, neither imports it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from egp_export.analysis.numerics import compare
from egp_export.errors import VerificationError
from egp_export.io.fileio import atomic_path, check_writable
from egp_export.runtime.backends import BACKENDS, OrtCpuBackend
from egp_export.runtime.inputs import BackendError
from egp_export.runtime.tensorrt import (
    DEFAULT_WORKSPACE_MB,
    RUNTIMES,
    TRT_FP16_RTOL,
    TRT_FP32_RTOL,
    VERIFY_SEED,
    build_serialized_engine,
)


@dataclass
class EngineResult:
    """What ``build_engine`` wrote and how far the engine is from ONNX Runtime."""

    path: Path
    module: str
    version: str
    fp16: str | None
    batch_range: tuple[int, int, int]
    dla_core: int | None
    workspace_mb: int
    timing_cache: Path | None
    size_bytes: int
    build_seconds: float
    error: object | None  # numerics.ErrorStats of the engine vs ONNX Runtime, None without verify
    rtol: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "module": self.module,
            "version": self.version,
            "fp16": self.fp16,
            "batch_range": list(self.batch_range),
            "dla_core": self.dla_core,
            "workspace_mb": self.workspace_mb,
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
            "size_bytes": self.size_bytes,
            "build_seconds": self.build_seconds,
            "error": None if self.error is None else self.error.to_dict(),
            "rtol": self.rtol,
            "notes": list(self.notes),
        }


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    *,
    fp16: bool = False,
    dla_core: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    input_shape: Sequence[int] | None = None,
    runtime: str = "tensorrt",
    tf32: bool = True,
    verify: bool = True,
    force: bool = False,
) -> EngineResult:
    """Build a TensorRT engine from ``onnx_path``, check it against ONNX Runtime, write it to ``out_path``.

    The batch range is ``min_batch ≤ opt_batch ≤ max_batch`` (opt defaults to
    min, max to opt); it becomes an optimisation profile when the ONNX batch
    dimension is dynamic. ``input_shape`` is the per-sample shape, needed only
    when non-batch dimensions are dynamic. ``runtime`` is ``"tensorrt"`` or
    ``"tensorrt-rtx"``. With ``verify`` the engine runs on seeded random inputs
    at the opt batch size against ONNX Runtime (CPU, fp32) and must be within
    ``TRT_FP16_RTOL`` / ``TRT_FP32_RTOL`` (module docstring).

    Raises OutputError (``out_path`` exists and not ``force``), BackendError
    (TensorRT missing, parser or builder failure, bad arguments) and
    VerificationError (engine outside the tolerance; nothing is written).
    """
    target = check_writable(out_path, force=force)
    module = RUNTIMES.get(runtime)
    if module is None:
        raise BackendError(f"unknown TensorRT runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}.")
    if module == "tensorrt_rtx" and dla_core is not None:
        raise BackendError("TensorRT for RTX has no DLA support; leave out --dla.")
    started = time.perf_counter()
    built = build_serialized_engine(
        onnx_path,
        module=module,
        fp16=fp16,
        dla_core=dla_core,
        workspace_mb=workspace_mb,
        timing_cache=timing_cache,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        input_shape=input_shape,
        tf32=tf32,
    )
    build_seconds = time.perf_counter() - started
    rtol = TRT_FP16_RTOL if fp16 else TRT_FP32_RTOL
    error = None
    if verify:
        with tempfile.TemporaryDirectory(prefix="egp-trt-") as folder:
            engine_file = Path(folder) / "candidate.engine"
            engine_file.write_bytes(built.data)
            error = verify_engine(
                onnx_path, engine_file, runtime=runtime, batch_size=built.batch_range[1], input_shape=input_shape
            )
        if not error.within(rtol):
            raise VerificationError(
                f"the TensorRT engine differs from ONNX Runtime: max_rel={error.max_rel:.3g} "
                f"(max_abs={error.max_abs:.3g}) > rtol={rtol:g}; no file was written. "
                + ("fp16 may be too coarse for this model; build without --fp16." if fp16 else "Try tf32=False.")
            )
    with atomic_path(target, force=force) as tmp:
        tmp.write_bytes(built.data)
    return EngineResult(
        path=target,
        module=built.module,
        version=built.version,
        fp16=built.fp16,
        batch_range=built.batch_range,
        dla_core=built.dla_core,
        workspace_mb=workspace_mb,
        timing_cache=built.timing_cache,
        size_bytes=len(built.data),
        build_seconds=round(build_seconds, 3),
        error=error,
        rtol=rtol,
        notes=built.notes,
    )


def verify_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    runtime: str = "tensorrt",
    batch_size: int = 1,
    input_shape: Sequence[int] | None = None,
    seed: int = VERIFY_SEED,
):
    """ErrorStats of a serialised engine against ONNX Runtime (CPU, fp32) on the same seeded inputs."""
    reference = OrtCpuBackend()
    reference.prepare(onnx_path, input_shape=input_shape, batch_sizes=(batch_size,))
    inputs = reference.input_spec.random_batch(batch_size, seed)
    engine = BACKENDS[runtime]()
    engine.prepare(engine_path, input_shape=input_shape, batch_sizes=(batch_size,))
    try:
        return compare(reference.run(inputs), engine.run(inputs))
    finally:
        engine.close()
        reference.close()
