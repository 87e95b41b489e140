"""The CI latency gate: is the candidate at least S times faster than the baseline, and still correct?

``gate()`` times both ONNX models interleaved on one backend
(profiler.compare) and passes when the **lower** bound of the bootstrap
confidence interval of the speedup (baseline / candidate median latency)
reaches ``min_speedup``: a noisy runner widens the interval and fails the
gate rather than letting a lucky run through. With ``max_rel_error`` the
candidate's outputs must also be within that relative error of the baseline's
(numerics.compare: max |Δ| / max |baseline|, each output on its own scale, and
each sample on its own, floored, scale); an inf or NaN in either that the other
does not have at the same place fails it. With ``min_top1_agreement`` the
candidate's predicted class (arg-max of each class-score output) must be the
baseline's on at least that fraction of the samples.

The numeric check runs on ``inputs`` (a user's held-out data: ``--inputs``)
when given, else on seeded random inputs (runtime/inputs.py says how they are
drawn), and then says so: a compile that linearized activations is exact on
the data it was calibrated for and may be far off on N(0, 1) noise, so only a
check on real data says whether it is right. The timing runs on the first
``batch_size`` samples of ``inputs``, or on random inputs.

Writers: JUnit XML (one test case per check, for CI test reports) and a
Markdown summary (for ``$GITHUB_STEP_SUMMARY`` and pull-request comments);
both atomic, neither overwrites without ``force``. ``GateResult.verdict()`` is
the one line a CI log ends with.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from egp_export.analysis.numerics import ErrorAccumulator, ErrorStats
from egp_export.io.fileio import write_text_atomic
from egp_export.runtime.backends import DEFAULT_BACKEND, DEFAULT_THREADS, BackendError, get_backend
from egp_export.runtime.inputs import (
    ENGINE_SUFFIXES,
    InputOrigin,
    data_input_shape,
    feed_length,
    feed_slice,
    fitted_feed,
    onnx_inputs,
    random_origin,
)
from egp_export.runtime.profiler import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_ROUND_ITERATIONS,
    DEFAULT_ROUNDS,
    DEFAULT_WARMUP,
    Comparison,
    check_same_inputs,
    fed_to,
)
from egp_export.runtime.profiler import compare as compare_latency

EXIT_PASSED = 0
EXIT_FAILED = 1
# Samples of seeded random input the numeric check runs both models on without --inputs.
NUMERIC_SAMPLES = 8
NUMERIC_SEED = 4321
# Samples per run of a user's inputs (a model with a fixed batch size runs at that size).
NUMERIC_BATCH = 64


@dataclass
class NumericCheck:
    """Candidate vs baseline outputs on the same inputs."""

    error: ErrorStats | None  # None when the outputs could not be compared at all
    max_rel_error: float | None  # None: the error is reported, not required
    samples: int
    problem: str = ""  # why the outputs could not be compared (count or shape mismatch)
    notes: list[str] = field(default_factory=list)  # output dtypes that differ, conversions of the inputs
    min_top1_agreement: float | None = None
    origin: InputOrigin | None = None  # what the check ran on

    @property
    def error_passed(self) -> bool:
        """Within ``max_rel_error``; without one, only an inf/NaN where the other model has none fails."""
        if self.error is None:
            return False
        if self.max_rel_error is None:
            return not self.error.nonfinite_mismatches
        return self.error.within(self.max_rel_error)

    @property
    def agreement_passed(self) -> bool:
        if self.min_top1_agreement is None:
            return self.error is not None
        agreement = None if self.error is None else self.error.top1_agreement
        return agreement is not None and agreement >= self.min_top1_agreement

    @property
    def passed(self) -> bool:
        return self.error_passed and self.agreement_passed

    @property
    def real_data(self) -> bool:
        return self.origin is not None and self.origin.real

    def describe(self) -> str:
        """Agreement first, then the error, then what it ran on (and whether that is real data)."""
        if self.error is None:
            return f"outputs not comparable: {self.problem}"
        parts = []
        top1 = self.error.top1_agreement
        if top1 is not None:
            required = ""
            if self.min_top1_agreement is not None:
                required = f" {'≥' if self.agreement_passed else '<'} required {self.min_top1_agreement:.2%}"
            parts.append(f"top-1 agreement {top1:.2%}{required}")
        worst = max(self.error.max_rel, self.error.sample_rel)
        if self.max_rel_error is not None:
            parts.append(f"max rel error {worst:.2e} {'≤' if self.error_passed else '>'} {self.max_rel_error:.0e}")
        else:
            parts.append(f"max rel error {worst:.2e}")
        where = self.origin.describe() if self.origin is not None else f"{self.samples} samples"
        return ", ".join(parts) + f" on {where}"

    def to_dict(self) -> dict:
        return {
            "error": None if self.error is None else self.error.to_dict(),
            "max_rel_error": self.max_rel_error,
            "min_top1_agreement": self.min_top1_agreement,
            "samples": self.samples,
            "inputs": None if self.origin is None else self.origin.to_dict(),
            "real_data": self.real_data,
            "problem": self.problem,
            "notes": list(self.notes),
            "passed": self.passed,
        }


@dataclass
class GateResult:
    """The gate's decision and the evidence for it."""

    comparison: Comparison
    min_speedup: float
    numeric: NumericCheck | None = None
    reasons: list[str] = field(default_factory=list)  # why it failed; empty when it passed
    notes: list[str] = field(default_factory=list)  # differences that do not fail the gate (input/output dtypes)

    @property
    def latency_passed(self) -> bool:
        return self.comparison.ci[0] >= self.min_speedup

    @property
    def passed(self) -> bool:
        return self.latency_passed and (self.numeric is None or self.numeric.passed)

    @property
    def exit_code(self) -> int:
        return EXIT_PASSED if self.passed else EXIT_FAILED

    def verdict(self) -> str:
        """One line: PASS/FAIL, the speedup with its interval against the threshold, the numeric check, the setup."""
        c = self.comparison
        low, high = c.ci
        level = f"{c.confidence:.0%} CI"
        relation = "≥" if self.latency_passed else "<"
        parts = [
            f"speedup {c.speedup:.2f}x ({level} {low:.2f}–{high:.2f}x, lower bound {low:.2f}x {relation} required "
            f"{self.min_speedup:.2f}x)"
        ]
        if self.numeric is not None:
            parts.append(self.numeric.describe())
        parts += self.notes
        setup = f"{c.backend.get('backend')}, batch {c.batch_size}, {c.baseline_rounds.shape[0]} rounds"
        return f"egp-export gate: {'PASS' if self.passed else 'FAIL'}: " + "; ".join(parts) + f" [{setup}]"

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "latency_passed": self.latency_passed,
            "min_speedup": self.min_speedup,
            "numeric": None if self.numeric is None else self.numeric.to_dict(),
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "verdict": self.verdict(),
            "comparison": self.comparison.to_dict(),
        }


