"""Export a PyTorch module to one verified, self-contained ONNX file.

``export_onnx`` runs: refuse an existing output (before any work) → refuse a
module in training mode → torch.onnx export to an in-memory ModelProto →
onnx-simplifier (kept only when its own check passes) → ``onnx.checker`` (full
check) → ONNX Runtime CPU against the PyTorch module on the verify inputs →
atomic write. A model that fails any step leaves no file behind.

Attempts and fallbacks
----------------------
``exporter="auto"`` (the default) tries the dynamo exporter, then TorchScript;
``static_batch=True`` allows both again with the batch size fixed to the
example's when no dynamic-batch export verifies. Every attempt is verified the
same way; the result names the exporter used and why the earlier attempts
failed (``ExportResult.failed_attempts``, shown in the report).

A requested ``opset`` is the default-domain opset of the file written, or
the attempt fails: dynamo writes 18 (its oldest) when asked for 7-17 unless
torch's own conversion succeeds (``opset=13`` on a Conv+ReLU model: 18), so
an attempt whose model imports another opset is converted with
``onnx.version_converter`` (route in ``opset_converted_from`` and ``why()``)
and fails when that cannot convert (no adapter from Relu-14 to 13); with
"auto" TorchScript is next, which wrote 7, 13, 17 and 21 itself (torch
2.14.1, probe: ``export_onnx(..., opset=N, exporter=...)`` on a
Conv+ReLU+Linear model; it refuses 26).

The batch dimension of a dynamic export does not depend on the example: an
example of batch 1 is repeated to batch 2 before tracing, because torch.export
specializes a size-1 dimension (torchvision ConvNeXt, Swin and ViT, timm
convnext/edgenext/levit, channels-last and circular-padding models fail with
"Invalid ranges [2:1]" or a batch fixed to 1 from a batch-1 example, and
export from a batch-2 one; torch 2.14.1). The file is then verified on every
verify sample alone (batch 1) and batched, at a batch of two or more other
than the traced one (``_plan``), each output on its own scale
(numerics.compare). A branch traced per batch (``if x.mean() > 0:``) differs
only on the samples that take the other branch alone.

Warnings of traced control flow (torch.jit ``TracerWarning``, TRACE_WARNINGS)
fail an attempt verified on the example alone (no ``verify_inputs``): nothing
else could show the branch it baked in. With verify inputs the file passed on
all of them; the warnings are kept in ``ExportResult.warnings`` for the caller
to show.

Torch's internal loggers, warnings and prints are kept off the console during
the export (dynamo prints ~150 lines of guard tracebacks before failing on
ConvNeXt): they go to ``log_path`` when the export fails, warnings also into
``ExportResult.notes``; ``show_logs=True`` leaves them on the console.

Exporter order
--------------
Measured with ``python tools/bench_exporters.py`` (torch 2.14.1, onnxscript
0.7.2, onnx 1.23.2, onnxsim 0.8.1, onnxruntime 1.32.0; 2 CPU cores shared
with other jobs, load average ~10, so absolute times are about twice a quiet
machine's; example batch 2x3x32x32, verified on a batch of 5, export seconds
the median of 3 after a warm-up export per exporter):

=====================  ===========  ========  ======================  ===========
model                  exporter     export s  ops exported -> written  ORT max_rel
=====================  ===========  ========  ======================  ===========
resnet18               dynamo           7.05  49 -> 48                 1.0e-06
resnet18               torchscript      1.81  65 -> 49                 1.0e-06
mobilenet_v2           dynamo          20.89  100 -> 99                8.6e-07
mobilenet_v2           torchscript      2.75  209 -> 102               8.6e-07
ViT 32px, 2 layers     dynamo           9.01  105 -> 87                7.1e-07
ViT 32px, 2 layers     torchscript      0.74  374 -> 95                7.1e-07
resnet18, fx-traced    dynamo           8.14  49 -> 48                 1.0e-06
resnet18, fx-traced    torchscript      2.23  65 -> 49                 1.0e-06
=====================  ===========  ========  ======================  ===========

Both give the same ONNX Runtime error; TorchScript exports 4-12x faster. They
differ in how they fail:

- Data-dependent Python control flow: dynamo refuses (ExportError); TorchScript
  traces the branch the example takes and writes a wrong model that only a
  verify input taking the other branch exposes (probe: max_rel 0.59).
- A batch size the module specializes (``int(x.shape[0])``): dynamo silently
  re-exports with a static batch (refused here, see ``_check_batch_is_dynamic``);
  TorchScript declares the input dynamic but bakes the batch into the graph
  (caught by the verification at another batch size).
- TorchScript warns that it is deprecated and will be removed.

Robustness first: **dynamo** goes first, since it fails loudly where
TorchScript writes silently wrong graphs, is torch's maintained default, and
writes the smaller graph; its cost, a slower export, is seconds once per model.
TorchScript is the fallback for what dynamo cannot capture, and its output is
held to the same verification.

Several inputs and named dynamic dimensions
-------------------------------------------
The example (and every verify batch) may be a tensor, a tuple of tensors
(positional inputs) or a dict of tensors (keyword inputs: ``input_ids``,
``attention_mask``), as analysis/inputs.py defines a batch. The file's inputs
are named after them: "input" for one tensor, the dict's keys, or the
parameter names of ``forward`` for a tuple. Dimension 0 of every input is the
batch; ``dynamic_dims`` (``{"input_ids": {1: "seq"}}``, the CLI's
``--dynamic-dim input_ids:1=seq``) makes further axes dynamic, one name per
size: inputs that share a name share the size. Each named dimension is
verified at the example's size and at a second one (half of it, or twice it
when half is below 2), on the verify samples cut or repeated along that axis.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime
import torch
from torch import nn

from egp_export.analysis import inputs
from egp_export.analysis.inputs import Batch
from egp_export.analysis.numerics import (
    NOISE_FACTOR,
    ORT_CPU_RTOL,
    ErrorAccumulator,
    ErrorStats,
    flatten_outputs,
    fp32_noise,
)
from egp_export.errors import EgpExportError, ExportError, OutputError, VerificationError
from egp_export.export.fp16 import Fp16Result, check_dtype, export_fp16
from egp_export.export.inspect import NodeProvenance
from egp_export.export.provenance import Scoped, annotate, scoped_module
from egp_export.io.fileio import atomic_path, check_writable, new_file_mode, write_text_atomic

EXPORTERS = ("dynamo", "torchscript")
AUTO = "auto"
EXPORTER_CHOICES = (AUTO, *EXPORTERS)
DEFAULT_EXPORTER = AUTO
INPUT_NAME = "input"
# The default-domain opsets an export may ask for: ONNX Runtime runs opset 7 and newer (so does the TorchScript
# exporter's oldest), and no file can import an opset newer than the installed onnx defines.
MIN_OPSET = 7
BATCH_DIM_NAME = "batch"
EXPORT_LOG = "export.log"
# onnx-simplifier's own check compares the simplified against the unsimplified
# model in ORT element-wise (numpy.allclose). These are its documented defaults,
# passed explicitly; the authoritative check is ours, against PyTorch, at `rtol`.
ONNXSIM_CHECK_RTOL = 1e-4
ONNXSIM_CHECK_ATOL = 1e-5
# The measured ORT tolerance: NOISE_FACTOR times the module's own fp32-vs-fp64
# error, never below the fixed fp32 floor and never above this cap. timm's
# BatchNormAct2d/StdConv2d models are 3.8e-5 from their own ONNX export (their
# fp32 noise); a difference above 1e-4 is a wrong export, whatever the noise.
ORT_NOISE_CAP = 1e-4
NOISE_SAMPLES = 4  # fp64 runs are slow on CPU; a few samples show the conditioning
# Verify samples given one at a time are also checked together, in batches of this size.
VERIFY_BATCH = 64
# Warnings of these categories say the exporter traced Python control flow or values from the example
# (torch.jit's TracerWarning: "Converting a tensor to a Python boolean might cause the trace to be
# incorrect"): the file may hold only the branch the example took.
TRACE_WARNINGS = (torch.jit.TracerWarning,)
# Loggers whose records are captured during the export (their children included).
_CAPTURED_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime", "onnxsim")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ExportAttempt:
    """One exporter run that did not give a verified file, and why."""

    exporter: str
    dynamic_batch: bool
    failure: str

    def describe(self) -> str:
        return f"{self.exporter} ({'dynamic' if self.dynamic_batch else 'static'} batch): {self.failure}"


@dataclass
class ExportResult:
    """What was written, how, and how far ONNX Runtime is from the PyTorch module."""

    path: Path
    exporter: str  # the exporter that wrote the file
    opset: int
    simplified: bool  # onnx-simplifier ran and its own check passed
    op_counts_exported: dict[str, int]  # straight out of torch.onnx
    op_counts: dict[str, int]  # in the file written
    error: ErrorStats | None  # ONNX Runtime vs the PyTorch module on the verify inputs
    rtol: float
    exporter_requested: str = DEFAULT_EXPORTER  # "auto", or the exporter the caller named
    opset_requested: int | None = None  # None: the exporter's default
    opset_converted_from: int | None = None  # the exporter wrote this opset; onnx.version_converter gave `opset`
    dynamic_batch: bool = True  # whether the file's batch dimension is dynamic
    traced_batch: int = 0  # batch size of the example torch.onnx traced
    rtol_measured: bool = False  # rtol came from the module's own fp32 noise, not from the caller
    failed_attempts: list[ExportAttempt] = field(default_factory=list)  # tried first, in order
    notes: list[str] = field(default_factory=list)  # why simplification was skipped, exporter warnings
    # Exporter warnings that the trace may hold only the example's branch (TRACE_WARNINGS); the file passed the
    # check on every verify sample alone and batched all the same. Callers should show them.
    warnings: list[str] = field(default_factory=list)
    verified_samples: int = 0  # verify samples, each run alone and batched (the example when none were given)
    verified_batch_sizes: list[int] = field(default_factory=list)  # the batch sizes ORT ran them at
    input_names: list[str] = field(default_factory=lambda: [INPUT_NAME])  # the file's inputs, in order
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> {axis: name}, beyond the batch
    verified_dim_sizes: dict[str, list[int]] = field(default_factory=dict)  # named dimension -> sizes ORT ran
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    # Every node of the file: the source modules and rewrites it came from (export/provenance.py), in graph order.
    provenance: list[NodeProvenance] = field(default_factory=list)
    dtype: str = "fp32"  # of the file written; "fp16": ``error`` is the fp32 graph's, ``fp16`` the file's check
    fp16: Fp16Result | None = None

    def why(self) -> str:
        """One line: which exporter wrote the file and why that one."""
        batch = "dynamic batch" if self.dynamic_batch else f"static batch {self.traced_batch}"
        if self.opset_converted_from is not None:
            opset = f"; opset {self.opset} converted from the exporter's {self.opset_converted_from} by onnx.version_converter"
        else:
            opset = f"; opset {self.opset} as requested" if self.opset_requested is not None else ""
        if not self.failed_attempts:
            reason = "requested" if self.exporter_requested != AUTO else "first choice of exporter=auto"
            return f"{self.exporter} exporter, {batch} ({reason}){opset}"
        failed = "; ".join(attempt.describe() for attempt in self.failed_attempts)
        return f"{self.exporter} exporter, {batch}, after: {failed}{opset}"

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "exporter": self.exporter,
            "exporter_requested": self.exporter_requested,
            "exporter_reason": self.why(),
            "dynamic_batch": self.dynamic_batch,
            "traced_batch": self.traced_batch,
            "failed_attempts": [asdict(attempt) for attempt in self.failed_attempts],
            "opset": self.opset,
            "opset_requested": self.opset_requested,
            "opset_converted_from": self.opset_converted_from,
            "simplified": self.simplified,
            "op_counts_exported": dict(self.op_counts_exported),
            "op_counts": dict(self.op_counts),
            "error": None if self.error is None else self.error.to_dict(),
            "rtol": self.rtol,
            "rtol_measured": self.rtol_measured,
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "verified_samples": self.verified_samples,
            "verified_batch_sizes": list(self.verified_batch_sizes),
            "input_names": list(self.input_names),
            "dynamic_dims": {name: {str(axis): dim for axis, dim in axes.items()} for name, axes in self.dynamic_dims.items()},
            "verified_dim_sizes": {name: list(sizes) for name, sizes in self.verified_dim_sizes.items()},
            "seconds": dict(self.seconds),
            "provenance": [row.to_dict() for row in self.provenance],
            "dtype": self.dtype,
            "fp16": None if self.fp16 is None else self.fp16.to_dict(),
        }


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op type → number of nodes in the main graph, sorted by op type."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def ort_session(path_or_bytes: str | Path | bytes, *, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU execution provider.

    Intra- and inter-op thread counts are fixed to ``threads`` (and execution is
    sequential) so that timings are comparable between runs and machines and
    results do not depend on how work was split between threads.
    """
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: unused-initializer warnings are noise here
    model = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    try:
        return onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(
            f"ONNX Runtime (CPU) cannot load the model: {_first_line(error)}; check that it is an ONNX file, "
            "or, for a fresh export, try another --exporter or --opset N (exporter=, opset=)."
        ) from error


