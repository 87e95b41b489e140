"""TensorRT engines from ONNX files, built in memory (``build_serialized_engine``).

With engines.py (``build_engine``, which also checks and writes) the steps
are: refuse an existing output → import TensorRT (a clear BackendError where
it is not installed) → fp16 in the ONNX graph where the TensorRT has no FP16
builder flag → parse with ``OnnxParser.parse_from_file``
(external weights resolve beside the file) → explicit-batch network, one
optimisation profile over the batch range, workspace limit, timing cache, DLA
core → ``build_serialized_network`` → run the engine and ONNX Runtime (CPU,
fp32) on the same seeded inputs → atomic write. A failed step leaves no file.

TensorRT 10 vs 11 (and TensorRT for RTX)
----------------------------------------
- Networks: explicit batch is the only mode since TensorRT 10
  (``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is deprecated there), so
  networks are created with no flags. TensorRT 11 and TensorRT-RTX networks
  are always strongly typed: tensor types come from the ONNX graph.
- fp16: TensorRT 11 removed ``BuilderFlag.FP16`` (and INT8/BF16/FP8). Where
  the flag exists (10.x) it is set on the fp32 graph and TensorRT picks fp16
  kernels where they are faster; where it does not, :func:`convert_to_fp16`
  rewrites the graph (fp16 weights and compute, fp32 inputs and outputs) and
  the strongly typed build follows it.
- DLA (Jetson): ``default_device_type = DeviceType.DLA``, ``DLA_core = n``,
  ``BuilderFlag.GPU_FALLBACK`` for layers DLA cannot run. DLA computes in fp16
  or int8 only, hence ``dla_core`` requires ``fp16=True``. TensorRT 10.7 was
  the last 10.x with DLA; 11.x has it again on JetPack 7.2.2+ only.
- TensorRT-RTX (module ``tensorrt_rtx``) has the same Python API for all of
  the above except DLA.

Tolerances (engine vs ONNX Runtime CPU fp32, relative to the output scale)
-------------------------------------------------------------------------
- fp32 engines: ``TRT_FP32_RTOL = 1e-3``. TensorRT enables TF32 tensor-core
  kernels by default on Ampere and newer GPUs (10-bit mantissa, unit
  roundoff 4.9e-4 per product); sums over long reductions and many layers
  stay well inside 1e-3 of the output scale for BN-normalised networks. Pass
  ``tf32=False`` to build without TF32 and hold the engine to the same 1e-3.
- fp16 engines: ``TRT_FP16_RTOL = 1e-2``: fp16 weights and activations
  (same 4.9e-4 roundoff, but on every intermediate tensor, and weights below
  6e-8 flush to zero).
"""

from __future__ import annotations

import importlib
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from egp_export.io.fileio import atomic_path
from egp_export.runtime.inputs import ENGINE_SUFFIXES, BackendError, onnx_inputs

DEFAULT_WORKSPACE_MB = 1024  # enough for conv nets up to batch 64 at 224x224; raise it for larger
TRT_FP32_RTOL = 1e-3
TRT_FP16_RTOL = 1e-2
# Samples the finished engine is checked on (seeded standard-normal inputs at the opt batch size).
VERIFY_SEED = 1234
RUNTIMES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
_INSTALL_HINTS = {
    "tensorrt": "TensorRT is not installed (pip install 'egp-export[tensorrt]' with NVIDIA's package index as an "
    "extra index, on a machine with an NVIDIA GPU; PyPI's own tensorrt packages only fetch from that index)",
    "tensorrt_rtx": "TensorRT for RTX is not installed (pip install tensorrt-rtx-cu13 on a machine with an NVIDIA RTX GPU)",
}
FP16_MAX = 65504.0
# Inputs that ONNX requires to stay float32 whatever the compute type (Resize's roi and scales).
_KEEP_FLOAT32_INPUTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}


def tensorrt_unavailable_reason(module: str = "tensorrt") -> str | None:
    """None when ``module`` imports, else why not and how to install it."""
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"{_INSTALL_HINTS.get(module, module + ' is not installed')}; import {module}: {error}"
    return None


def import_tensorrt(module: str = "tensorrt"):
    """The TensorRT module, or a BackendError that says how to install it."""
    reason = tensorrt_unavailable_reason(module)
    if reason is not None:
        raise BackendError(f"{reason}. Everything else in egp-export works without it (default backend: ort-cpu).")
    return importlib.import_module(module)


@dataclass
class SerializedEngine:
    """A built engine in memory and how it was built."""

    data: bytes
    module: str
    version: str
    fp16: str | None  # "builder-flag" (TensorRT 10), "onnx-graph" (TensorRT 11 / RTX) or None
    batch_range: tuple[int, int, int]  # min, opt, max
    dla_core: int | None
    tf32: bool
    notes: list[str] = field(default_factory=list)  # timing-cache notes, then TensorRT warnings
    timing_cache: Path | None = None  # the cache file read and written back, None when none was used