def evaluate(
    comparison: Comparison, min_speedup: float, numeric: NumericCheck | None = None, notes: Sequence[str] = ()
) -> GateResult:
    """The decision for a finished comparison (and numeric check): pure, no timing."""
    notes = list(notes) + (numeric.notes if numeric is not None else [])
    result = GateResult(comparison=comparison, min_speedup=min_speedup, numeric=numeric, notes=notes)
    low = comparison.ci[0]
    if not result.latency_passed:
        result.reasons.append(
            f"the speedup's {comparison.confidence:.0%} confidence interval starts at {low:.3f}x, below the required "
            f"{min_speedup:.3f}x (point estimate {comparison.speedup:.3f}x)"
        )
    if numeric is not None:
        result.reasons += _numeric_reasons(numeric)
    return result


def _numeric_reasons(numeric: NumericCheck) -> list[str]:
    """Why the numeric check failed: the outputs, the error, the agreement (empty when it passed)."""
    error = numeric.error
    if error is None:
        return [f"the candidate's outputs cannot be compared with the baseline's: {numeric.problem}"]
    reasons = []
    if error.nonfinite_mismatches:
        # Non-finite values are never within tolerance unless both models give the same inf/NaN there.
        reasons.append(
            f"{error.nonfinite_mismatches} output values are inf/NaN in the baseline or the candidate but "
            f"not the same in both (first in sample {error.first_bad_sample})"
        )
    elif not numeric.error_passed:
        reasons.append(
            f"the candidate's outputs differ from the baseline's by {error.describe()} "
            f"> {numeric.max_rel_error:g} (each output on its own scale)"
        )
    if not numeric.agreement_passed and not error.nonfinite_mismatches:
        where = numeric.origin.describe() if numeric.origin is not None else f"{numeric.samples} samples"
        reasons.append(
            f"the candidate predicts the baseline's class (top-1) on {error.top1_agreement:.2%} of {where}, below "
            f"the required {numeric.min_top1_agreement:.2%}"
        )
    return reasons