def run_onnx(
    session: onnxruntime.InferenceSession, batch: Batch | np.ndarray, names: list[str] | None = None
) -> list[np.ndarray]:
    """Run a session on one batch; returns every output, in graph order.

    One tensor or array feeds the first input; a dict feeds the inputs of its keys; a tuple feeds ``names`` (default:
    the session's inputs in order). Inputs the file does not have (an exporter drops inputs the graph never reads)
    are left out.
    """
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if isinstance(batch, torch.Tensor):
        named = {session.get_inputs()[0].name: batch}
    elif isinstance(batch, dict):
        named = dict(batch)
    else:
        named = dict(zip(names or [i.name for i in session.get_inputs()], batch))
    known = {i.name for i in session.get_inputs()}
    feed = {name: np.ascontiguousarray(value.detach().cpu().numpy()) for name, value in named.items() if name in known}
    return session.run(None, feed)


def measured_rtol(module: nn.Module, batch: Batch) -> tuple[float, float]:
    """(rtol, noise): the ORT tolerance for ``module``, from its own fp32-vs-fp64 error on ``batch``.

    rtol = max(1e-5, min(NOISE_FACTOR * noise, ORT_NOISE_CAP)): a model whose
    own fp32 rounding is 3.8e-5 (timm's fused BatchNorm layers) cannot match
    another fp32 implementation of itself to 1e-5.
    """
    noise = fp32_noise(module, [inputs.take(batch, slice(0, NOISE_SAMPLES))])
    return max(ORT_CPU_RTOL, min(NOISE_FACTOR * noise, ORT_NOISE_CAP)), noise


