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
"""

from __future__ import annotations

import contextlib
import io
import logging
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

from egp_export.analysis.numerics import (
    NOISE_FACTOR,
    ORT_CPU_RTOL,
    ErrorAccumulator,
    ErrorStats,
    flatten_outputs,
    fp32_noise,
)
from egp_export.errors import EgpExportError, ExportError, OutputError, VerificationError
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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage
    # Every node of the file: the source modules and rewrites it came from (export/provenance.py), in graph order.
    provenance: list[NodeProvenance] = field(default_factory=list)

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
            "seconds": dict(self.seconds),
            "provenance": [row.to_dict() for row in self.provenance],
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


def run_onnx(session: onnxruntime.InferenceSession, inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """Run a single-input session; returns every output, in graph order."""
    if isinstance(inputs, torch.Tensor):
        array = inputs.detach().cpu().numpy()
    else:
        array = np.asarray(inputs)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(array)}
    return session.run(None, feed)


def measured_rtol(module: nn.Module, batch: torch.Tensor) -> tuple[float, float]:
    """(rtol, noise): the ORT tolerance for ``module``, from its own fp32-vs-fp64 error on ``batch``.

    rtol = max(1e-5, min(NOISE_FACTOR * noise, ORT_NOISE_CAP)): a model whose
    own fp32 rounding is 3.8e-5 (timm's fused BatchNorm layers) cannot match
    another fp32 implementation of itself to 1e-5.
    """
    noise = fp32_noise(module, [batch[:NOISE_SAMPLES]])
    return max(ORT_CPU_RTOL, min(NOISE_FACTOR * noise, ORT_NOISE_CAP)), noise


def export_onnx(
    module_or_model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    verify_inputs: torch.Tensor | Iterable[torch.Tensor] | None = None,
    rtol: float | None = None,
    force: bool = False,
    simplify: bool = True,
    opset: int | None = None,
    dynamic_batch: bool = True,
    static_batch: bool = False,
    exporter: str | None = None,
    log_path: str | Path | None = None,
    show_logs: bool = False,
) -> ExportResult:
    """Export ``module_or_model`` (one tensor input) to a verified ONNX file at ``path``.

    ``verify_inputs`` is one tensor or several (batches); it defaults to the
    example input. With ``dynamic_batch`` their batch size may differ from the
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
    module = _check_module(module_or_model)
    scoped = scoped_module(module)  # a graph module's calls scoped by node, to write provenance into the file
    _check_tensor(example_input, "example_input")
    given = _given_batches(example_input, verify_inputs, dynamic_batch=dynamic_batch)
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
        scoped, outputs, output_names, opset, simplify, rtol, notes, verified_beyond_example=verify_inputs is not None
    )
    failures: list[tuple[ExportAttempt, EgpExportError]] = []
    log = io.StringIO()
    with _captured(log, notes, show=show_logs):
        for dynamic in batch_modes:
            traced, batches = _plan(example_input, given, dynamic=dynamic)
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
                with atomic_path(target, force=force) as tmp:
                    tmp.write_bytes(done.data)
                return ExportResult(
                    path=target,
                    exporter=name,
                    opset=done.opset,
                    opset_requested=opset,
                    opset_converted_from=done.opset_converted_from,
                    simplified=done.simplified,
                    op_counts_exported=done.op_counts_exported,
                    op_counts=done.op_counts,
                    error=done.error,
                    rtol=rtol,
                    exporter_requested=requested,
                    dynamic_batch=dynamic,
                    traced_batch=int(traced.shape[0]),
                    rtol_measured=rtol_measured,
                    failed_attempts=[attempt for attempt, _ in failures],
                    notes=notes,
                    warnings=done.trace_warnings,
                    verified_samples=sum(int(batch.shape[0]) for _, batch in given),
                    verified_batch_sizes=sorted({int(batch.shape[0]) for _, batch in batches}),
                    seconds={**seconds, **done.seconds},
                    provenance=done.provenance,
                )
    raise _all_failed(failures, log.getvalue(), log_path, requested=requested, dynamic_batch=dynamic_batch,
                      static_batch=static_batch, force=force)


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
    """The module's outputs on each input tensor, computed once."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._cache: dict[int, tuple[torch.Tensor, object]] = {}  # id(input) -> (input, output); the input keeps its id alive

    def of(self, batch: torch.Tensor, label: str):
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
    verified_beyond_example: bool  # the caller gave samples to verify on, not only the traced example

    def attempt(self, exporter: str, traced: torch.Tensor, batches, *, dynamic: bool) -> _Exported:
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
                    self.scoped.module, traced.clone(), traced_output, self.output_names, exporter, self.opset, dynamic
                )
        finally:
            for warning in caught:  # on to _captured, which notes and logs them all
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        baked = _trace_warnings(caught)
        seconds["export"] = time.perf_counter() - start
        if dynamic:
            _check_batch_is_dynamic(exported, exporter)
        converted_from = None
        if self.opset is not None and _default_opset(exported) != self.opset:
            converted_from = _default_opset(exported)
            exported = _convert_opset(exported, self.opset, exporter)

        final, simplified = exported, False
        if self.simplify:
            start = time.perf_counter()
            final, simplified = _simplify(exported, traced, self.notes)
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
        error_stats = _verify(data, batches, references, self.rtol, exporter)
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


def _given_batches(example: torch.Tensor, verify_inputs, *, dynamic_batch: bool) -> list[tuple[str, torch.Tensor]]:
    """(label, batch) pairs the caller gave to verify on, checked against the example's dtype and shape."""
    if verify_inputs is None:
        batches = [("the example input", example)]
    else:
        given = [verify_inputs] if isinstance(verify_inputs, torch.Tensor) else list(verify_inputs)
        if not given:
            raise ExportError("verify_inputs is empty; give at least one tensor or leave it out to use the example.")
        batches = [(f"verify input {i}", batch) for i, batch in enumerate(given)]
    for label, batch in batches:
        _check_tensor(batch, label)
        same_shape = batch.shape[1:] == example.shape[1:] and (dynamic_batch or batch.shape[0] == example.shape[0])
        if batch.dtype != example.dtype or not same_shape:
            allowed = "any batch size" if dynamic_batch else f"batch size {example.shape[0]}"
            raise ExportError(
                f"{label} is {batch.dtype} {tuple(batch.shape)}; the export takes {example.dtype} "
                f"(B, {', '.join(map(str, example.shape[1:]))}) with {allowed}."
            )
    return batches