# fp16 in the graph -------------------------------------------------------------------


def convert_to_fp16(model):
    """An fp16 copy of an fp32 ONNX model with fp32 inputs and outputs (what TensorRT 11 builds in fp16).

    float32 initializers and Constant / ConstantOfShape values become float16
    (except Resize's roi/scales, which ONNX requires in float32); ``Cast(to=FLOAT)``
    becomes ``Cast(to=FLOAT16)``; every float32 graph input gets a Cast to
    float16 after it and every float32 output a Cast back before it. Raises
    BackendError for weights beyond fp16's range (±65504) and for control-flow
    subgraphs, which this converter does not walk. The input is not modified.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    for node in graph.node:
        if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attribute in node.attribute):
            raise BackendError(
                f"node {node.name or node.op_type} has a control-flow subgraph; convert the model to fp16 with "
                "NVIDIA ModelOpt AutoCast (python -m modelopt.onnx.autocast) instead."
            )
    keep_float32 = {
        node.input[i] for node in graph.node for (op, i) in _KEEP_FLOAT32_INPUTS if node.op_type == op and len(node.input) > i
    }

    def to_half(tensor: onnx.TensorProto, what: str) -> onnx.TensorProto:
        values = numpy_helper.to_array(tensor)
        finite = values[np.isfinite(values)]
        if finite.size and float(np.abs(finite).max()) > FP16_MAX:
            raise BackendError(
                f"{what} holds values up to {float(np.abs(finite).max()):.3g}, beyond fp16's range (±{FP16_MAX:g}); "
                "this model cannot run in fp16 as it is."
            )
        return numpy_helper.from_array(values.astype(np.float16), tensor.name)

    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.FLOAT and initializer.name not in keep_float32:
            graph.initializer[index].CopyFrom(to_half(initializer, f"initializer {initializer.name!r}"))
    for node in graph.node:
        if node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == TensorProto.FLOAT and node.output[0] not in keep_float32:
                    attribute.i = TensorProto.FLOAT16
        if node.op_type in ("Constant", "ConstantOfShape") and node.output[0] not in keep_float32:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(to_half(attribute.t, f"constant {node.output[0]!r}"))

    casts_in, casts_out = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{value.name}__fp16"
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == value.name:
                    node.input[i] = half
        casts_in.append(helper.make_node("Cast", [value.name], [half], name=f"{value.name}__to_fp16", to=TensorProto.FLOAT16))
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{value.name}__fp16"
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == value.name:
                    node.output[i] = half
            for i, name in enumerate(node.input):  # an output also read inside the graph
                if name == value.name:
                    node.input[i] = half
        casts_out.append(helper.make_node("Cast", [half], [value.name], name=f"{value.name}__to_fp32", to=TensorProto.FLOAT))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # intermediate types changed; shape inference recomputes them
    try:
        converted = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
        onnx.checker.check_model(converted)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BackendError(
            f"the fp16 graph is not type-consistent ({first}); convert it with NVIDIA ModelOpt AutoCast "
            "(python -m modelopt.onnx.autocast) instead."
        ) from error
    return converted


# Building ------------------------------------------------------------------------------


_LOGGERS: dict[str, object] = {}


def shared_logger(trt):
    """The one logger per TensorRT module, shared by builders and runtimes (TensorRT keeps the first it sees).

    It prints errors to stderr as they come and keeps errors and warnings so
    that exceptions and results can quote them (``clear()`` before a build).
    """
    name = trt.__name__
    if name not in _LOGGERS:

        class RecordingLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []
                self.warnings: list[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(str(msg))
                    print(f"{name}: error: {msg}", file=sys.stderr)
                elif severity == trt.ILogger.Severity.WARNING:
                    self.warnings.append(str(msg))

            def clear(self) -> None:
                self.errors.clear()
                self.warnings.clear()

        _LOGGERS[name] = RecordingLogger()
    return _LOGGERS[name]


def _batch_range(min_batch: int, opt_batch: int | None, max_batch: int | None) -> tuple[int, int, int]:
    opt = min_batch if opt_batch is None else opt_batch
    high = max(opt, min_batch) if max_batch is None else max_batch
    if not 1 <= min_batch <= opt <= high:
        raise BackendError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt}, {high}.")
    return min_batch, opt, high


def build_serialized_engine(
    onnx_path: str | Path,
    *,
    module: str = "tensorrt",
    fp16: bool = False,
    dla_core: int | None = None,
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    timing_cache: str | Path | None = None,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    tf32: bool = True,
    dims: Mapping[str, int] | None = None,
) -> SerializedEngine:
    """Build a TensorRT engine from an ONNX file in memory (see :func:`build_engine` for the arguments).

    One optimisation profile covers every input with a dynamic dimension: each input's batch range, its other
    dimensions at the sizes ``input_shape`` / ``dims`` give them (runtime/inputs.py: resolve_inputs).

    A ``timing_cache`` file is read when it exists and written back (updated) after a successful build.
    """
    import onnx

    trt = import_tensorrt(module)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BackendError(f"{onnx_path} does not exist; give the path of an ONNX file.")
    if onnx_path.suffix.lower() in ENGINE_SUFFIXES:
        raise BackendError(f"{onnx_path} is already an engine; engines are built from ONNX files.")
    if workspace_mb < 1:
        raise BackendError(f"the workspace must be at least 1 MB, got {workspace_mb}.")
    batches = _batch_range(min_batch, opt_batch, max_batch)
    model_inputs = onnx_inputs(onnx_path, input_shape, dims)  # validates the inputs before TensorRT sees them
    if dla_core is not None and not fp16:
        raise BackendError("DLA computes in fp16 or int8 only: pass --fp16 (fp16=True) with --dla.")
    fp16_flag = getattr(trt.BuilderFlag, "FP16", None)
    fp16_mode = None if not fp16 else ("builder-flag" if fp16_flag is not None else "onnx-graph")

    logger = shared_logger(trt)
    logger.clear()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode (TensorRT >= 10)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="egp-trt-") as folder:
        source = onnx_path
        if fp16_mode == "onnx-graph":
            source = Path(folder) / "model_fp16.onnx"
            onnx.save(convert_to_fp16(onnx.load(str(onnx_path))), str(source))
        if not parser.parse_from_file(str(source)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BackendError(
                f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors) or 'no detail given'}. "
                "Try another opset (export_onnx(opset=...)) or check the op against TensorRT's ONNX operator support."
            )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # IProfiler and inspector see layer names
    if fp16_mode == "builder-flag":
        config.set_flag(fp16_flag)
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if not tf32 and tf32_flag is not None:
        config.clear_flag(tf32_flag)
    if dla_core is not None:
        available = getattr(builder, "num_DLA_cores", 0)
        if not 0 <= dla_core < available:
            raise BackendError(f"DLA core {dla_core} requested, but this device has {available} DLA cores.")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    profile = None
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if all(int(d) >= 0 for d in tensor.shape):
            continue  # static input: the profile need not name it
        spec = model_inputs.spec(tensor.name)
        profile = profile or builder.create_optimization_profile()
        # min, opt, max; an input whose batch is fixed keeps it (only its other dimensions were dynamic)
        shapes = (tuple([spec.fixed_batch or batch, *spec.sample_shape]) for batch in batches)
        profile.set_shape(tensor.name, *shapes)
    if profile is not None:
        config.add_optimization_profile(profile)

    cache_notes: list[str] = []
    cache_path = _attach_timing_cache(config, module, None if timing_cache is None else Path(timing_cache), cache_notes)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path}: {'; '.join(logger.errors) or 'see its log'}.")
    if cache_path is not None:
        updated = config.get_timing_cache()
        if updated is None:
            cache_notes.append(f"TensorRT returned no timing cache after the build; {cache_path} was left as it was")
            cache_path = None
        else:
            with atomic_path(cache_path, force=True) as tmp:  # a cache is meant to be updated in place
                tmp.write_bytes(bytes(memoryview(updated.serialize())))
    return SerializedEngine(
        data=bytes(memoryview(serialized)),
        module=module,
        version=str(getattr(trt, "__version__", "?")),
        fp16=fp16_mode,
        batch_range=batches,
        dla_core=dla_core,
        tf32=tf32 and tf32_flag is not None,
        notes=cache_notes + list(logger.warnings),
        timing_cache=cache_path,
    )


def _attach_timing_cache(config, module: str, cache_path: Path | None, notes: list[str]) -> Path | None:
    """Give the builder a timing cache (the file's, else a fresh one); the path to write back, or None.

    ``set_timing_cache`` returns False for a cache written by another TensorRT
    version or GPU (with ``ignore_mismatch=False``); the config then holds no
    cache and ``get_timing_cache()`` returns None after the build, so a fresh
    cache replaces it. TensorRT for RTX does not time kernels at build time:
    its timing cache is a no-op, and a file is neither read nor written.
    """
    if module == "tensorrt_rtx":
        if cache_path is not None:
            notes.append(f"timing cache {cache_path} not used: TensorRT for RTX has no build-time kernel timing")
        return None
    data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    if config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False):
        return cache_path
    if data:
        notes.append(f"timing cache {cache_path} is from another TensorRT version or GPU; a fresh one replaces it")
        if config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            return cache_path
    notes.append("TensorRT refused an empty timing cache; the engine was built without one")
    return None