def export_onnx(
    module_or_model: nn.Module,
    example_input: Batch,
    path: str | Path,
    *,
    verify_inputs: Batch | Iterable[Batch] | None = None,
    rtol: float | None = None,
    force: bool = False,
    simplify: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    static_batch: bool = False,
    exporter: str | None = None,
    log_path: str | Path | None = None,
    show_logs: bool = False,
    dynamic_dims: dict[str, dict[int, str]] | None = None,
    dtype: str = "fp32",
    range_inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
    fp16_noise: float | None = None,
) -> ExportResult:
    """Export ``module_or_model`` to a verified ONNX file at ``path``.

    ``example_input`` is one batch: a tensor, a tuple or a dict of tensors
    (several inputs, see the module docstring). ``verify_inputs`` is one batch
    of that form or several; it defaults to the example input.
    ``dynamic_dims`` names further dynamic axes per input (``{"input_ids":
    {1: "seq"}}``); each is verified at two sizes. With ``dynamic_batch`` their batch size may differ from the
    example's; every sample is also verified alone (batch 1), and at a batch
    of two or more other than the traced one (both exporters can bake the
    example's batch size or branch into the graph, see the module docstring);
    a static-batch file is verified on all of them in batches of its size.
    ``static_batch`` allows a fallback to a batch fixed to the
    example's when no exporter gives a verified dynamic-batch file.
    ``exporter``: "auto" (default: dynamo, then TorchScript), "dynamo" or
    "torchscript". ``opset=None`` takes the exporter's default; a given opset
    (:func:`check_opset`) is what the file imports: an exporter that writes
    another (dynamo writes 18 when asked for less) has its model converted by
    onnx.version_converter, and where that fails the attempt fails (with
    "auto", TorchScript is tried next). ``rtol=None``
    measures it (:func:`measured_rtol`; ``rtol_measured`` and a note say so
    when it exceeds 1e-5). When every attempt fails, torch's captured logs are
    written to ``log_path`` (if given; checked like ``path`` before any work
    and replaced only with ``force``: when a file appears there meanwhile, the
    log goes beside it) and the error names the file. The module is never
    modified.

    ``dtype="fp16"`` writes the verified fp32 graph converted to fp16
    (``export/fp16.py``): nodes whose weights or activations observed on
    ``range_inputs`` (default: the verify inputs) go beyond fp16's range stay
    fp32 (``ExportResult.fp16.kept_fp32`` lists them); the file is checked on
    the verify inputs within ``NOISE_FACTOR`` times ``fp16_noise``, the
    reference model's own fp16 noise (``fp16.fp16_noise``; default: the
    module's own on the range inputs), with top-1 agreement on
    [batch, classes] outputs.

    Raises OutputError (``path`` exists and not ``force``), ExportError (bad
    arguments, module in training mode, export or checker failure) and
    VerificationError (ONNX Runtime differs from PyTorch by more than ``rtol``,
    gives non-finite values, or cannot run a verify input). On any error no
    file is written.
    """
    target = check_writable(path, force=force)
    if log_path is not None:
        check_writable(log_path, force=force)
    requested = DEFAULT_EXPORTER if exporter is None else exporter
    if requested not in EXPORTER_CHOICES:
        raise ExportError(f"unknown exporter {requested!r}; choose one of {', '.join(EXPORTER_CHOICES)}.")
    if opset is not None:
        check_opset(opset)
    check_dtype(dtype)
    module = _check_module(module_or_model)
    scoped = scoped_module(module)  # a graph module's calls scoped by node, to write provenance into the file
    _check_batch(example_input, "example_input")
    names = input_names(module, example_input)
    dims = checked_dims(dynamic_dims or {}, names, example_input)
    given = _given_batches(example_input, verify_inputs, dims, names, dynamic_batch=dynamic_batch)
    ranges = _fp16_options(dtype, range_inputs, fp16_noise, example_input)
    outputs = _Outputs(module)
    n_outputs = _check_outputs(outputs.of(example_input, "the example input"))
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]

    notes: list[str] = []
    seconds: dict[str, float] = {}
    rtol_measured = rtol is None
    if rtol is None:
        start = time.perf_counter()
        rtol, noise = measured_rtol(module, given[0][1])
        seconds["noise"] = time.perf_counter() - start
        if rtol > ORT_CPU_RTOL:
            notes.append(
                f"ONNX Runtime check allowed max_rel {rtol:.2g}, not {ORT_CPU_RTOL:g}: the module's own fp32 error "
                f"(vs fp64) is {noise:.2g}, and {NOISE_FACTOR:g}x that is allowed up to {ORT_NOISE_CAP:g}."
            )

    exporters = EXPORTERS if requested == AUTO else (requested,)
    batch_modes = (True, False) if dynamic_batch and static_batch else (dynamic_batch,)
    job = _Job(
        scoped, outputs, output_names, opset, simplify, rtol, notes, names, dims,
        verified_beyond_example=verify_inputs is not None,
    )
    failures: list[tuple[ExportAttempt, EgpExportError]] = []
    log = io.StringIO()
    with _captured(log, notes, show=show_logs):
        for dynamic in batch_modes:
            traced, batches = _plan(example_input, given, dynamic=dynamic, dims=dims, names=names)
            for name in exporters:
                start = time.perf_counter()
                try:
                    done = job.attempt(name, traced, batches, dynamic=dynamic)
                except (ExportError, VerificationError) as error:
                    seconds[f"failed_{name}_{'dynamic' if dynamic else 'static'}"] = time.perf_counter() - start
                    failures.append((ExportAttempt(name, dynamic, str(error)), error))
                    log.write(f"\n--- {failures[-1][0].describe()}\n")
                    log.write("".join(traceback.format_exception(error)))
                    continue
                data, fp16 = done.data, None
                if dtype == "fp16":
                    start = time.perf_counter()
                    data, fp16 = _fp16(done.data, module, outputs, given, ranges, fp16_noise)
                    seconds["fp16"] = time.perf_counter() - start
                with atomic_path(target, force=force) as tmp:
                    tmp.write_bytes(data)
                return ExportResult(
                    path=target,
                    exporter=name,
                    opset=done.opset,
                    opset_requested=opset,
                    opset_converted_from=done.opset_converted_from,
                    simplified=done.simplified,
                    op_counts_exported=done.op_counts_exported,
                    op_counts=done.op_counts if fp16 is None else fp16.op_counts,
                    error=done.error,
                    rtol=rtol,
                    exporter_requested=requested,
                    dynamic_batch=dynamic,
                    traced_batch=inputs.batch_size(traced),
                    rtol_measured=rtol_measured,
                    failed_attempts=[attempt for attempt, _ in failures],
                    notes=notes,
                    warnings=done.trace_warnings,
                    verified_samples=sum(inputs.batch_size(batch) for _, batch in given),
                    verified_batch_sizes=sorted({inputs.batch_size(batch) for _, batch in batches}),
                    input_names=names,
                    dynamic_dims={name: dict(axes) for name, axes in dims.items()},
                    verified_dim_sizes=_dim_sizes(batches, dims, names),
                    seconds={**seconds, **done.seconds},
                    provenance=done.provenance,
                    dtype=dtype,
                    fp16=fp16,
                )
    raise _all_failed(failures, log.getvalue(), log_path, requested=requested, dynamic_batch=dynamic_batch,
                      static_batch=static_batch, force=force)


