"""Inference backends behind one interface: ``available()`` → ``prepare()`` → ``bind()`` → run or time.

=================  ==========================================  =============================================
name               runs                                        clock (one inference, synchronised)
=================  ==========================================  =============================================
ort-cpu            ONNX on ONNX Runtime's CPU provider         ``perf_counter_ns`` around ``session.run``
ort-cuda           ONNX on ONNX Runtime's CUDA provider        ``perf_counter_ns`` around a synchronous
                   (``onnxruntime-gpu``), I/O bound on device  ``run_with_iobinding``
torch-cuda         an ``nn.Module`` / fx module, eager, GPU    CUDA events on a non-default stream
torch-cuda-graph   the same, captured once per input shape     CUDA events on a non-default stream
                   and replayed (``torch.cuda.CUDAGraph``)
tensorrt           ONNX (engine built in memory) or a          CUDA events on a non-default stream
                   serialised engine file, TensorRT 10 / 11
tensorrt-rtx       the same with TensorRT for RTX              CUDA events on a non-default stream
                   (module ``tensorrt_rtx``)
=================  ==========================================  =============================================

The contract: ``prepare(model, input_shape=..., batch_sizes=..., dims=...)``
loads (or builds) what will run and sets ``inputs`` (the model's named inputs,
runtime/inputs.py); ``bind(inputs)`` stages one input batch (a feed: a dict
from input name to array; one array for a one-input model) where the
backend reads it (host or device memory, once) and returns a :class:`Bound`
whose call runs one inference and whose ``outputs()`` copies the last
results back; ``clock()`` returns how one call is timed. The profiler owns the
loops (warm-up, iterations, interleaved A/B rounds): a backend only says how to
run once and how to time once. Every GPU clock synchronises after each call,
so a timing is one inference's latency, never a pipelined throughput.

Thread count (ort-cpu): intra- and inter-op threads are fixed, by default to
1. A latency *ratio* measured on a shared 2-core CI runner is only
reproducible when neither model's run depends on how many cores happen to be
idle; with one thread both models do the same work in the same order on one
core, and the ratio is that of their operator costs. Pass ``threads=N`` to
measure the deployment setting of a dedicated machine.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from egp_export.runtime.inputs import (
    ENGINE_SUFFIXES,
    BackendError,
    DeclaredInput,
    InputSpec,
    ModelInputs,
    onnx_input_spec,  # noqa: F401  (re-exported: callers read a one-input model's spec from here)
    onnx_inputs,
    resolve_inputs,
)

DEFAULT_THREADS = 1
_KERNEL_TIME_SUFFIX = "_kernel_time"


# Clocks --------------------------------------------------------------------------


class Clock(ABC):
    """Times calls of a step, one by one; returns milliseconds per call."""

    source: ClassVar[str]

    @abstractmethod
    def measure(self, step: Callable[[], None], iterations: int) -> np.ndarray: ...


class HostClock(Clock):
    """``time.perf_counter_ns`` around each call: right when the call returns only after the work is done."""

    source = "perf_counter_ns"

    def measure(self, step: Callable[[], None], iterations: int) -> np.ndarray:
        timings = np.empty(iterations, dtype=np.float64)
        clock = time.perf_counter_ns
        for i in range(iterations):
            start = clock()
            step()
            timings[i] = clock() - start
        return timings / 1e6


class CudaEventClock(Clock):
    """CUDA events recorded on the backend's own (non-default) stream around each call.

    The step must enqueue its work on that stream. Waiting for the end event
    after every call makes each timing one inference's latency (including any
    host launch gaps the GPU sat through), not a pipelined throughput.
    """

    source = "cuda-events"

    def __init__(self, stream) -> None:
        self.stream = stream

    def measure(self, step: Callable[[], None], iterations: int) -> np.ndarray:
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        timings = np.empty(iterations, dtype=np.float64)
        for i in range(iterations):
            start.record(self.stream)
            step()
            end.record(self.stream)
            end.synchronize()
            timings[i] = start.elapsed_time(end)
        return timings


# The interface ---------------------------------------------------------------------


class Bound(ABC):
    """One input batch staged for one backend: call it to run an inference, ``outputs()`` to read the results."""

    @abstractmethod
    def __call__(self) -> None: ...

    @abstractmethod
    def outputs(self) -> list[np.ndarray]:
        """Outputs of the last call, on the host, in the model's output order."""


