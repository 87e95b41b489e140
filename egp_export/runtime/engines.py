"""Verified TensorRT engine files: build in memory (tensorrt.py), check against ONNX Runtime, write.

Apart from tensorrt.py because the check runs the engine through the
inference backends (backends.py), which themselves build engines with
tensorrt.py: this module imports both, neither imports it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from egp_export.analysis.numerics import ErrorAccumulator
from egp_export.errors import VerificationError
from egp_export.io.fileio import atomic_path, check_writable
from egp_export.runtime.backends import BACKENDS, OrtCpuBackend
from egp_export.runtime.inputs import (
    BackendError,
    InputOrigin,
    data_input_shape,
    feed_length,
    feed_slice,
    fitted_feed,
    random_origin,
)
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
    origin: InputOrigin | None = None  # what the check ran on (None without verify)

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
            "verified_on": None if self.origin is None else self.origin.to_dict(),
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
    dims: Mapping[str, int] | None = None,
    runtime: str = "tensorrt",
    tf32: bool = True,
    verify: bool = True,
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
    force: bool = False,
) -> EngineResult:
    """Build a TensorRT engine from ``onnx_path``, check it against ONNX Runtime, write it to ``out_path``.

    The batch range is ``min_batch ≤ opt_batch ≤ max_batch`` (opt defaults to
    min, max to opt); it becomes an optimisation profile when the ONNX batch
    dimension is dynamic. ``input_shape`` is the per-sample shape of a one-input
    model and ``dims`` the sizes of named dynamic dimensions (``{"seq": 128}``),
    needed only when non-batch dimensions are dynamic (``inputs`` size them
    otherwise); every input of a model with several is in the one optimisation
    profile, at those sizes. ``runtime`` is ``"tensorrt"`` or
    ``"tensorrt-rtx"``. With ``verify`` the engine runs against ONNX Runtime
    (CPU, fp32) on ``inputs`` (a user's batch, ``inputs_source`` naming it) in
    runs of the opt batch size, else on seeded random inputs at the opt batch
    size (``val_range``: runtime/inputs.py), and must be within
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
    if input_shape is None and inputs is not None:
        input_shape = data_input_shape(onnx_path, inputs, inputs_source)
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
        dims=dims,
    )
    build_seconds = time.perf_counter() - started
    rtol = TRT_FP16_RTOL if fp16 else TRT_FP32_RTOL
    error = origin = None
    if verify:
        with tempfile.TemporaryDirectory(prefix="egp-trt-") as folder:
            engine_file = Path(folder) / "candidate.engine"
            engine_file.write_bytes(built.data)
            error, origin = verify_engine(
                onnx_path,
                engine_file,
                runtime=runtime,
                batch_size=built.batch_range[1],
                smallest_batch=built.batch_range[0],
                input_shape=input_shape,
                dims=dims,
                inputs=inputs,
                inputs_source=inputs_source,
                val_range=val_range,
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
        origin=origin,
    )


def verify_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    runtime: str = "tensorrt",
    batch_size: int = 1,
    smallest_batch: int = 1,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
    seed: int = VERIFY_SEED,
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
):
    """(ErrorStats, InputOrigin) of a serialised engine against ONNX Runtime (CPU, fp32) on the same inputs.

    ``inputs`` run in batches of ``batch_size`` (a last, shorter batch only when it holds at least
    ``smallest_batch`` samples, the engine's smallest); without them, one seeded random batch. Every input of the
    model is fed by name (one device buffer and ``set_input_shape`` each: backends.TensorRTBackend).
    """
    if input_shape is None and inputs is not None:
        input_shape = data_input_shape(onnx_path, inputs, inputs_source)
    reference = OrtCpuBackend()
    reference.prepare(onnx_path, input_shape=input_shape, batch_sizes=(batch_size,), dims=dims)
    spec = reference.inputs
    if inputs is None:
        runs, origin = [spec.random_batch(batch_size, seed, val_range)], random_origin(spec, batch_size, val_range)
    else:
        data = fitted_feed(inputs, spec, inputs_source)
        length = feed_length(data)
        runs = [feed_slice(data, start, start + batch_size) for start in range(0, length, batch_size)]
        runs = [run for run in runs if feed_length(run) >= smallest_batch]
        if not runs:
            raise BackendError(
                f"{inputs_source} holds {length} samples, fewer than the engine's smallest batch {smallest_batch}."
            )
        origin = InputOrigin(inputs_source, True, sum(feed_length(run) for run in runs))
    engine = BACKENDS[runtime]()
    shapes = {s.name: s.sample_shape for s in spec.specs}  # an engine file's dynamic dimensions are unnamed
    engine.prepare(engine_path, input_shape=shapes, batch_sizes=tuple(sorted({feed_length(run) for run in runs})))
    try:
        errors = ErrorAccumulator()
        for run in runs:
            errors.add(reference.run(run), engine.run(run))
        return errors.result(), origin
    finally:
        engine.close()
        reference.close()