def _fp16_options(dtype: str, range_inputs, noise: float | None, example: torch.Tensor) -> list[torch.Tensor] | None:
    """The range batches (None: the verify inputs), after refusing fp16 options given without fp16 or out of range."""
    if dtype == "fp16" and not isinstance(example, torch.Tensor):
        raise ExportError(
            f"dtype='fp16' takes a model with one tensor input; this one takes {inputs.describe(example)}. Export it "
            "in fp32 (the default)."
        )
    if dtype != "fp16":
        if range_inputs is not None or noise is not None:
            raise ExportError("range_inputs and fp16_noise apply to dtype='fp16' only; leave them out or pass dtype='fp16'.")
        return None
    if noise is not None and not (math.isfinite(noise) and noise >= 0.0):
        raise ExportError(f"fp16_noise must be a finite non-negative error, got {noise!r}.")
    if range_inputs is None:
        return None
    batches = [range_inputs] if isinstance(range_inputs, torch.Tensor) else list(range_inputs)
    if not batches:
        raise ExportError("range_inputs is empty; give samples like the calibration data, or leave it out.")
    for index, batch in enumerate(batches):
        _check_tensor(batch, f"range input {index}")
        if batch.dtype != example.dtype or batch.shape[1:] != example.shape[1:]:
            raise ExportError(
                f"range input {index} is {batch.dtype} {tuple(batch.shape)}; the export takes {example.dtype} "
                f"(B, {', '.join(map(str, example.shape[1:]))})."
            )
    return batches


def _fp16(fp32: bytes, module, outputs, given, ranges, noise) -> tuple[bytes, Fp16Result]:
    """The fp16 file of the verified fp32 one, checked on the verify samples (export/fp16.py)."""
    references = [outputs.of(batch, label) for label, batch in given]
    # Every intermediate tensor of a batch is held while its range is read: a batch at a time, VERIFY_BATCH at most.
    ranges = [chunk for batch in (ranges or [batch for _, batch in given]) for chunk in batch.split(VERIFY_BATCH)]
    return export_fp16(fp32, module, ranges, [batch for _, batch in given], references=references, noise=noise)


def _all_failed(
    failures, log: str, log_path, *, requested: str, dynamic_batch: bool, static_batch: bool, force: bool
) -> EgpExportError:
    """One error for every failed attempt: what each said, what to try, where the full log is."""
    hints = []
    if requested != AUTO:
        other = next(name for name in EXPORTERS if name != requested)
        hints.append(f"--exporter {other} or auto (exporter='{other}' or 'auto')")
    if dynamic_batch and not static_batch:
        hints.append("--static-batch (static_batch=True) to accept a batch size fixed to the example's")
    hints.append("another --opset N (opset=N)")
    if any(isinstance(error, VerificationError) for _, error in failures):
        hints.append("--no-simplify (simplify=False) to find the step at fault")
    if len(failures) == 1:
        summary = failures[0][0].failure.rstrip(".")
    else:
        summary = "no export attempt succeeded: " + "; ".join(attempt.describe().rstrip(".") for attempt, _ in failures)
    message = f"{summary}; no file was written. Try {', '.join(hints)}."
    if log_path is not None:
        written = _write_log(Path(log_path), log, force=force)
        if written is not None:
            message += f" Torch's log of the export: {written}"
    kind = VerificationError if any(isinstance(error, VerificationError) for _, error in failures) else ExportError
    failure = kind(message)
    failure.__cause__ = failures[-1][1]
    return failure


def _write_log(path: Path, log: str, *, force: bool) -> Path | None:
    """Write the failed export's log to ``path``, or beside it when a file appeared there meanwhile (no ``force``).

    Returns where it went; None when it could not be written (the export's own error matters more)."""
    try:
        return write_text_atomic(path, log, force=force)
    except OutputError:
        pass
    except OSError:
        return None
    try:
        fd, name = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=path.suffix, dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(log)
        os.chmod(name, new_file_mode())
    except OSError:
        return None
    return Path(name)