def check_inputs(
    baseline_onnx,
    candidate_onnx,
    input_shape: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    inputs=None,
    inputs_source: str = "inputs",
) -> list[str]:
    """Refuse two ONNX models that take different inputs (names, shapes); notes on input dtypes that differ.

    The gate compares two versions of one model on the same inputs: a mismatch
    is a usage error (BackendError, exit 2), not a failed gate (exit 1, which CI
    reads as "too slow or wrong"). A dtype difference (an fp16 candidate) is
    allowed: the candidate gets the baseline's inputs cast to its dtype, and the
    result says so. ``inputs`` (a user's batch) size the dynamic dimensions when
    no ``input_shape`` is given, and must name the models' inputs.
    """
    if not all(_is_onnx(model) for model in (baseline_onnx, candidate_onnx)):
        return []
    baseline, candidate = (
        onnx_inputs(model, _shape_for(model, input_shape, inputs, inputs_source), dims)
        for model in (baseline_onnx, candidate_onnx)
    )
    fixed = {baseline.fixed_batch, candidate.fixed_batch} - {None}
    if len(fixed) > 1:
        raise BackendError(
            f"the models have different fixed batch sizes ({', '.join(map(str, sorted(fixed)))}); the gate compares two "
            "versions of one model, so export both for the same input shape."
        )
    check_same_inputs(baseline, candidate)
    return [
        f"input {b.name!r} dtype differs: baseline {np.dtype(b.dtype)}, candidate {np.dtype(c.dtype)}"
        if len(baseline.specs) > 1
        else f"input dtype differs: baseline {np.dtype(b.dtype)}, candidate {np.dtype(c.dtype)}"
        for b, c in zip(baseline.specs, candidate.specs)
        if np.dtype(b.dtype) != np.dtype(c.dtype)
    ]


def _is_onnx(model) -> bool:
    return Path(model).suffix.lower() not in ENGINE_SUFFIXES


def _shape_for(model, input_shape, inputs, source: str):
    """The per-sample shape(s) to prepare ``model`` with: ``input_shape``, else the user's data's, else none."""
    if input_shape is not None or inputs is None:
        return input_shape
    return data_input_shape(model, inputs, source)


def _output_dtype_notes(reference: list, candidate: list) -> list[str]:
    return [
        f"output {index} dtype differs: baseline {a.dtype}, candidate {b.dtype}"
        for index, (a, b) in enumerate(zip(reference, candidate))
        if a.dtype != b.dtype
    ]