def _plan(example: torch.Tensor, given, *, dynamic: bool) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """(the example to trace, the (label, batch) pairs to verify on) for a dynamic or a static batch.

    Every given sample is checked alone (batch 1) and in a batch of two or more (dynamic), or in batches of the
    example's size (static, the last one filled up with the first samples): a traced branch taken per batch
    (``if x.mean() > 0``) differs only on the samples that take the other one alone.
    """
    samples = torch.cat([batch for _, batch in given])
    if not dynamic:
        batch_size = example.shape[0]
        padded = torch.cat([samples, samples[: (-len(samples)) % batch_size]]) if len(samples) >= batch_size else samples
        chunks = [chunk for chunk in padded.split(batch_size) if chunk.shape[0] == batch_size]
        if not chunks:
            return example, [("the example input", example)]
        return example, [(f"verify samples {i * batch_size}-{(i + 1) * batch_size - 1}", c) for i, c in enumerate(chunks)]
    # torch.export specializes a size-1 dimension: trace at batch 2 at least.
    traced = example if example.shape[0] >= 2 else example.repeat(2, *([1] * (example.dim() - 1)))
    batches = [(label, batch) for label, batch in given if batch.shape[0] >= 2]
    if not batches and len(samples) >= 2:
        chunks = samples.split(VERIFY_BATCH)
        batches = [(f"verify samples {i * VERIFY_BATCH}-{i * VERIFY_BATCH + len(c) - 1}", c) for i, c in enumerate(chunks)]
    if not any(batch.shape[0] >= 2 and batch.shape[0] != traced.shape[0] for _, batch in batches):
        grown = torch.cat([traced, example[:1]])
        batches.append((f"the example grown to batch {grown.shape[0]} (checks the dynamic batch)", grown))
    batches += [(f"verify sample {i} (batch 1)", samples[i : i + 1]) for i in range(len(samples))]
    return traced, batches


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