@dataclass(frozen=True)
class LayerTime:
    """Mean time per inference of one layer (an ONNX node, or a fused TensorRT layer)."""

    name: str
    kind: str  # op type where the backend reports it, else ""
    ms: float

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "ms": self.ms}


class Backend(ABC):
    """One way of running a model. Subclasses set ``name`` and ``accepts`` and implement the abstract methods."""

    name: ClassVar[str]
    accepts: ClassVar[str]  # "onnx" (an ONNX path; TensorRT also takes engine files) or "module" (an nn.Module)
    uses_threads: ClassVar[bool] = False  # takes threads= (host threads for the CPU work)

    inputs: ModelInputs

    @property
    def input_spec(self) -> InputSpec:
        """The input of a one-input model (``inputs`` holds every input of any model)."""
        self._require_prepared()
        if len(self.inputs.specs) != 1:
            raise BackendError(f"the model takes {len(self.inputs.specs)} inputs ({', '.join(self.inputs.names)}); "
                               "read backend.inputs.")
        return self.inputs.specs[0]

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, what will run) or (False, why not and what to install)."""

    @abstractmethod
    def prepare(
        self,
        model,
        *,
        input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
        batch_sizes: Sequence[int] = (1,),
        dims: Mapping[str, int] | None = None,
    ) -> None:
        """Load or build the model for the given batch sizes; sets ``inputs``.

        ``input_shape``: the per-sample shape of a one-input model, or a dict of them by input name; ``dims``: sizes
        of named dynamic dimensions (runtime/inputs.py: resolve_inputs).
        """

    @abstractmethod
    def bind(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> Bound:
        """Stage ``inputs`` (one batch: a feed, or one array for a one-input model) where the backend reads them, once."""

    def clock(self) -> Clock:
        return HostClock()

    def run(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs of one inference on ``inputs``, on the host."""
        bound = self.bind(inputs)
        bound()
        return bound.outputs()

    def layer_times(self, inputs: np.ndarray | Mapping[str, np.ndarray], iterations: int) -> list[LayerTime] | None:
        """Mean per-layer time over ``iterations`` inferences, slowest first; None where not offered."""
        return None

    def describe(self) -> dict:
        """Settings that change timings (recorded beside every measurement)."""
        return {"backend": self.name}

    @abstractmethod
    def close(self) -> None:
        """Release sessions, engines and device memory."""

    def _require_prepared(self) -> None:
        if not hasattr(self, "inputs"):
            raise BackendError(f"the {self.name} backend has no model: call prepare() first.")


def _onnx_path(model, backend: str) -> Path:
    if not isinstance(model, (str, os.PathLike)):
        raise BackendError(
            f"the {backend} backend runs ONNX files; got a {type(model).__name__}. Export it first "
            "(egp_export.export_onnx), or use the torch-cuda backend for PyTorch modules."
        )
    path = Path(model)
    if not path.is_file():
        raise BackendError(f"{path} does not exist; give the path of an ONNX file.")
    return path


def _check_batches(inputs: ModelInputs, batch_sizes: Sequence[int]) -> None:
    if not batch_sizes:
        raise BackendError("give at least one batch size.")
    for batch_size in batch_sizes:
        inputs.check_batch(int(batch_size))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ONNX Runtime ----------------------------------------------------------------------


class _OrtBound(Bound):
    def __init__(self, session, feed: dict) -> None:
        self._session = session
        self._feed = feed
        self._outputs: list[np.ndarray] = []

    def __call__(self) -> None:
        self._outputs = self._session.run(None, self._feed)

    def outputs(self) -> list[np.ndarray]:
        return [np.asarray(output) for output in self._outputs]