def check_numerics(
    baseline_onnx,
    candidate_onnx,
    *,
    max_rel_error: float | None = None,
    min_top1_agreement: float | None = None,
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
    backend: str = DEFAULT_BACKEND,
    input_shape: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = NUMERIC_SAMPLES,
    seed: int = NUMERIC_SEED,
    threads: int = DEFAULT_THREADS,
    backend_options: dict | None = None,
) -> NumericCheck:
    """Both models on the same inputs, on ``backend``: the candidate's error and agreement against the baseline.

    ``inputs`` (a batch ``[N, ...]``: tensor or array for a one-input model, else a dict with one per ONNX
    input name, or a tuple in the file's input order; ``inputs_source`` names it; they also size dynamic
    dimensions, which ``dims`` sizes by name otherwise) are checked in runs of ``NUMERIC_BATCH`` samples, or of
    the model's fixed batch size (whole runs only). Without them, ``samples`` seeded random samples
    (``val_range``: runtime/inputs.py), or the model's fixed
    batch size if it has one; the result then says it is not on real data.
    """
    check_inputs(baseline_onnx, candidate_onnx, input_shape, dims, inputs, inputs_source)
    shapes = [_shape_for(model, input_shape, inputs, inputs_source) for model in (baseline_onnx, candidate_onnx)]
    fixed = onnx_inputs(baseline_onnx, shapes[0], dims).fixed_batch if _is_onnx(baseline_onnx) else None
    runners = [get_backend(backend, threads=threads, **(backend_options or {})) for _ in range(2)]
    notes: list[str] = []
    try:
        if inputs is None:
            samples = fixed or samples
            for runner, model in zip(runners, (baseline_onnx, candidate_onnx)):
                runner.prepare(model, input_shape=input_shape, batch_sizes=(samples,), dims=dims)
            spec = runners[0].inputs
            data, origin = spec.random_batch(samples, seed, val_range), random_origin(spec, samples, val_range)
        else:
            if _is_onnx(baseline_onnx):
                spec = onnx_inputs(baseline_onnx, shapes[0], dims)
            else:  # an engine file: its backend reads the inputs
                runners[0].prepare(baseline_onnx, input_shape=shapes[0], batch_sizes=(fixed or 1,), dims=dims)
                spec = runners[0].inputs
            data = fitted_feed(inputs, spec, inputs_source, notes)
            data = _whole_runs(data, fixed, inputs_source, notes)
            origin = InputOrigin(inputs_source, True, feed_length(data))
        step = fixed or NUMERIC_BATCH
        runs = [feed_slice(data, start, start + step) for start in range(0, feed_length(data), step)]
        sizes = tuple(sorted({feed_length(run) for run in runs}))
        for runner, model, shape in zip(runners, (baseline_onnx, candidate_onnx), shapes):
            runner.prepare(model, input_shape=shape, batch_sizes=sizes, dims=dims)
        errors, problem = ErrorAccumulator(), ""
        for run in runs:
            reference = runners[0].run(fed_to(runners[0].inputs, run))
            candidate = runners[1].run(fed_to(runners[1].inputs, run))  # cast to the candidate's dtypes
            try:
                errors.add(reference, candidate)
            except ValueError as mismatch:  # output count or shape differs
                problem = str(mismatch)
                break
        error = None if problem else errors.result()
    finally:
        for runner in runners:
            runner.close()
    if error is not None:
        notes += _output_dtype_notes(reference, candidate)
    if min_top1_agreement is not None and error is not None and error.top1_agreement is None and not error.nonfinite_mismatches:
        shapes = ", ".join(f"{output.output}" for output in error.outputs)
        raise BackendError(
            f"--min-top1-agreement compares predicted classes, and the model has no class-score output (a float "
            f"[batch, classes] or [batch, tokens, classes] with 2+ classes) among {shapes}; use --max-rel-error."
        )
    return NumericCheck(error=error, max_rel_error=max_rel_error, samples=origin.samples, problem=problem, notes=notes,
                        min_top1_agreement=min_top1_agreement, origin=origin)


def _whole_runs(data: dict, fixed: int | None, source: str, notes: list[str]) -> dict:
    """A model with a fixed batch size runs whole batches only: the samples that do not fill one are left out."""
    length = feed_length(data)
    if fixed is None or length % fixed == 0:
        return data
    if length < fixed:
        raise BackendError(f"{source} holds {length} samples; the model's fixed batch size is {fixed}: give at least {fixed}.")
    kept = length - length % fixed
    notes.append(f"{source}: the model runs batches of {fixed}, so the last {length - kept} samples are not checked")
    return feed_slice(data, 0, kept)