class _Outputs:
    """The module's outputs on each input batch, computed once."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._cache: dict[int, tuple[Batch, object]] = {}  # id(input) -> (input, output); the input keeps its id alive

    def of(self, batch: Batch, label: str):
        if id(batch) not in self._cache:
            self._cache[id(batch)] = (batch, _run_module(self.module, batch, label))
        return self._cache[id(batch)][1]


@dataclass
class _Exported:
    data: bytes
    opset: int
    simplified: bool
    op_counts_exported: dict[str, int]
    op_counts: dict[str, int]
    error: ErrorStats
    seconds: dict[str, float]
    trace_warnings: list[str]
    opset_converted_from: int | None
    provenance: list[NodeProvenance]


def _trace_warnings(caught) -> list[str]:
    """The warnings that say the exporter traced Python control flow or values (TRACE_WARNINGS), one line each."""
    found = []
    for warning in caught:
        if issubclass(warning.category, TRACE_WARNINGS):
            line = f"{warning.category.__name__}: {str(warning.message).strip().splitlines()[0][:300]}"
            found += [line] if line not in found else []
    return found


@dataclass
class _Job:
    """What every attempt shares: the module (scoped for provenance), its outputs, the output names and the checks'
    settings."""

    scoped: Scoped
    outputs: _Outputs
    output_names: list[str]
    opset: int | None
    simplify: bool
    rtol: float
    notes: list[str]
    input_names: list[str]
    dims: dict[str, dict[int, str]]
    verified_beyond_example: bool  # the caller gave samples to verify on, not only the traced example

    def attempt(self, exporter: str, traced: Batch, batches, *, dynamic: bool) -> _Exported:
        """Export, simplify, check and verify with one exporter; raises ExportError or VerificationError."""
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        traced_output = self.outputs.of(traced, "the traced example")
        # The exporters run the module on the example (TorchScript traces it for real): on a copy, so a module that
        # writes into its input leaves the caller's tensor as it was.
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                exported = _export(
                    self.scoped.module, inputs.clone(traced), traced_output, self.output_names, exporter, self.opset, dynamic,
                    self.input_names, self.dims,
                )
        finally:
            for warning in caught:  # on to _captured, which notes and logs them all
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        baked = _trace_warnings(caught)
        seconds["export"] = time.perf_counter() - start
        _check_dims_are_dynamic(exported, exporter, self.dims, batch=dynamic)
        converted_from = None
        if self.opset is not None and _default_opset(exported) != self.opset:
            converted_from = _default_opset(exported)
            exported = _convert_opset(exported, self.opset, exporter)

        final, simplified = exported, False
        if self.simplify:
            start = time.perf_counter()
            final, simplified = _simplify(exported, traced, self.input_names, self.notes)
            seconds["simplify"] = time.perf_counter() - start
        provenance = annotate(final, exported, self.scoped, added_by="onnx-simplifier" if simplified else "egp-export")

        start = time.perf_counter()
        try:
            onnx.checker.check_model(final, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise ExportError(f"the {exporter} exporter wrote an invalid ONNX model: {_first_line(error)}") from error
        try:
            data = final.SerializeToString()
        except ValueError as error:  # protobuf refuses messages over 2 GB
            raise ExportError(
                f"cannot serialize the model as one file: {_first_line(error)}; models over 2 GB need external "
                "weights, which egp-export does not write"
            ) from error
        opset_version = _default_opset(final)
        seconds["check"] = time.perf_counter() - start

        start = time.perf_counter()
        references = [self.outputs.of(batch, label) for label, batch in batches]
        error_stats = _verify(data, batches, references, self.rtol, exporter, self.input_names)
        seconds["verify"] = time.perf_counter() - start
        if baked and not self.verified_beyond_example:
            raise VerificationError(
                f"the {exporter} exporter warned that the file may hold only what the example did "
                f"({baked[0]}), and it was verified on the example alone; give the held-out samples to verify on "
                "(verify_inputs=), or use another --exporter"
            )
        return _Exported(
            data, opset_version, simplified, count_ops(exported), count_ops(final), error_stats, seconds, baked,
            converted_from, provenance,
        )


def input_names(module: nn.Module, example: Batch) -> list[str]:
    """The file's input names: "input" for one tensor, a dict's keys, a tuple's ``forward`` parameter names."""
    return inputs.model_input_names(module, example)


def checked_dims(dims, names: list[str], example: Batch) -> dict[str, dict[int, str]]:
    """``dims`` ({input: {axis: name}}) checked against the example: known inputs, axes beyond the batch, one size per
    name, and at least 2 (torch.export specializes a size-1 dimension)."""
    checked: dict[str, dict[int, str]] = {}
    sizes: dict[str, tuple[str, int]] = {}
    leaves = dict(zip(names, inputs.leaves(example)))
    for name, axes in dims.items():
        if name not in leaves:
            raise ExportError(
                f"--dynamic-dim names the input {name!r}, but the model's inputs are {', '.join(map(repr, names))}."
            )
        leaf = leaves[name]
        for axis, dim in axes.items():
            where = f"{name}:{axis}={dim}"
            if not isinstance(axis, int) or not 1 <= axis < leaf.dim():
                raise ExportError(
                    f"--dynamic-dim {where}: {name} has axes 0..{leaf.dim() - 1} and axis 0 is the batch (dynamic "
                    f"already); name an axis from 1 to {leaf.dim() - 1}."
                )
            if dim == BATCH_DIM_NAME or not dim.isidentifier():
                raise ExportError(f"--dynamic-dim {where}: the name must be an identifier other than {BATCH_DIM_NAME!r}.")
            size = int(leaf.shape[axis])
            if size < 2:
                raise ExportError(
                    f"--dynamic-dim {where}: the example has size {size} there, and torch.export fixes a size-1 "
                    "dimension; give samples of size 2 or more along it."
                )
            if dim in sizes and sizes[dim][1] != size:
                raise ExportError(
                    f"--dynamic-dim {where}: {name} has size {size} on axis {axis} but {sizes[dim][0]} has "
                    f"{sizes[dim][1]} under the same name; one name is one size."
                )
            sizes.setdefault(dim, (f"{name}:{axis}", size))
            checked.setdefault(name, {})[axis] = dim
    return checked