def _check_tensor(value, what: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{what} must be a torch.Tensor, got {type(value).__name__}.")
    if value.dim() == 0:
        raise ExportError(f"{what} must have a batch dimension, got a 0-d tensor.")


def _run_module(module: nn.Module, x: torch.Tensor, what: str):
    try:
        with torch.no_grad():
            return module(x.clone())  # a model may write into its input; ONNX Runtime runs on the same x
    except Exception as error:
        raise ExportError(f"the module raised on {what}: {_first_line(error)}; check the input's shape and dtype.") from error


def _check_batch_is_dynamic(model: onnx.ModelProto, exporter: str) -> None:
    # The dynamo exporter, when torch.export finds the batch size specialized
    # (int(x.shape[0]), a hard-coded reshape), silently retries with the
    # suggested fix, a static batch; refuse that instead of writing it.
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.WhichOneof("value") != "dim_param":
        raise ExportError(
            f"the {exporter} exporter fixed the batch size to {batch_dim.dim_value}: the module specializes it "
            "(e.g. int(x.shape[0]) or a reshape with a literal batch size); allow a static batch with --static-batch "
            "(static_batch=True), or make the module batch-size agnostic"
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


def _export(module, example_input, example_output, output_names, exporter, opset, dynamic_batch):
    try:
        if exporter == "dynamo":
            program = torch.onnx.export(
                module,
                (example_input,),
                dynamo=True,
                external_data=False,
                optimize=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM_NAME)},) if dynamic_batch else None,
                verbose=False,
            )
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(
            module,
            (example_input,),
            buffer,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=_dynamic_axes(example_input, example_output, output_names) if dynamic_batch else None,
            verbose=False,
        )
        return onnx.load_from_string(buffer.getvalue())
    except Exception as error:
        raise ExportError(f"torch.onnx ({exporter} exporter) failed: {_describe_failure(error)}") from error


def _dynamic_axes(example_input, example_output, output_names) -> dict[str, dict[int, str]]:
    # The TorchScript exporter needs every dynamic output axis named; an output
    # whose leading size equals the example's batch size is taken to be batched.
    batch = example_input.shape[0]
    axes = {INPUT_NAME: {0: BATCH_DIM_NAME}}
    for name, leaf in zip(output_names, flatten_outputs(example_output)):
        if leaf.dim() > 0 and leaf.shape[0] == batch:
            axes[name] = {0: BATCH_DIM_NAME}
    return axes


def _simplify(model: onnx.ModelProto, example_input: torch.Tensor, notes: list[str]) -> tuple[onnx.ModelProto, bool]:
    import onnxsim  # heavy import, only needed here

    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    try:
        simplified, check_ok = onnxsim.simplify(
            candidate,
            check_n=1,
            input_data={INPUT_NAME: example_input.detach().cpu().numpy()},
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


def _verify(data: bytes, batches: list[tuple[str, torch.Tensor]], references: list, rtol: float, exporter: str) -> ErrorStats:
    """ONNX Runtime against the module on every (label, batch), each output on its own scale (numerics.compare)."""
    session = ort_session(data)
    errors = ErrorAccumulator()
    for (label, batch), reference in zip(batches, references):
        try:
            candidate = run_onnx(session, batch)
            errors.add(reference, candidate)  # raises on count/shape mismatch
        except Exception as error:
            raise VerificationError(
                f"ONNX Runtime cannot reproduce the module on {label} {tuple(batch.shape)}: {_first_line(error)} "
                f"(a batch size other than the traced one failing means the {exporter} exporter baked it into the graph)"
            ) from error
        # inf - inf is NaN and inf / inf is NaN: a relative error cannot judge non-finite values, so none may pass.
        non_finite = sum(int(np.size(output) - np.count_nonzero(np.isfinite(output))) for output in candidate)
        if non_finite:
            raise VerificationError(
                f"ONNX Runtime gives {non_finite} non-finite values (inf or NaN) on {label} {tuple(batch.shape)}"
                + ("; so does the PyTorch module, so the file cannot be verified on these inputs"
                   if not all(torch.isfinite(r).all() for r in flatten_outputs(reference)) else "")
            )
    error_stats = errors.result()
    if not error_stats.within(rtol):
        sizes = sorted({int(batch.shape[0]) for _, batch in batches})
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