def gate(
    baseline_onnx: str | os.PathLike,
    candidate_onnx: str | os.PathLike,
    *,
    min_speedup: float,
    max_rel_error: float | None = None,
    min_top1_agreement: float | None = None,
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
    backend: str = DEFAULT_BACKEND,
    batch_size: int = 1,
    input_shape: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    rounds: int = DEFAULT_ROUNDS,
    iterations: int = DEFAULT_ROUND_ITERATIONS,
    warmup: int = DEFAULT_WARMUP,
    order: str = "alternate",
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    threads: int = DEFAULT_THREADS,
    backend_options: dict | None = None,
    progress: bool = False,
) -> GateResult:
    """Decide whether ``candidate_onnx`` is at least ``min_speedup`` times faster than ``baseline_onnx``.

    Passes when the lower bound of the speedup's bootstrap interval (at
    ``confidence``) is ≥ ``min_speedup``, if ``max_rel_error`` is given the
    candidate's outputs are within it of the baseline's, and if
    ``min_top1_agreement`` is given the candidate predicts the baseline's class
    on at least that fraction of the samples. The numeric check runs when any of
    these or ``inputs`` is given (:func:`check_numerics`: on ``inputs``, else on
    random inputs, and says which), first: it is cheap and a wrong model need not
    be timed precisely. The timing runs on the first ``batch_size`` samples of
    ``inputs``, else on random ones; its other arguments are those of
    :func:`egp_export.runtime.profiler.compare`.
    """
    if min_top1_agreement is not None and not 0.0 <= min_top1_agreement <= 1.0:
        raise BackendError(f"min_top1_agreement is a fraction in [0, 1], got {min_top1_agreement}.")
    if not min_speedup > 0:
        raise ValueError(f"min_speedup must be positive, got {min_speedup}")
    notes = check_inputs(baseline_onnx, candidate_onnx, input_shape, dims, inputs, inputs_source)
    numeric = None
    if max_rel_error is not None or min_top1_agreement is not None or inputs is not None:
        numeric = check_numerics(
            baseline_onnx,
            candidate_onnx,
            max_rel_error=max_rel_error,
            min_top1_agreement=min_top1_agreement,
            inputs=inputs,
            inputs_source=inputs_source,
            val_range=val_range,
            backend=backend,
            input_shape=input_shape,
            dims=dims,
            threads=threads,
            backend_options=backend_options,
        )
    comparison = compare_latency(
        baseline_onnx,
        candidate_onnx,
        backend=backend,
        batch_size=batch_size,
        input_shape=input_shape,
        dims=dims,
        inputs=inputs,
        inputs_source=inputs_source,
        val_range=val_range,
        rounds=rounds,
        iterations=iterations,
        warmup=warmup,
        order=order,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        threads=threads,
        backend_options=backend_options,
        progress=progress,
    )
    return evaluate(comparison, min_speedup, numeric, notes)


# Writers ---------------------------------------------------------------------------------------


def to_junit_xml(result: GateResult) -> str:
    """JUnit XML: one test case for latency and one for numerics (when checked), failures with the reason."""
    c = result.comparison
    seconds = float(c.baseline_rounds.sum() + c.candidate_rounds.sum()) / 1000.0
    cases = [("latency", f"speedup >= {result.min_speedup:g}x", result.latency_passed, seconds)]
    numeric = result.numeric
    if numeric is not None and (numeric.max_rel_error is not None or numeric.min_top1_agreement is None):
        required = "reported" if numeric.max_rel_error is None else f"<= {numeric.max_rel_error:g}"
        cases.append(("numerics", f"max relative error {required}", numeric.error_passed, 0.0))
    if numeric is not None and numeric.min_top1_agreement is not None:
        cases.append(("agreement", f"top-1 agreement >= {numeric.min_top1_agreement:.2%}", numeric.agreement_passed, 0.0))
    failures = sum(1 for _, _, ok, _ in cases if not ok)
    suites = ET.Element("testsuites", name="egp-export gate", tests=str(len(cases)), failures=str(failures))
    suite = ET.SubElement(
        suites,
        "testsuite",
        name="egp-export gate",
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
        time=f"{seconds:.3f}",
    )
    properties = ET.SubElement(suite, "properties")
    facts = {
        "baseline": c.baseline,
        "candidate": c.candidate,
        "backend": c.backend.get("backend", ""),
        "batch_size": c.batch_size,
        "speedup": f"{c.speedup:.4f}",
        "ci_low": f"{c.ci[0]:.4f}",
        "ci_high": f"{c.ci[1]:.4f}",
        "confidence": c.confidence,
        "rounds": c.baseline_rounds.shape[0],
        "iterations_per_round": c.baseline_rounds.shape[1],
        "timed_on": c.inputs,
    }
    if numeric is not None and numeric.origin is not None:
        facts["checked_on"] = numeric.origin.describe()
        facts["real_data"] = numeric.real_data
    for key, value in facts.items():
        ET.SubElement(properties, "property", name=key, value=str(value))
    reasons = iter(result.reasons)
    for kind, name, ok, case_seconds in cases:
        case = ET.SubElement(suite, "testcase", classname=f"egp_export.gate.{kind}", name=name, time=f"{case_seconds:.3f}")
        if not ok:
            reason = next(reasons, "failed")
            failure = ET.SubElement(case, "failure", message=reason, type="GateFailure")
            failure.text = result.verdict()
    ET.SubElement(suite, "system-out").text = result.verdict()
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _shapes_text(c: Comparison) -> str:
    if len(c.input_shapes) > 1:
        return ", ".join(f"{name} {'×'.join(map(str, shape))}" for name, shape in c.input_shapes.items())
    return "×".join(map(str, c.input_shape))