def _given_batches(example: Batch, verify_inputs, dims, names, *, dynamic_batch: bool) -> list[tuple[str, Batch]]:
    """(label, batch) pairs the caller gave to verify on, checked against the example's form (named dynamic axes may
    differ in size)."""
    if verify_inputs is None:
        batches = [("the example input", example)]
    else:
        one = isinstance(verify_inputs, (torch.Tensor, dict)) or (
            isinstance(verify_inputs, tuple) and not isinstance(example, torch.Tensor)
            and all(isinstance(value, torch.Tensor) for value in verify_inputs)
        )
        given = [verify_inputs] if one else list(verify_inputs)
        if not given:
            raise ExportError("verify_inputs is empty; give at least one tensor or leave it out to use the example.")
        batches = [(f"verify input {i}", batch) for i, batch in enumerate(given)]
    expected = _form(example, dims, names)
    for label, batch in batches:
        _check_batch(batch, label)
        same = _form(batch, dims, names) == expected and (dynamic_batch or inputs.batch_size(batch) == inputs.batch_size(example))
        if not same:
            allowed = "any batch size" if dynamic_batch else f"batch size {inputs.batch_size(example)}"
            raise ExportError(
                f"{label} is {_shapes(batch)}; the export takes {_shapes(example, batched=True)} with {allowed}."
            )
    return batches


def _form(batch: Batch, dims, names) -> tuple:
    """Structure, dtypes and sample shapes, named dynamic axes left out (their size may differ)."""
    kind = "tensor" if isinstance(batch, torch.Tensor) else "dict" if isinstance(batch, dict) else "tuple"
    leaves = inputs.leaves(batch)
    labels = [str(key) for key in batch] if kind == "dict" else names[: len(leaves)]
    shapes = tuple(
        (leaf.dtype, tuple(None if axis in dims.get(label, {}) else size for axis, size in enumerate(leaf.shape) if axis))
        for label, leaf in zip(labels, leaves)
    )
    return kind, tuple(labels), len(leaves), shapes


def _shapes(batch: Batch, *, batched: bool = False) -> str:
    """"torch.float32 (5, 3)" (with ``batched``: "(B, 3)") per input, named where there are several."""

    def shape(leaf: torch.Tensor) -> str:
        sizes = ["B", *map(str, leaf.shape[1:])] if batched else list(map(str, leaf.shape))
        return f"{leaf.dtype} ({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"

    if isinstance(batch, torch.Tensor):
        return shape(batch)
    return ", ".join(f"{name} {shape(leaf)}" for name, leaf in zip(inputs.names(batch), inputs.leaves(batch)))


def _plan(
    example: Batch, given, *, dynamic: bool, dims: dict | None = None, names: list[str] | None = None
) -> tuple[Batch, list[tuple[str, Batch]]]:
    """(the example to trace, the (label, batch) pairs to verify on) for a dynamic or a static batch.

    Every given sample is checked alone (batch 1) and in a batch of two or more (dynamic), or in batches of the
    example's size (static, the last one filled up with the first samples): a traced branch taken per batch
    (``if x.mean() > 0``) differs only on the samples that take the other one alone. Each named dynamic dimension is
    checked at a second size too (:func:`_resized`).
    """
    dims, names = dims or {}, names or []
    samples = inputs.concat([batch for _, batch in given])
    count = inputs.batch_size(samples)
    if not dynamic:
        size = inputs.batch_size(example)
        padded = inputs.concat([samples, inputs.take(samples, slice(0, (-count) % size))]) if count >= size else samples
        chunks = [inputs.take(padded, slice(i, i + size)) for i in range(0, inputs.batch_size(padded) - size + 1, size)]
        if not chunks:
            return example, [("the example input", example), *_resized(example, dims, names)]
        planned = [(f"verify samples {i * size}-{(i + 1) * size - 1}", c) for i, c in enumerate(chunks)]
        return example, planned + _resized(chunks[0], dims, names)
    # torch.export specializes a size-1 dimension: trace at batch 2 at least.
    traced = example if inputs.batch_size(example) >= 2 else inputs.concat([example, example])
    batches = [(label, batch) for label, batch in given if inputs.batch_size(batch) >= 2]
    if not batches and count >= 2:
        batches = [
            (f"verify samples {first}-{min(first + VERIFY_BATCH, count) - 1}",
             inputs.take(samples, slice(first, first + VERIFY_BATCH)))
            for first in range(0, count, VERIFY_BATCH)
        ]
    traced_size = inputs.batch_size(traced)
    if not any(inputs.batch_size(batch) >= 2 and inputs.batch_size(batch) != traced_size for _, batch in batches):
        grown = inputs.concat([traced, inputs.take(example, slice(0, 1))])
        batches.append((f"the example grown to batch {traced_size + 1} (checks the dynamic batch)", grown))
    batches += [(f"verify sample {i} (batch 1)", inputs.take(samples, slice(i, i + 1))) for i in range(count)]
    return traced, batches + _resized(inputs.take(samples, slice(0, VERIFY_BATCH)), dims, names)


def _second_size(size: int) -> int:
    """Another size to verify a named dimension at: half of it, or twice it where half is below 2."""
    return size // 2 if size // 2 >= 2 else 2 * size


def _resized(batch: Batch, dims, names) -> list[tuple[str, Batch]]:
    """Per named dynamic dimension, ``batch`` with every axis of that name cut to half its size (or repeated to
    twice it): the file must not have baked the example's size in."""
    resized = []
    for dim in dict.fromkeys(d for axes in dims.values() for d in axes.values()):
        leaves = inputs.leaves(batch)
        changed, size = [], None
        for name, leaf in zip(names, leaves):
            for axis, named in dims.get(name, {}).items():
                if named == dim:
                    size = int(leaf.shape[axis])
                    other = _second_size(size)
                    leaf = torch.cat([leaf, leaf], axis).narrow(axis, 0, other) if other > size else leaf.narrow(axis, 0, other)
            changed.append(leaf)
        label = f"verify samples at {dim}={_second_size(size)} (traced at {size}: checks the dynamic {dim})"
        resized.append((label, inputs.with_leaves(batch, changed)))
    return resized


def _dim_sizes(batches, dims, names) -> dict[str, list[int]]:
    """Per named dynamic dimension, the sizes ONNX Runtime ran it at."""
    sizes: dict[str, set[int]] = {}
    for _, batch in batches:
        for name, leaf in zip(names, inputs.leaves(batch)):
            for axis, dim in dims.get(name, {}).items():
                sizes.setdefault(dim, set()).add(int(leaf.shape[axis]))
    return {dim: sorted(found) for dim, found in sizes.items()}