class OrtCpuBackend(Backend):
    """ONNX Runtime, CPU execution provider, fixed thread count, sequential execution."""

    name = "ort-cpu"
    accepts = "onnx"
    uses_threads = True
    providers: ClassVar[list] = ["CPUExecutionProvider"]

    def __init__(self, threads: int = DEFAULT_THREADS) -> None:
        if threads < 1:
            raise BackendError(f"threads must be at least 1, got {threads}.")
        self.threads = threads
        self.session = None

    @classmethod
    def available(cls) -> tuple[bool, str]:
        import onnxruntime

        return True, f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider"

    def prepare(self, model, *, input_shape=None, batch_sizes=(1,), dims=None) -> None:
        self.model_path = _onnx_path(model, self.name)
        self.inputs = onnx_inputs(self.model_path, input_shape, dims)
        _check_batches(self.inputs, batch_sizes)
        self.session = self._session()

    def _session_options(self, profile_prefix: str | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = self.threads
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return options

    def _session(self, profile_prefix: str | None = None):
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(
                str(self.model_path), sess_options=self._session_options(profile_prefix), providers=self.providers
            )
        except Exception as error:
            raise BackendError(f"ONNX Runtime cannot load {self.model_path}: {_first_line(error)}.") from error
        return session

    def bind(self, inputs) -> Bound:
        self._require_prepared()
        return _OrtBound(self.session, self.inputs.feed(inputs))

    def layer_times(self, inputs, iterations: int) -> list[LayerTime] | None:
        """ONNX Runtime's own profiler: a separate session with ``enable_profiling``, parsed per node.

        The first run (allocations, first-touch) is left out of the means.
        """
        self._require_prepared()
        with tempfile.TemporaryDirectory(prefix="egp-ort-profile-") as folder:
            session = self._session(profile_prefix=str(Path(folder) / "ort"))
            feed = self.inputs.feed(inputs)
            for _ in range(iterations + 1):
                session.run(None, feed)
            profile_file = session.end_profiling()
            events = json.loads(Path(profile_file).read_text(encoding="utf-8"))
        return parse_ort_profile(events, skip_runs=1)

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.threads, "execution": "sequential"}

    def close(self) -> None:
        self.session = None


def parse_ort_profile(events: list[dict], *, skip_runs: int = 0) -> list[LayerTime]:
    """Mean time per run of each node in an ONNX Runtime profile (the JSON of ``end_profiling()``).

    Node events are ``{"cat": "Node", "name": "<node>_kernel_time", "dur": µs,
    "args": {"op_name": ...}}``; each ``session.run`` is one ``model_run``
    Session event. Node events inside the first ``skip_runs`` runs are dropped.
    """
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) <= skip_runs:
        return []
    cutoff = runs[skip_runs]["ts"] if skip_runs else -np.inf
    counted = len(runs) - skip_runs
    totals: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_TIME_SUFFIX) or event.get("ts", 0) < cutoff:
            continue
        node = name[: -len(_KERNEL_TIME_SUFFIX)]
        totals[node] = totals.get(node, 0.0) + float(event.get("dur", 0.0)) / 1000.0
        kinds.setdefault(node, str((event.get("args") or {}).get("op_name", "")))
    layers = [LayerTime(name=node, kind=kinds[node], ms=total / counted) for node, total in totals.items()]
    return sorted(layers, key=lambda layer: layer.ms, reverse=True)


class _OrtIoBound(Bound):
    def __init__(self, session, binding) -> None:
        self._session = session
        self._binding = binding

    def __call__(self) -> None:
        # Run() synchronises the CUDA provider's stream before it returns (the
        # default run option), so the host clock times the whole inference.
        self._session.run_with_iobinding(self._binding)

    def outputs(self) -> list[np.ndarray]:
        return [np.asarray(output) for output in self._binding.copy_outputs_to_cpu()]


