"""The compile report as files: JSON for machines, Markdown for people, an entropy bar chart.

``compile()`` returns its report as a plain dict (see compiler.py for the keys);
:func:`with_export` adds the ONNX export under ``"onnx"``
(``ExportResult.to_dict()``) and ONNX Runtime's error under
``["verification"]["onnxruntime"]``. An ``analyze()`` result (the per-site
table alone) is accepted everywhere a report is, bare or under ``"analysis"``.

Every file is written atomically (fileio.py): an existing file is replaced only
with ``force``, and a failure leaves no partial file behind.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from egp_export.io.fileio import check_outputs, write_text_atomic
from egp_export.report.messages import describe_reason

if TYPE_CHECKING:  # onnx_export imports onnx and onnxruntime; reports are written without them
    from egp_export.export.onnx import ExportResult

REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
ENTROPY_PLOT = "entropy.png"
ONNX_MODEL = "model.onnx"
# What each command writes into its --out folder.
ANALYZE_OUTPUTS = (REPORT_JSON, REPORT_MARKDOWN)
COMPILE_OUTPUTS = (ONNX_MODEL, REPORT_JSON, REPORT_MARKDOWN, ENTROPY_PLOT)

_MISSING = "—"


def with_export(report: dict, export: ExportResult, *, path: str | os.PathLike | None = None) -> dict:
    """A copy of a compile report with the ONNX export and its ONNX Runtime check added.

    ``path``: where the file will be once the run's outputs are moved into
    place (fileio.run_transaction), when the export wrote it to a staging folder.
    """
    verification = dict(report.get("verification") or {})
    if export.error is not None:
        verification["onnxruntime"] = {
            **export.error.to_dict(),
            "rtol": export.rtol,
            "passed": True,
            "verified_samples": export.verified_samples,
            "batch_sizes": list(export.verified_batch_sizes),  # every sample alone (1) and batched
            "warnings": list(export.warnings),
        }
    onnx = export.to_dict()
    if path is not None:
        onnx["path"] = str(path)
    return {**report, "verification": verification, "onnx": onnx}


def is_linearized(site: dict) -> bool:
    """Whether the compile replaced this site by an affine map (an analysis row: whether it could)."""
    if "linearized" in site:
        return bool(site["linearized"])
    return bool(site.get("linear"))


def analysis_of(report: dict) -> dict:
    """The per-site analysis of a compile report, or the report itself if it is an ``analyze()`` result."""
    if "sites" in report:
        return report
    return report.get("analysis") or {"sites": []}


def to_json(report: dict) -> str:
    """The report as strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    return json.dumps(_strict(report), indent=2, allow_nan=False) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike, *, force: bool = False) -> dict[str, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; return their paths by file name.

    Both paths are checked before either is written, so an existing
    ``report.md`` (without ``force``) does not leave a fresh ``report.json``
    beside a stale one.
    """
    paths = check_outputs(out_dir, ANALYZE_OUTPUTS, force=force)
    write_text_atomic(paths[REPORT_JSON], to_json(report), force=force)
    write_text_atomic(paths[REPORT_MARKDOWN], to_markdown(report), force=force)
    return paths


# Markdown ---------------------------------------------------------------


def to_markdown(report: dict) -> str:
    """A readable Markdown rendering of a compile report (or of an ``analyze()`` result)."""
    compiled = "before" in report and "after" in report
    title = "egp-export compile report" if compiled else "egp-export activation analysis"
    lines = [f"# {title}", ""]
    lines += _header(report)
    if compiled:
        lines += _summary(report)
    else:
        lines += _analysis_summary(analysis_of(report))
    lines += _site_table(analysis_of(report), with_action=compiled)
    if compiled:
        lines += _rewrites(report.get("rewrites", []))
        lines += _refusals(report.get("refusals", []))
        lines += _withdrawals(report.get("withdrawals", []))
        lines += _guarantee(report)
    for measure, rows in report.get("measures", {}).items():
        lines += _measure_table(measure, rows)
    if report.get("onnx"):
        lines += _onnx(report["onnx"])
    return "\n".join(lines).rstrip() + "\n"


def _header(report: dict) -> list[str]:
    facts = []
    if "egp_export_version" in report:
        facts.append(f"egp-export {report['egp_export_version']}")
    if "tolerance" in report:
        facts.append(f"tolerance {report['tolerance']:g}")
    calibration = report.get("calibration") or {}
    if "samples" in calibration:
        held = calibration.get("holdout_samples")
        shape = "×".join(str(size) for size in calibration.get("sample_shape", []))
        text = f"calibration: {calibration['samples']} samples"
        if held:
            text += f" (+{held} held out for verification)"
        if "split_seed" in calibration:
            text += f", split by a permutation seeded with {calibration['split_seed']}"
        distinct = calibration.get("distinct_decide_samples")
        if distinct is not None and distinct < calibration.get("decide_samples", distinct):
            text += f", {distinct} distinct of {calibration['decide_samples']} samples decided on"
        if shape:
            text += f", sample shape {shape}"
        preprocessing = calibration.get("preprocessing")
        if preprocessing:
            text += f", images scaled {preprocessing.get('scale', 'pixels / 255')}"
            if preprocessing.get("mean") is not None:
                text += (f" then normalised with mean {preprocessing['mean']} and std {preprocessing['std']} "
                         f"({preprocessing.get('source', '')})")
        facts.append(text)
    if "compile_seconds" in report:
        facts.append(f"compiled in {report['compile_seconds']:.2f} s")
    return [" · ".join(facts), ""] if facts else []


def _summary(report: dict) -> list[str]:
    before, after = report["before"], report["after"]
    rows = [
        ("depth (longest conv/linear chain)", "depth"),
        ("conv/linear layers", "layers"),
        ("nonlinear activations", "activations"),
        ("parameters", "params"),
        ("MACs per sample", "macs"),
    ]
    lines = ["## Summary", "", "| | before | after |", "|---|---:|---:|"]
    for label, key in rows:
        lines.append(f"| {label} | {_count(before.get(key))} | {_count(after.get(key))} |")
    predicted = report.get("predicted_conv_latency_us")
    if predicted:
        lines.append(
            f"| predicted conv latency, µs ({predicted.get('cost_model', 'cost model')}) | "
            f"{_number(predicted.get('before'))} | {_number(predicted.get('after'))} |"
        )
    measured = report.get("measured_latency")
    if measured:
        lines.append(
            f"| measured latency, ms ({measured.get('backend', '')}) | {_number(measured.get('original_ms'))} | "
            f"{_number(measured.get('compiled_ms'))} |"
        )
        low, high = measured.get("ci", [None, None])
        lines += [
            "",
            f"**Speedup:** measured {_number(measured.get('speedup'))} "
            f"({100 * measured.get('confidence', 0.95):.0f}% interval {_number(low)}-{_number(high)}), "
            f"predicted by the cost model {_number(measured.get('predicted_speedup'))}.",
        ]
    sites = analysis_of(report).get("sites", [])
    lines += ["", f"**Activations linearized:** {report.get('activations_linearized', 0)} of {len(sites)} sites.", ""]
    lines += _verification(report.get("verification") or {})
    return lines


def _verification(verification: dict) -> list[str]:
    checks = [
        ("PyTorch: compiled vs original, held-out inputs", verification.get("pytorch")),
        ("ONNX Runtime: exported file vs compiled module", verification.get("onnxruntime")),
    ]
    checks = [(label, stats) for label, stats in checks if stats]
    if not checks:
        return []
    lines = [
        "| check | samples | top-1 agreement | top-5 agreement | min cosine | max abs error | max rel error | "
        "allowed rel | passed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, stats in checks:
        passed = stats.get("passed")
        lines.append(
            f"| {label} | {_count(stats.get('samples'))} | {_percent(stats.get('top1_agreement'))} | "
            f"{_percent(stats.get('top5_agreement'))} | {_cosine(stats.get('cosine_min'))} | "
            f"{_error(stats.get('max_abs'))} | {_error(stats.get('max_rel'))} | "
            f"{_error(stats.get('rtol'))} | {_MISSING if passed is None else ('yes' if passed else 'NO')} |"
        )
    lines.append("")
    lines.append(
        "Top-1 agreement: the share of samples whose predicted class (arg-max of a class-score output, [batch, "
        "classes] or per token of [batch, tokens, classes]) is the reference's; top-5: the reference's class among "
        "the candidate's five highest scores (5+ classes); cosine: each sample's output against the reference's, "
        "the lowest over samples and outputs. — where an output has no class scores."
    )
    lines.append("")
    lines.append(
        "Relative error = max |candidate − reference| / max |reference|, each output tensor on its own scale (the "
        "worst output is shown), and each sample on its own scale (floored at a tenth of the output's)."
        + (
            f" The original model's own fp32 rounding noise (vs fp64) was {_error(verification['fp32_noise'])}."
            if verification.get("fp32_noise") is not None
            else ""
        )
    )
    lines.append("")
    return lines


def agreement_summary(stats: dict | None, where: str) -> str:
    """``top-1 agreement 100.00% on 2,000 held-out samples, top-5 100.00%, cosine >= 0.999999`` from a
    verification entry of a report (ErrorStats.to_dict()); "" when it holds no samples."""
    if not stats or not stats.get("samples"):
        return ""
    samples = f"{stats['samples']:,} {where} sample{'s' if stats['samples'] != 1 else ''}"
    if stats.get("top1_agreement") is None:
        text = f"no class-score output (top-1 agreement not defined) on {samples}"
    else:
        text = f"top-1 agreement {_percent(stats['top1_agreement'])} on {samples}"
        if stats.get("top5_agreement") is not None:
            text += f", top-5 {_percent(stats['top5_agreement'])}"
    if stats.get("cosine_min") is not None:
        text += f", cosine similarity >= {_cosine(stats['cosine_min'])}"
    return text


def _percent(value) -> str:
    return _MISSING if value is None else f"{100 * value:.2f}%"


def _cosine(value) -> str:
    return _MISSING if value is None else f"{value:.6f}"


def _analysis_summary(analysis: dict) -> list[str]:
    sites = analysis.get("sites", [])
    return [
        "## Summary",
        "",
        f"- activation sites: {analysis.get('num_sites', len(sites))}",
        f"- linear on the calibration data (would be linearized): {analysis.get('num_linear_sites', 0)}",
        f"- zero-entropy sites: {analysis.get('zero_entropy_sites', 0)}",
        f"- mean entropy: {_number(analysis.get('mean_entropy'))} bits",
        f"- dead neurons (always off, removable): {sum(int(site.get('dead_neurons') or 0) for site in sites)}",
        "",
    ]


def _site_table(analysis: dict, *, with_action: bool) -> list[str]:
    sites = analysis.get("sites", [])
    lines = ["## Activation sites", ""]
    if not sites:
        return lines + ["The model has no activation call sites.", ""]
    lines += [
        "One row per call site (a module called twice has two rows). Entropy is EGP's: the mean over "
        "neurons of the binary entropy of P(z > 0), in bits; 0 means every neuron is always on or always off. "
        "Region fractions are the shares of observations in each linear region of the activation, from the "
        "lowest inputs up (ReLU: off / on). Min margin is the smallest distance of any input to a region "
        "boundary.",
        "",
    ]
    header = ["site", "activation", "neurons", "entropy", "regions", "constant", "dead", "min margin"]
    header.append("action" if with_action else "linear")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---", "---:", "---:", "---", "---:", "---:", "---:", "---"]) + "|")
    for site in sites:
        fractions = " / ".join(f"{fraction:.2f}" for fraction in site.get("region_fractions", []))
        if with_action:
            last = site.get("action", _MISSING)
        else:
            why = site.get("why_not_linear")
            last = "yes" if site.get("linear") else f"no: {describe_reason(why) if why else 'nonlinear'}"
        cells = [
            f"`{site['name']}`",
            str(site.get("activation", _MISSING)),
            _count(site.get("neurons")),
            _number(site.get("entropy")),
            fractions or _MISSING,
            _number(site.get("constant_fraction")),
            _count(site.get("dead_neurons")),
            _number(site.get("min_margin")),
            last,
        ]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return lines + [""]


def _rewrites(rewrites: list[dict]) -> list[str]:
    lines = ["## Rewrites", ""]
    if not rewrites:
        return lines + ["None: the compiled model has the original's structure.", ""]
    lines += ["| pass | nodes | what |", "|---|---|---|"]
    for rewrite in rewrites:
        nodes = ", ".join(f"`{node}`" for node in rewrite.get("nodes", []))
        lines.append(f"| {rewrite.get('pass', _MISSING)} | {_cell(nodes)} | {_cell(rewrite.get('action', ''))} |")
    return lines + [""]


def _refusals(refusals: list[dict]) -> list[str]:
    lines = ["## Refusals", ""]
    if not refusals:
        return lines + ["None.", ""]
    lines += ["Candidates a pass looked at and left alone, with the reason.", ""]
    lines += ["| pass | node | reason |", "|---|---|---|"]
    for refusal in refusals:
        lines.append(
            f"| {refusal.get('pass', _MISSING)} | `{_cell(refusal.get('node', ''))}` | {_cell(refusal.get('reason', ''))} |"
        )
    return lines + [""]


def _withdrawals(withdrawals: list[dict]) -> list[str]:
    if not withdrawals:
        return []
    lines = ["## Withdrawals", "", "Rewrites the data did not support, taken back before the final check.", ""]
    lines += ["| site | code | reason |", "|---|---|---|"]
    for row in withdrawals:
        lines.append(f"| `{_cell(row.get('node', ''))}` | {row.get('code', _MISSING)} | {_cell(row.get('reason', ''))} |")
    return lines + [""]


def _guarantee(report: dict) -> list[str]:
    guarantee, evidence = report.get("guarantee"), report.get("evidence") or []
    if not guarantee:
        return []
    lines = [
        "## Guarantee",
        "",
        f"Verified on {guarantee['verified_samples']} {guarantee['verified_on']}"
        + (f" ({guarantee['verified_new_samples']} distinct, not copies of decide samples)" if "verified_new_samples" in guarantee
           else "")
        + f": max_rel {_error(guarantee['max_rel'])} "
        f"<= allowed {guarantee['allowed']:g} ({guarantee['dtype']}, tolerance {guarantee['tolerance']:g}). "
        f"{guarantee['site_bound']}.",
        "",
    ]
    if evidence:
        lines += [
            "| site | distinct samples | observations per neuron | min margin | crossing rate < (95%) |",
            "|---|---|---|---|---|",
        ]
        for row in evidence:
            samples = row.get("distinct_samples", row.get("samples"))
            lines.append(
                f"| `{row['site']}` | {_count(samples)} | {_count(row.get('observations_per_neuron'))} | "
                f"{_number(row.get('min_margin'))} | {_number(row.get('crossing_rate_bound_95'))} |"
            )
        lines.append("")
    return lines


def _measure_table(measure: str, rows: list[dict]) -> list[str]:
    lines = [f"## Layer measure: {measure}", "", "| name | value |", "|---|---|"]
    lines += [f"| `{_cell(str(row['name']))}` | {_number(row['value'])} |" for row in rows]
    return lines + [""]


def _onnx(onnx: dict) -> list[str]:
    lines = ["## ONNX export", ""]
    facts = [
        f"file: `{onnx.get('path', _MISSING)}`",
        f"exporter: {onnx.get('exporter', _MISSING)}, opset {onnx.get('opset', _MISSING)}",
        f"why this exporter: {_cell(onnx.get('exporter_reason', _MISSING))}",
        f"onnx-simplifier applied: {'yes' if onnx.get('simplified') else 'no'}",
    ]
    error = onnx.get("error")
    if error:
        allowed = _error(onnx.get("rtol")) + (" (measured from the model's own fp32 noise)" if onnx.get("rtol_measured") else "")
        agreement = agreement_summary(error, "verify")
        facts.append(
            f"ONNX Runtime vs PyTorch: {agreement + '; ' if agreement else ''}max abs {_error(error.get('max_abs'))}, "
            f"max rel {_error(error.get('max_rel'))} (allowed {allowed})"
        )
    lines += [f"- {fact}" for fact in facts]
    lines += _fp16(onnx.get("fp16"))
    attempts = onnx.get("failed_attempts") or []
    if attempts:
        lines += ["", "Export attempts that failed before the one used:", ""]
        lines += ["| exporter | batch | why it failed |", "|---|---|---|"]
        for attempt in attempts:
            batch = "dynamic" if attempt.get("dynamic_batch") else "static"
            lines.append(f"| {attempt.get('exporter', _MISSING)} | {batch} | {_cell(attempt.get('failure', ''))} |")
        lines.append("")
    for note in onnx.get("notes", []):
        lines.append(f"- note: {_cell(note)}")
    lines.append("")
    exported = onnx.get("op_counts_exported") or {}
    written = onnx.get("op_counts") or {}
    if exported or written:
        lines += [
            "ONNX op counts, as torch.onnx exported the compiled module and as written (after onnx-simplifier):",
            "",
            "| op | exported | written |",
            "|---|---:|---:|",
        ]
        for op in sorted(set(exported) | set(written)):
            lines.append(f"| {op} | {exported.get(op, 0)} | {written.get(op, 0)} |")
        lines.append(f"| **total** | **{sum(exported.values())}** | **{sum(written.values())}** |")
        lines.append("")
    return lines


def _fp16(fp16: dict | None) -> list[str]:
    """The fp16 file's check and the nodes it keeps in fp32 (export/fp16.py)."""
    if not fp16:
        return []
    error, file_error = fp16.get("error") or {}, fp16.get("file_error") or {}
    top1 = "; ".join(f"top-1 agreement {share:.2%} on {name}" for name, share in (fp16.get("top1_agreement") or {}).items())
    lines = [
        f"- fp16 file, on {fp16.get('samples', _MISSING)} held-out samples: max rel {_error(error.get('max_rel'))} "
        f"emulated in fp16, {_error(file_error.get('max_rel'))} as ONNX Runtime CPU runs it (allowed "
        f"{_error(fp16.get('rtol'))}: {fp16.get('noise_factor', _MISSING)} x the fp16 noise of "
        f"{fp16.get('noise_source', _MISSING)}, {_error(fp16.get('noise'))})" + (f"; {top1}" if top1 else ""),
        f"- nodes kept fp32: {len(fp16.get('kept_fp32') or [])} of {fp16.get('nodes', _MISSING)}",
    ]
    lines += [f"  - `{_cell(kept['node'])}` ({kept['op_type']}): {_cell(kept['text'])}" for kept in fp16.get("kept_fp32") or []]
    return lines


# Formatting -------------------------------------------------------------


def _count(value) -> str:
    return _MISSING if value is None else f"{int(value):,}"


def _number(value) -> str:
    if value is None:
        return _MISSING
    return f"{float(value):.3g}"


def _error(value) -> str:
    if value is None:
        return _MISSING
    value = float(value)
    return "0" if value == 0 else f"{value:.2e}"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(key): _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