@contextlib.contextmanager
def _captured(log: io.StringIO, notes: list[str], *, show: bool) -> Iterator[None]:
    """Keep torch's and the exporters' chatter off the console.

    Warnings go into ``notes`` and ``log``; with ``show`` false, records of the
    loggers in _CAPTURED_LOGGERS and anything printed to stdout/stderr go to
    ``log`` as well. Torch gives several of its loggers their own stderr
    handler (``torch``, ``torch._dynamo``, ``torch.export``, ``torch.onnx``), so
    each logger with handlers gets the capturing one instead, for the block.
    """
    with contextlib.ExitStack() as stack:
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if not show:
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
            stack.enter_context(_loggers_into(log))
        try:
            yield
        finally:
            for warning in caught:
                note = f"{warning.category.__name__}: {str(warning.message).strip().splitlines()[0][:300]}"
                log.write(f"warning: {note}\n")
                if note not in notes:
                    notes.append(note)


@contextlib.contextmanager
def _loggers_into(log: io.StringIO) -> Iterator[None]:
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    known = [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and name.split(".")[0] in _CAPTURED_LOGGERS
    ]
    roots = [logging.getLogger(name) for name in _CAPTURED_LOGGERS]
    # A root passes everything on to the capturing handler; a child with its own handler or
    # without propagation would bypass it.
    redirected = {id(logger): logger for logger in roots + known if logger in roots or logger.handlers or not logger.propagate}
    saved = [(logger, logger.handlers[:], logger.propagate) for logger in redirected.values()]
    for logger, _, _ in saved:
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _describe_failure(error: BaseException) -> str:
    """First line of the error and, when it wraps another, of the root cause."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    summary = _first_line(error)
    return summary if root is error else f"{summary} (cause: {_first_line(root)})"


def _check_module(module) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise ExportError(f"expected a torch.nn.Module or torch.fx.GraphModule, got {type(module).__name__}.")
    for name, submodule in module.named_modules():
        if submodule.training:
            where = "the module" if not name else f"its submodule {name!r}"
            raise ExportError(
                f"{where} is in training mode; call .eval() on the model before exporting "
                "(egp-export does not change the module for you)."
            )
    return module


def _check_batch(value, what: str) -> None:
    """A tensor, or a non-empty tuple or dict of tensors, each with a batch dimension, all of one batch size."""
    leaves = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, tuple) else []
    if leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        for name, leaf in zip(inputs.names(value), leaves):
            _check_tensor(leaf, f"{what} ({name})")
        sizes = {int(leaf.shape[0]) for leaf in leaves}
        if len(sizes) > 1:
            raise ExportError(f"{what} holds inputs of different batch sizes ({_shapes(value)}); dim 0 is the batch of each.")
        return
    _check_tensor(value, what)


def _check_tensor(value, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{what} must be a torch.Tensor (or a tuple or dict of them), got {type(value).__name__}.")
    if value.dim() == 0:
        raise ExportError(f"{what} must have a batch dimension, got a 0-d tensor.")


def _run_module(module: nn.Module, x: Batch, what: str):
    try:
        with torch.no_grad():
            return inputs.call_on_copy(module, x)  # a model may write into its input; ONNX Runtime runs on the same x
    except Exception as error:
        raise ExportError(f"the module raised on {what}: {_first_line(error)}; check the input's shape and dtype.") from error


def _check_dims_are_dynamic(model: onnx.ModelProto, exporter: str, dims: dict[str, dict[int, str]], *, batch: bool) -> None:
    # The dynamo exporter, when torch.export finds the batch size specialized
    # (int(x.shape[0]), a hard-coded reshape), silently retries with the
    # suggested fix, a static batch; refuse that instead of writing it. Likewise for a named dimension.
    for graph_input in model.graph.input:
        shape = graph_input.type.tensor_type.shape.dim
        axes = {**({0: BATCH_DIM_NAME} if batch else {}), **dims.get(graph_input.name, {})}
        for axis, name in axes.items():
            if axis >= len(shape) or shape[axis].WhichOneof("value") == "dim_param":
                continue
            if axis == 0:
                raise ExportError(
                    f"the {exporter} exporter fixed the batch size to {shape[0].dim_value}: the module specializes it "
                    "(e.g. int(x.shape[0]) or a reshape with a literal batch size); allow a static batch with "
                    "--static-batch (static_batch=True), or make the module batch-size agnostic"
                )
            raise ExportError(
                f"the {exporter} exporter fixed {graph_input.name}'s axis {axis} ({name}) to {shape[axis].dim_value}: "
                "the module specializes that size (a literal in a reshape, a fixed position table); drop "
                f"--dynamic-dim {graph_input.name}:{axis}={name} or make the module agnostic of it"
            )


def _contains_dict(output) -> bool:
    if isinstance(output, dict):
        return True
    return isinstance(output, (tuple, list)) and any(_contains_dict(item) for item in output)


def _check_outputs(output) -> int:
    if _contains_dict(output):  # torch.onnx and numerics.flatten_outputs order dict leaves differently
        raise ExportError("the module returns a dict; wrap it so that it returns a tensor or a tuple of tensors.")
    leaves = flatten_outputs(output)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)})
        raise ExportError(
            f"the module's outputs must be tensors (or tuples/lists of tensors), found {', '.join(kinds) or 'none'}."
        )
    return len(leaves)


def _export(module, example_input, example_output, output_names, exporter, opset, dynamic_batch, input_names, dims):
    # A dict is passed as keyword arguments, a tuple as positional ones; both exporters name the inputs in order.
    args, kwargs = ((), example_input) if isinstance(example_input, dict) else (inputs.positional(module, example_input), None)
    axes = _input_axes(input_names, dims, batch=dynamic_batch)
    try:
        if exporter == "dynamo":
            program = torch.onnx.export(
                module,
                args,
                kwargs=kwargs,
                dynamo=True,
                external_data=False,
                optimize=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=_dynamic_shapes(example_input, input_names, axes) if any(axes.values()) else None,
                verbose=False,
            )
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            args,
            buffer,
            kwargs=kwargs,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=_dynamic_axes(example_input, example_output, input_names, output_names, axes)
            if any(axes.values()) else None,
            verbose=False,
        )
        return onnx.load_from_string(buffer.getvalue())
    except Exception as error:
        raise ExportError(f"torch.onnx ({exporter} exporter) failed: {_describe_failure(error)}") from error


def _input_axes(input_names, dims, *, batch: bool) -> dict[str, dict[int, str]]:
    """Per input, its dynamic axes: the batch (when dynamic) and the named ones."""
    return {name: {**({0: BATCH_DIM_NAME} if batch else {}), **dims.get(name, {})} for name in input_names}


def _dynamic_shapes(example_input, input_names, axes):
    """torch.export's dynamic_shapes: one Dim per name (inputs sharing a name share it), laid out like the inputs."""
    shared: dict[str, torch.export.Dim] = {}

    def spec(name: str) -> dict:
        return {axis: shared.setdefault(dim, torch.export.Dim(dim)) for axis, dim in axes[name].items()}

    if isinstance(example_input, torch.Tensor):
        return (spec(input_names[0]),)
    if isinstance(example_input, dict):
        return {name: spec(name) for name in input_names}
    return tuple(spec(name) for name in input_names)