class OrtCudaBackend(OrtCpuBackend):
    """ONNX Runtime with the CUDA execution provider (``onnxruntime-gpu``); inputs and outputs live on the GPU.

    Per-layer times are not offered: ONNX Runtime's node timings on the CUDA
    provider measure kernel launches on the host, not GPU time.
    """

    name = "ort-cuda"
    providers: ClassVar[list] = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __init__(self, threads: int = DEFAULT_THREADS, device_id: int = 0) -> None:
        super().__init__(threads)
        self.device_id = device_id

    @classmethod
    def available(cls) -> tuple[bool, str]:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            return False, (
                f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (it offers "
                f"{', '.join(providers)}); install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA GPU"
            )
        return True, f"onnxruntime {onnxruntime.__version__}, CUDAExecutionProvider"

    def _session(self, profile_prefix: str | None = None):
        import onnxruntime

        try:
            session = onnxruntime.InferenceSession(
                str(self.model_path),
                sess_options=self._session_options(profile_prefix),
                providers=[("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"],
            )
        except Exception as error:
            raise BackendError(f"ONNX Runtime (CUDA) cannot load {self.model_path}: {_first_line(error)}.") from error
        if "CUDAExecutionProvider" not in session.get_providers():
            # ORT falls back to the CPU silently when the CUDA provider fails to initialise.
            raise BackendError(
                "ONNX Runtime fell back to the CPU: the CUDA provider did not initialise (check the CUDA and cuDNN "
                "versions onnxruntime-gpu was built for, and that a GPU is visible)."
            )
        return session

    def bind(self, inputs) -> Bound:
        import onnxruntime

        self._require_prepared()
        binding = self.session.io_binding()
        values = []
        for name, array in self.inputs.feed(inputs).items():  # one device buffer per named input
            value = onnxruntime.OrtValue.ortvalue_from_numpy(array, "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
            values.append(value)
        for output in self.session.get_outputs():
            binding.bind_output(output.name, "cuda", self.device_id)
        bound = _OrtIoBound(self.session, binding)
        bound._inputs = values  # keeps the device buffers alive as long as the binding
        return bound

    def layer_times(self, inputs, iterations: int) -> list[LayerTime] | None:
        return None

    def describe(self) -> dict:
        return {"backend": self.name, "threads": self.threads, "device_id": self.device_id}


# PyTorch on CUDA ---------------------------------------------------------------------


def _cuda_unavailable_reason() -> str | None:
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, {build}): no NVIDIA GPU or driver here"
    return None


class _TorchBound(Bound):
    def __init__(self, run: Callable[[], object], stream) -> None:
        self._run = run
        self._stream = stream
        self._last = None

    def __call__(self) -> None:
        self._last = self._run()

    def outputs(self) -> list[np.ndarray]:
        from egp_export.analysis.numerics import flatten_outputs

        self._stream.synchronize()
        return [leaf.detach().float().cpu().numpy() for leaf in flatten_outputs(self._last)]


class TorchCudaBackend(Backend):
    """A PyTorch module (e.g. the compiled fx GraphModule) on the GPU, run eagerly on its own stream.

    One input, of the module's parameter dtype: ``input_shape`` is its per-sample shape (a module with several
    inputs runs on the ONNX backends, which read each input's name and dtype from the file).
    """

    name = "torch-cuda"
    accepts = "module"
    cuda_graph: ClassVar[bool] = False
    # Eager runs before a CUDA-graph capture: cuDNN/cuBLAS pick algorithms and allocate workspaces.
    capture_warmup: ClassVar[int] = 3

    def __init__(self, device: int = 0) -> None:
        self.device_index = device

    @classmethod
    def available(cls) -> tuple[bool, str]:
        reason = _cuda_unavailable_reason()
        if reason is not None:
            return False, reason
        import torch

        return True, f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}"

    def prepare(self, model, *, input_shape=None, batch_sizes=(1,), dims=None) -> None:
        import torch
        from torch import nn

        if not isinstance(model, nn.Module):
            raise BackendError(
                f"the {self.name} backend runs PyTorch modules (nn.Module, fx.GraphModule); got {type(model).__name__}. "
                "For ONNX files use ort-cuda or tensorrt."
            )
        if input_shape is None or isinstance(input_shape, Mapping):
            raise BackendError(f"the {self.name} backend runs one-input modules and needs the per-sample input shape "
                               "(input_shape=, a sequence of sizes).")
        reason = _cuda_unavailable_reason()
        if reason is not None:
            raise BackendError(f"{self.name} is not available: {reason}.")
        self.device = torch.device("cuda", self.device_index)
        self.module = copy.deepcopy(model).eval().to(self.device)
        parameter = next(self.module.parameters(), None)
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        spec = InputSpec("input", tuple(int(s) for s in input_shape), np.dtype(str(dtype).replace("torch.", "")))
        self.inputs = ModelInputs((spec,))
        _check_batches(self.inputs, batch_sizes)
        self.stream = torch.cuda.Stream(self.device)

    def bind(self, inputs) -> Bound:
        import torch

        self._require_prepared()
        (array,) = self.inputs.feed(inputs).values()
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(array).to(self.device)
        self.stream.synchronize()
        if not self.cuda_graph:

            def run():
                with torch.cuda.stream(self.stream), torch.no_grad():
                    return self.module(x)

            return _TorchBound(run, self.stream)
        return self._capture(x)

    def _capture(self, x) -> Bound:
        """Capture one CUDA graph for this input (static shape and address) and replay it per call."""
        import torch

        with torch.no_grad():
            warm = torch.cuda.Stream(self.device)
            warm.wait_stream(self.stream)
            with torch.cuda.stream(warm):
                for _ in range(self.capture_warmup):
                    self.module(x)
            self.stream.wait_stream(warm)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                static_output = self.module(x)
        self.stream.synchronize()

        def replay():
            with torch.cuda.stream(self.stream):
                graph.replay()
            return static_output

        bound = _TorchBound(replay, self.stream)
        bound._keep = (graph, x)  # the graph reads x's memory: both live as long as the binding
        return bound

    def clock(self) -> Clock:
        return CudaEventClock(self.stream)

    def describe(self) -> dict:
        import torch

        return {
            "backend": self.name,
            "device": torch.cuda.get_device_name(self.device_index),
            "cuda_graph": self.cuda_graph,
            "torch": torch.__version__,
        }

    def close(self) -> None:
        self.module = None


class TorchCudaGraphBackend(TorchCudaBackend):
    """The same module, captured as a CUDA graph per input shape and replayed: no per-op launch cost."""

    name = "torch-cuda-graph"
    cuda_graph = True


# TensorRT ------------------------------------------------------------------------------


class _TensorRTBound(Bound):
    def __init__(self, context, stream, outputs: list, keep: list) -> None:
        self._context = context
        self._stream = stream
        self._outputs = outputs
        self._keep = keep  # device buffers whose addresses the context holds

    def __call__(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise BackendError("TensorRT's execute_async_v3 failed; see TensorRT's log above.")

    def outputs(self) -> list[np.ndarray]:
        self._stream.synchronize()
        return [tensor.float().cpu().numpy() for tensor in self._outputs]


class TensorRTBackend(Backend):
    """TensorRT: an engine built in memory from an ONNX file (or read from a serialised engine file).

    Buffers are torch CUDA tensors whose addresses are given to the execution
    context (``set_tensor_address``); inference is ``execute_async_v3`` on a
    non-default torch stream. One execution context per bound batch, so bound
    batches of different shapes never disturb each other. Build options
    (``fp16``, ``workspace_mb``, ``timing_cache``) are those of
    :func:`egp_export.runtime.engines.build_engine`. From an ONNX file one
    engine is built per batch size given to ``prepare`` (each tuned for its
    batch size); an engine file serves whatever its optimisation profile allows.
    """

    name = "tensorrt"
    accepts = "onnx"
    module_name: ClassVar[str] = "tensorrt"

    def __init__(self, *, fp16: bool = False, workspace_mb: int | None = None, timing_cache: str | Path | None = None) -> None:
        self.fp16 = fp16
        self.workspace_mb = workspace_mb
        self.timing_cache = timing_cache
        self.engines: dict = {}

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from egp_export.runtime.tensorrt import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason(cls.module_name)
        if reason is None:
            reason = _cuda_unavailable_reason()
        if reason is not None:
            return False, reason
        trt = importlib.import_module(cls.module_name)
        return True, f"{cls.module_name} {trt.__version__}"

    def prepare(self, model, *, input_shape=None, batch_sizes=(1,), dims=None) -> None:
        import torch

        from egp_export.runtime.tensorrt import DEFAULT_WORKSPACE_MB, build_serialized_engine, import_tensorrt, shared_logger

        ok, reason = self.available()
        if not ok:
            raise BackendError(f"{self.name} is not available: {reason}.")
        self.trt = import_tensorrt(self.module_name)
        self.runtime = self.trt.Runtime(shared_logger(self.trt))
        path = _onnx_path(model, self.name)
        batches = sorted({int(b) for b in batch_sizes})
        if path.suffix.lower() in ENGINE_SUFFIXES:
            # A serialised engine serves every batch size its optimisation profile allows.
            self.engines = {None: self._deserialize(path.read_bytes(), path)}
            engine = self.engines[None]
            declared = [
                DeclaredInput(
                    name,
                    tuple(int(d) if int(d) >= 0 else None for d in engine.get_tensor_shape(name)),  # -1: dynamic
                    torch.empty(0, dtype=self._torch_dtype(engine.get_tensor_dtype(name))).numpy().dtype,
                )
                for name in self._io_names(engine)[0]
            ]
            self.inputs = resolve_inputs(declared, str(path), input_shape, dims)
        else:
            # From ONNX: one engine per batch size (min = opt = max), so that every batch size is timed with the
            # kernels TensorRT picked for it, as a deployment engine for that batch size would be.
            self.inputs = onnx_inputs(path, input_shape, dims)
            _check_batches(self.inputs, batches)
            self.engines = {}
            for batch in batches:
                built = build_serialized_engine(
                    path,
                    module=self.module_name,
                    fp16=self.fp16,
                    workspace_mb=self.workspace_mb or DEFAULT_WORKSPACE_MB,
                    timing_cache=self.timing_cache,
                    min_batch=batch,
                    opt_batch=batch,
                    max_batch=batch,
                    input_shape=input_shape,
                    dims=dims,
                )
                self.engines[batch] = self._deserialize(built.data, path)
        _check_batches(self.inputs, batches)
        self.stream = torch.cuda.Stream()

    def _deserialize(self, data: bytes, path: Path):
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(
                f"{self.module_name} cannot deserialize the engine from {path}: engines are tied to the TensorRT "
                "version and GPU they were built with; rebuild it here (egp-export engine)."
            )
        return engine

    def _io_names(self, engine) -> tuple[list[str], list[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
        return inputs, outputs

    def _engine_for(self, batch_size: int):
        engine = self.engines.get(batch_size, self.engines.get(None))
        if engine is None:
            raise BackendError(f"batch size {batch_size} was not among the batch sizes prepared ({sorted(self.engines)}).")
        return engine

    def _torch_dtype(self, trt_dtype):
        import torch

        table = {
            "FLOAT": torch.float32,
            "HALF": torch.float16,
            "BF16": torch.bfloat16,
            "INT8": torch.int8,
            "UINT8": torch.uint8,
            "INT32": torch.int32,
            "INT64": torch.int64,
            "BOOL": torch.bool,
        }
        for attribute, torch_dtype in table.items():
            if getattr(self.trt.DataType, attribute, None) == trt_dtype:
                return torch_dtype
        raise BackendError(f"the engine uses tensor type {trt_dtype}, which egp-export cannot bind.")

    def _context(self, inputs):
        import torch

        feed = self.inputs.feed(inputs)
        engine = self._engine_for(len(next(iter(feed.values()))))
        input_names, output_names = self._io_names(engine)
        if sorted(input_names) != sorted(feed):
            raise BackendError(f"the engine's inputs are {', '.join(input_names)}; the feed holds {', '.join(feed)}.")
        context = engine.create_execution_context()
        if context is None:
            raise BackendError("TensorRT cannot create an execution context (out of GPU memory?).")
        staged = []
        for name in input_names:  # every input: its shape in the profile, its device buffer's address
            with torch.cuda.stream(self.stream):
                x = torch.from_numpy(feed[name]).cuda().to(self._torch_dtype(engine.get_tensor_dtype(name)))
            if not context.set_input_shape(name, tuple(x.shape)):
                raise BackendError(
                    f"input {name!r} of shape {tuple(x.shape)} is outside the engine's optimisation profile; rebuild "
                    "the engine with a batch range (--min-batch/--max-batch) and dimension sizes that cover it."
                )
            context.set_tensor_address(name, x.data_ptr())
            staged.append(x)
        outputs = []
        for output in output_names:
            shape = tuple(int(d) for d in context.get_tensor_shape(output))
            tensor = torch.empty(shape, dtype=self._torch_dtype(engine.get_tensor_dtype(output)), device="cuda")
            context.set_tensor_address(output, tensor.data_ptr())
            outputs.append(tensor)
        self.stream.synchronize()
        return context, outputs, [*staged, *outputs]

    def bind(self, inputs) -> Bound:
        self._require_prepared()
        context, outputs, keep = self._context(inputs)
        return _TensorRTBound(context, self.stream, outputs, keep)

    def clock(self) -> Clock:
        return CudaEventClock(self.stream)

    def layer_times(self, inputs, iterations: int) -> list[LayerTime] | None:
        """TensorRT's IProfiler on a separate execution context; engines built here use DETAILED verbosity."""
        self._require_prepared()
        trt = self.trt

        class Recorder(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)
                self.totals: dict[str, float] = {}

            def report_layer_time(self, layer_name, ms):
                self.totals[layer_name] = self.totals.get(layer_name, 0.0) + ms

        context, outputs, keep = self._context(inputs)
        bound = _TensorRTBound(context, self.stream, outputs, keep)
        bound()  # first run unprofiled: lazy allocations
        self.stream.synchronize()
        recorder = Recorder()
        context.profiler = recorder
        for _ in range(iterations):
            bound()
            self.stream.synchronize()  # the profiler reports once the enqueued work is complete
        layers = [LayerTime(name=name, kind="", ms=total / iterations) for name, total in recorder.totals.items()]
        return sorted(layers, key=lambda layer: layer.ms, reverse=True)

    def describe(self) -> dict:
        import torch

        return {
            "backend": self.name,
            "module": self.module_name,
            "version": getattr(self.trt, "__version__", "?") if hasattr(self, "trt") else None,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "fp16": self.fp16,
        }

    def close(self) -> None:
        self.engines = {}


class TensorRTRtxBackend(TensorRTBackend):
    """TensorRT for RTX (PyPI ``tensorrt-rtx-cu13``, module ``tensorrt_rtx``).

    Its Python API mirrors TensorRT's (Logger, Builder, OnnxParser,
    build_serialized_network, Runtime, execute_async_v3, IProfiler), with
    strongly typed networks only (no FP16 builder flag: fp16 goes into the ONNX
    graph) and no DLA. Engines compile ahead of time for a GPU family and
    finish just in time on first use, so the profiler's warm-up matters more
    here. Not exercised in this repository's CI (no GPU there).
    """

    name = "tensorrt-rtx"
    module_name = "tensorrt_rtx"


# Registry ------------------------------------------------------------------------------

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls
    for cls in (OrtCpuBackend, OrtCudaBackend, TorchCudaBackend, TorchCudaGraphBackend, TensorRTBackend, TensorRTRtxBackend)
}
DEFAULT_BACKEND = OrtCpuBackend.name


def backend_availability() -> dict[str, tuple[bool, str]]:
    """Every registered backend: (available here, what runs or why not)."""
    return {name: cls.available() for name, cls in BACKENDS.items()}


def available_backends() -> list[str]:
    """Names of the backends that can run here, in registry order."""
    return [name for name, (ok, _) in backend_availability().items() if ok]


def get_backend(name: str, *, threads: int = DEFAULT_THREADS, **options) -> Backend:
    """A new, unprepared backend by name; ``threads`` goes to the backends that use host threads.

    Raises BackendError for an unknown name, or one that cannot run here (with the reason).
    """
    cls = BACKENDS.get(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    ok, reason = cls.available()
    if not ok:
        raise BackendError(f"the {name} backend is not available here: {reason}.")
    if cls.uses_threads:
        options["threads"] = threads
    return cls(**options)