def to_markdown(result: GateResult) -> str:
    """A Markdown summary: verdict, latency table, numerics, and the reasons of a failure."""
    c = result.comparison
    base, cand = c.baseline_stats, c.candidate_stats
    settings = ", ".join(f"{key} {value}" for key, value in c.backend.items() if key != "backend")
    mark = "✅ PASS" if result.passed else "❌ FAIL"
    lines = [
        f"## egp-export latency gate: {mark}",
        "",
        f"`{result.verdict()}`",
        "",
        f"Backend **{c.backend.get('backend')}**"
        + (f" ({settings})" if settings else "")
        + f", batch {c.batch_size}, input {_shapes_text(c)}; {c.baseline_rounds.shape[0]} interleaved "
        f"rounds × {c.baseline_rounds.shape[1]} iterations per model, clock: {c.clock}.",
        "",
        "| model | file | median ms | p90 ms | p99 ms | mean ms | std ms |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| baseline | `{c.baseline}` | {base.median:.4f} | {base.p90:.4f} | {base.p99:.4f} | {base.mean:.4f} | {base.std:.4f} |",
        f"| candidate | `{c.candidate}` | {cand.median:.4f} | {cand.p90:.4f} | {cand.p99:.4f} | {cand.mean:.4f} "
        f"| {cand.std:.4f} |",
        "",
        f"**Speedup** (baseline / candidate median latency): **{c.speedup:.3f}x**, {c.confidence:.0%} bootstrap "
        f"confidence interval {c.ci[0]:.3f}–{c.ci[1]:.3f}x ({c.resamples} resamples of whole rounds, seed {c.seed}); "
        f"required: lower bound ≥ {result.min_speedup:.3f}x. Per-round speedups ranged "
        f"{min(c.round_speedups):.3f}–{max(c.round_speedups):.3f}x.",
        "",
    ]
    if result.numeric is not None:
        n = result.numeric
        if n.error is None:
            lines.append(f"**Numerics:** outputs not comparable: {n.problem}.")
        else:
            where = n.origin.describe() if n.origin is not None else f"{n.samples} samples"
            allowed = [] if n.max_rel_error is None else [f"max rel error allowed {n.max_rel_error:.1e}"]
            if n.min_top1_agreement is not None:
                allowed.append(f"top-1 agreement required {n.min_top1_agreement:.2%}")
            lines.append(
                f"**Numerics** (candidate vs baseline on {where}): {n.error.agreement()}; max abs error "
                f"{n.error.max_abs:.3e}, max rel error {n.error.max_rel:.3e}"
                + (f"; {', '.join(allowed)}" if allowed else "")
                + f" — {'passed' if n.passed else 'FAILED'}."
            )
            if not n.real_data:
                lines += ["", "⚠️ The numeric check ran on random inputs, not real data: a compile is exact on the "
                          "data it was calibrated for, so pass held-out samples with `--inputs`."]
            for output in n.error.outputs:
                if output.cosine_mean is not None and len(n.error.outputs) > 1:
                    classes = "" if output.top1_agreement is None else f", top-1 agreement {output.top1_agreement:.2%}"
                    lines.append(f"- `{output.output}`: cosine similarity mean {output.cosine_mean:.6f}, min "
                                 f"{output.cosine_min:.6f}{classes}")
        lines.append("")
    if result.notes:
        lines += ["**Notes:**", ""] + [f"- {note}" for note in result.notes] + [""]
    if result.reasons:
        lines += ["**Why it failed:**", ""] + [f"- {reason}" for reason in result.reasons] + [""]
    return "\n".join(lines)


def write_junit(result: GateResult, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write :func:`to_junit_xml` atomically; refuses to overwrite without ``force``."""
    return write_text_atomic(path, to_junit_xml(result), force=force)


def write_summary(result: GateResult, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write :func:`to_markdown` atomically; refuses to overwrite without ``force``."""
    return write_text_atomic(path, to_markdown(result), force=force)