def _dynamic_axes(example_input, example_output, input_names, output_names, axes) -> dict[str, dict[int, str]]:
    # The TorchScript exporter needs every dynamic output axis named; an output
    # axis whose size equals a dynamic input axis's size in the example is taken to be that one (the batch on
    # axis 0 only).
    sizes = {}
    for name, leaf in zip(input_names, inputs.leaves(example_input)):
        for axis, dim in axes[name].items():
            sizes.setdefault(dim, int(leaf.shape[axis]))
    result = {name: dict(axes[name]) for name in input_names if axes[name]}
    for name, leaf in zip(output_names, flatten_outputs(example_output)):
        named = {
            axis: dim for axis in range(leaf.dim()) for dim, size in sizes.items()
            if leaf.shape[axis] == size and (axis == 0) == (dim == BATCH_DIM_NAME)
        }
        if named:
            result[name] = named
    return result


def _simplify(
    model: onnx.ModelProto, example_input: Batch, input_names: list[str], notes: list[str]
) -> tuple[onnx.ModelProto, bool]:
    import onnxsim  # heavy import, only needed here

    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    try:
        simplified, check_ok = onnxsim.simplify(
            candidate,
            check_n=1,
            input_data=_feed(model, example_input, input_names),
            check_rtol=ONNXSIM_CHECK_RTOL,
            check_atol=ONNXSIM_CHECK_ATOL,
            certify=False,
        )
    except Exception as error:  # recorded, not hidden: the unsimplified model is still exported and verified
        notes.append(f"onnx-simplifier raised {_first_line(error)}; kept the unsimplified model.")
        return model, False
    if not check_ok:
        notes.append("onnx-simplifier's own check failed; kept the unsimplified model.")
        return model, False
    return simplified, True


def _feed(model: onnx.ModelProto, batch: Batch, input_names: list[str]) -> dict[str, np.ndarray]:
    """The arrays of ``batch`` under the file's input names (inputs an exporter dropped, never read, left out)."""
    present = {graph_input.name for graph_input in model.graph.input}
    return {
        name: leaf.detach().cpu().numpy() for name, leaf in zip(input_names, inputs.leaves(batch)) if name in present
    }


def _verify(
    data: bytes, batches: list[tuple[str, Batch]], references: list, rtol: float, exporter: str, input_names: list[str]
) -> ErrorStats:
    """ONNX Runtime against the module on every (label, batch), each output on its own scale (numerics.compare)."""
    session = ort_session(data)
    errors, alone = ErrorAccumulator(), ErrorAccumulator()  # alone: each sample once, for agreement and cosine
    for (label, batch), reference in zip(batches, references):
        try:
            # A tuple is fed under the file's input names, a dict under its keys, one tensor as the only input.
            candidate = run_onnx(session, dict(zip(input_names, batch)) if isinstance(batch, tuple) else batch)
            errors.add(reference, candidate)  # raises on count/shape mismatch
            if inputs.batch_size(batch) == 1:
                alone.add(reference, candidate)
        except Exception as error:
            raise VerificationError(
                f"ONNX Runtime cannot reproduce the module on {label} ({_shapes(batch)}): {_first_line(error)} "
                f"(a batch size other than the traced one failing means the {exporter} exporter baked it into the graph)"
            ) from error
        # inf - inf is NaN and inf / inf is NaN: a relative error cannot judge non-finite values, so none may pass.
        non_finite = sum(int(np.size(output) - np.count_nonzero(np.isfinite(output))) for output in candidate)
        if non_finite:
            raise VerificationError(
                f"ONNX Runtime gives {non_finite} non-finite values (inf or NaN) on {label} ({_shapes(batch)})"
                + ("; so does the PyTorch module, so the file cannot be verified on these inputs"
                   if not all(torch.isfinite(r).all() for r in flatten_outputs(reference)) else "")
            )
    error_stats = errors.result()
    if alone.samples:
        error_stats = error_stats.with_agreement_of(alone.result())
    if not error_stats.within(rtol):
        sizes = sorted({inputs.batch_size(batch) for _, batch in batches})
        raise VerificationError(
            f"ONNX Runtime differs from the PyTorch module ({exporter} exporter): {error_stats.describe()} > "
            f"rtol={rtol:.3g} (each output on its own scale; verify samples run at batch sizes "
            f"{', '.join(map(str, sizes))})"
        )
    return error_stats


def check_opset(opset: int) -> None:
    """Refuse an opset no exporter here can write and ONNX Runtime run (before any work)."""
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"opset {opset} cannot be written here: choose --opset (opset=) from {MIN_OPSET} to {newest} "
            f"(ONNX Runtime runs opset {MIN_OPSET} and newer; the installed onnx {onnx.__version__} defines up to "
            f"{newest}). The dynamo exporter writes 18 and newer; older opsets come from the TorchScript exporter "
            "or, where it can, onnx's version converter."
        )


def _convert_opset(model: onnx.ModelProto, opset: int, exporter: str) -> onnx.ModelProto:
    """``model`` converted to default-domain ``opset`` by onnx.version_converter; ExportError when it cannot be."""
    written = _default_opset(model)
    try:
        converted = onnx.version_converter.convert_version(model, opset)
    except Exception as error:  # the converter raises RuntimeError / ConvertError with the C++ assertion text
        raise ExportError(
            f"the {exporter} exporter wrote opset {written}, not the requested {opset}, and onnx's version converter "
            f"cannot convert it ({_first_line(error)})"
        ) from error
    if _default_opset(converted) != opset:
        raise ExportError(
            f"the {exporter} exporter wrote opset {written}, not the requested {opset}, and onnx's version converter "
            f"gave opset {_default_opset(converted)}"
        )
    return converted


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported model imports no default-domain ONNX opset; this is an exporter bug.")
