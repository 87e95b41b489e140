"""``recheck``: does a compile's guarantee still hold on new data? The drift monitor, without recompiling.

A compile rests on two claims (report["guarantee"]): every neuron it
rewrote stays in the region it was decided in (a linearized ReLU neuron stays
ON, a masked dead neuron stays OFF, a smooth surrogate stays within the
tolerance of the activation), and the compiled model's outputs are within the
allowance of the original's. Both were measured on the calibration data.
``recheck`` measures them again on new data (production inputs, a new
dataset), from the original model and the compile's outputs alone:

- every rewritten site of the **original** model is re-measured on the data
  (analysis.stats.calibrate, the compile's own statistics) and compared with
  what the compile decided (report["regions"], analysis/regions.py): the
  neurons seen in another region, the dead neurons that fired, the surrogates
  off by more than the tolerance on the new input range;
- the compiled ONNX file runs in ONNX Runtime beside the original PyTorch
  model on the same data: max_rel per output by the compile's rule
  (numerics.ErrorAccumulator: each output on its own scale, each sample on its
  own floored scale), and top-1 agreement for outputs that are class scores
  (2-D, [samples, classes >= 2], floating).

The guarantee holds when no rewritten neuron left its region and every output
is within the compile's allowance (report["guarantee"]["allowed"]) plus the
ONNX Runtime allowance the file was verified with
(report["verification"]["onnxruntime"]["rtol"]): ONNX vs original is at most
ONNX vs compiled plus compiled vs original. Top-1 agreement is reported, not
judged (a near-tie may flip within fp32 rounding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from egp_export.analysis.batches import DEFAULT_BATCH_SIZE, as_batches, fitted_to
from egp_export.analysis.capture import capture
from egp_export.analysis.inputs import batch_size, call_on_copy, leaves, sample_shape, structured, take
from egp_export.analysis.numerics import ORT_CPU_RTOL, ErrorAccumulator, ErrorStats, output_leaves
from egp_export.analysis.regions import DEAD_MASKED, REGIONS_FORMAT, model_digest
from egp_export.analysis.stats import SiteStats, calibrate
from egp_export.analysis.trace import owned_copy
from egp_export.errors import CalibrationError, ReportError
from egp_export.export.onnx import ort_session
from egp_export.report.report import ONNX_MODEL, REPORT_JSON

EXIT_HOLDS = 0
EXIT_DRIFTED = 3
# Points of the grid a surrogate's deviation is measured on, per neuron and range (the compile's validation uses 257).
SURROGATE_GRID = 257
_WIDENED_DTYPES = (torch.float16, torch.bfloat16)
# What every site record of report["regions"] holds (analysis/regions.py), besides its activation's own fields.
_RECORD_FIELDS = ("site", "activation", "neurons", "rewrite", "rewritten", "slope", "intercept")


@dataclass
class SiteDrift:
    """One rewritten site re-measured on the new data."""

    site: str
    activation: str
    rewrite: str  # "linearized" or "dead_masked"
    rewritten: int  # neurons the compile rewrote here
    left: list[int]  # indices of the rewritten neurons that left their region (or surrogates off the tolerance)
    samples: int
    observations: int  # per neuron (samples x positions)
    # Piecewise-linear sites: of one neuron's observations, the largest fraction outside its decided region, and
    # the compile's 95% bound on that rate (3/n, rule of three over its n observations; report["evidence"]).
    outside_fraction: float | None
    compile_bound: float | None
    # Piecewise-linear sites: min over rewritten neurons of the distance from its inputs to its region's boundary,
    # negative when inputs went beyond it (by that much); the compile's on its decide split for comparison.
    min_margin: float | None
    compile_margin: float | None
    surrogate_error: float | None = None  # smooth sites: the largest deviation on the new range
    allowed_error: float | None = None  # smooth sites: what the compile allowed

    @property
    def holds(self) -> bool:
        return not self.left

    def describe(self) -> str:
        """One line naming the site, how many neurons left and which."""
        count, neurons = f"{len(self.left)} of {self.rewritten}", _indices(self.left)
        if self.surrogate_error is not None:
            what = f"surrogate off by {self.surrogate_error:.3g} > allowed {self.allowed_error:.3g}"
            return f"{self.site} ({self.activation}): {what} on {count} neurons: {neurons}"
        what = "dead neurons fired" if self.rewrite == DEAD_MASKED else "neurons left their region"
        return f"{self.site} ({self.activation}, {self.rewrite}): {count} {what}: {neurons}"

    def to_dict(self) -> dict:
        return {
            "site": self.site, "activation": self.activation, "rewrite": self.rewrite, "rewritten": self.rewritten,
            "left": len(self.left), "left_neurons": list(self.left), "samples": self.samples,
            "observations_per_neuron": self.observations, "outside_fraction": self.outside_fraction,
            "compile_bound": self.compile_bound,
            "min_margin": self.min_margin, "compile_margin": self.compile_margin, "surrogate_error": self.surrogate_error,
            "allowed_error": self.allowed_error, "holds": self.holds,
        }


@dataclass
class RecheckResult:
    """The compile's guarantee re-measured on new data: per site, the outputs, and whether it still holds."""

    sites: list[SiteDrift]
    error: ErrorStats  # the ONNX file against the original model on the new data
    allowed: float  # the compile's allowance plus the ONNX Runtime one
    samples: int
    top1_agreement: dict[str, float] = field(default_factory=dict)  # per class-score output
    notes: list[str] = field(default_factory=list)

    @property
    def drifted_sites(self) -> list[SiteDrift]:
        return [site for site in self.sites if not site.holds]

    @property
    def outputs_hold(self) -> bool:
        return self.error.within(self.allowed)

    @property
    def holds(self) -> bool:
        return self.outputs_hold and not self.drifted_sites

    @property
    def exit_code(self) -> int:
        return EXIT_HOLDS if self.holds else EXIT_DRIFTED

    def reasons(self) -> list[str]:
        """Why the guarantee no longer holds, one line per site and one for the outputs; empty when it holds."""
        lines = [site.describe() for site in self.drifted_sites]
        if not self.outputs_hold:
            lines.append(f"outputs: ONNX vs original {self.error.describe()} > allowed {self.allowed:.3g}")
        return lines

    def verdict(self) -> str:
        """The one line a CI log ends with."""
        agreement = "".join(f", top-1 agreement {value:.2%}" for value in list(self.top1_agreement.values())[:1])
        outputs = f"outputs max_rel {max(self.error.max_rel, self.error.sample_rel):.2e} (allowed {self.allowed:.2g}){agreement}"
        if self.holds:
            sites = _count(len(self.sites), "site")
            neurons = f"every rewritten neuron of {sites} stayed in its region" if self.sites else "no site was rewritten"
            return f"egp-export recheck: HOLDS on {self.samples} samples: {neurons}; {outputs}"
        drifted = ", ".join(f"{site.site} ({_count(len(site.left), 'neuron')})" for site in self.drifted_sites) or "none"
        return f"egp-export recheck: DRIFTED on {self.samples} samples: sites {drifted}; {outputs}"

    def to_dict(self) -> dict:
        return {
            "holds": self.holds,
            "exit_code": self.exit_code,
            "samples": self.samples,
            "sites": [site.to_dict() for site in self.sites],
            "outputs": {**self.error.to_dict(), "allowed": self.allowed, "passed": self.outputs_hold},
            "top1_agreement": dict(self.top1_agreement),
            "reasons": self.reasons(),
            "notes": list(self.notes),
            "verdict": self.verdict(),
        }


def load_compiled(path: str | Path) -> tuple[dict, Path]:
    """(report, model.onnx path) from a compile's --out folder, its report.json or its model.onnx (the other file
    is read beside it). ReportError when a file is missing or the report is not a compile report's JSON."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise ReportError(f"{path} does not exist; give the --out folder of 'egp-export compile' (report.json, model.onnx).")
    report_path, onnx_path = folder / REPORT_JSON, folder / ONNX_MODEL
    for needed in (report_path, onnx_path):
        if not needed.is_file():
            raise ReportError(
                f"{needed} does not exist; recheck reads {REPORT_JSON} and {ONNX_MODEL} from the --out folder of "
                "'egp-export compile', so give that folder."
            )
    try:
        report = json.loads(report_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{report_path} is not readable JSON ({error}); give the report.json a compile wrote.") from None
    if not isinstance(report, dict):
        raise ReportError(f"{report_path} holds no compile report (a JSON object); give the report.json a compile wrote.")
    return report, onnx_path


def recheck(
    model: nn.Module, report: dict, onnx_path: str | Path, data, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> RecheckResult:
    """Re-measure the compile's guarantee on ``data`` (the forms ``compile`` takes as calibration).

    ``model`` is the original model the compile was given (same weights: the
    report's model digest must match), ``report`` the compile's report (with
    the ONNX export, as ``egp-export compile`` writes it), ``onnx_path`` the
    compiled file. Nothing is recompiled and ``model`` is never mutated.
    ReportError when the report lacks what recheck reads or belongs to another
    model; CalibrationError for data the model or the file cannot take.
    """
    regions, allowed = _guarantee(report)
    working = owned_copy(model).eval()
    if any(t.dtype in _WIDENED_DTYPES for t in [*working.parameters(), *working.buffers()]):
        working = working.float()  # the compile ran (and verified) the float32 copy
    if model_digest(working) != regions["model_digest"]:
        raise ReportError(
            "the report was written for another model: the weights given differ from the ones compiled (model "
            "digest); pass the --arch, --arch-kwargs and --checkpoint the compile was given."
        )
    batches = fitted_to(working, as_batches(data, batch_size=batch_size).map(_widened))
    _check_sample_shape(report, batches[0])
    leaf_names = [leaf["name"] for leaf in (report.get("trace") or {}).get("leaf_modules", [])]
    graph = capture(working, take(batches[0], slice(0, 1)), leaf_modules=leaf_names)
    measured = {site.name: site for site in calibrate(graph, batches)}
    bounds = {row.get("site"): row.get("crossing_rate_bound_95") for row in report.get("evidence") or []}
    sites = [_site_drift(record, measured.get(record["site"]), bounds.get(record["site"])) for record in regions["sites"]]
    error, top1, samples = _compare_outputs(working, onnx_path, batches)
    onnxruntime = (report.get("verification") or {}).get("onnxruntime") or {}
    notes = [] if "rtol" in onnxruntime else [
        f"the report holds no ONNX Runtime check; its allowance is taken as {ORT_CPU_RTOL:g}"
    ]
    onnx_rtol = onnxruntime.get("rtol", ORT_CPU_RTOL)
    return RecheckResult(sites, error, allowed + onnx_rtol, samples, top1, notes)


def _widened(batch):
    return structured(batch, lambda tensor: tensor.float() if tensor.dtype in _WIDENED_DTYPES else tensor)


def _guarantee(report: dict) -> tuple[dict, float]:
    """report["regions"] and the compile's allowance; ReportError naming what is missing."""
    regions = report.get("regions")
    if not isinstance(regions, dict) or "model_digest" not in regions or not isinstance(regions.get("sites"), list):
        made_by = report.get("egp_export_version", "an unknown version")
        raise ReportError(
            f"the report has no 'regions' section (written by egp-export {made_by}, or by 'analyze'), so the "
            "rewritten neurons cannot be rechecked; compile again with this version of egp-export."
        )
    if regions.get("format") != REGIONS_FORMAT:
        raise ReportError(
            f"the report's 'regions' section has format {regions.get('format')!r}, this egp-export reads format "
            f"{REGIONS_FORMAT}; recheck with the version that compiled it, or compile again."
        )
    for record in regions["sites"]:
        needed = _RECORD_FIELDS + (("allowed_error",) if "boundaries" not in record else ("region",))
        missing = [name for name in needed if name not in record] if isinstance(record, dict) else list(needed)
        if missing:
            site = record.get("site", "?") if isinstance(record, dict) else "?"
            raise ReportError(
                f"the report's regions record of site {site!r} lacks {', '.join(missing)}; give the report.json "
                "that 'egp-export compile' wrote, unedited."
            )
    allowed = (report.get("guarantee") or {}).get("allowed")
    if not isinstance(allowed, (int, float)):
        raise ReportError("the report has no guarantee['allowed']; give the report.json that 'egp-export compile' wrote.")
    return regions, float(allowed)


def _check_sample_shape(report: dict, batch) -> None:
    """The file was exported and verified for the compile's sample shape; refuse other data before running it."""
    compiled = (report.get("calibration") or {}).get("sample_shape")
    given = sample_shape(batch)
    if compiled is not None and compiled != given:
        raise CalibrationError(
            f"the data's samples have shape {given}, the model was compiled for {compiled}; give data of the shape "
            "the compile was calibrated on."
        )


def _site_drift(record: dict, site: SiteStats | None, bound: float | None) -> SiteDrift:
    """The rewritten neurons of ``record`` that ``site`` (the same call site on the new data) saw elsewhere."""
    name = record["site"]
    if site is None or site.spec.kind != record["activation"] or site.num_neurons != record["neurons"]:
        found = "no such activation site" if site is None else f"{site.spec.kind} with {site.num_neurons} neurons"
        raise ReportError(
            f"the report was written for another model: its site {name!r} ({record['activation']}, "
            f"{record['neurons']} neurons) is {found} in the model given; pass the model that was compiled."
        )
    neurons = torch.as_tensor(record["rewritten"], dtype=torch.int64)
    if site.spec.smooth:
        return _surrogate_drift(record, site, neurons)
    region = torch.as_tensor(record["region"], dtype=torch.int64)
    counts = site.region_counts[:, neurons]  # [regions, rewritten neurons]
    inside = counts.gather(0, region[None, :])[0]
    outside = counts.sum(0) - inside
    left = outside > 0
    fraction = float((outside[left].to(torch.float64) / site.observations).max()) if left.any() else 0.0
    bounds = (float("-inf"), *record["boundaries"], float("inf"))
    lower = torch.tensor([bounds[r] for r in region.tolist()], dtype=torch.float64)
    upper = torch.tensor([bounds[r + 1] for r in region.tolist()], dtype=torch.float64)
    margin = torch.minimum(site.low[neurons] - lower, upper - site.high[neurons])
    return SiteDrift(
        name, record["activation"], record["rewrite"], len(neurons), neurons[left].tolist(), site.samples,
        site.observations, fraction, bound, float(margin.min()) if len(neurons) else None, record.get("min_margin"),
    )


def _surrogate_drift(record: dict, site: SiteStats, neurons: torch.Tensor) -> SiteDrift:
    """A smooth site's surrogate against the activation on each neuron's new input range."""
    slope = torch.as_tensor(record["slope"], dtype=torch.float64)
    intercept = torch.as_tensor(record["intercept"], dtype=torch.float64)
    low, high = site.low[neurons], site.high[neurons]
    t = torch.linspace(0.0, 1.0, SURROGATE_GRID, dtype=torch.float64)
    grid = low[:, None] + (high - low)[:, None] * t[None, :]
    error = (site.spec.fn(grid) - (slope[:, None] * grid + intercept[:, None])).abs().amax(1)
    allowed = float(record["allowed_error"])
    left = error > allowed
    return SiteDrift(
        record["site"], record["activation"], record["rewrite"], len(neurons), neurons[left].tolist(), site.samples,
        site.observations, None, None, None, None,
        surrogate_error=float(error.max()) if len(neurons) else 0.0, allowed_error=allowed,
    )


def _compare_outputs(model: nn.Module, onnx_path: str | Path, batches) -> tuple[ErrorStats, dict[str, float], int]:
    """The ONNX file in ONNX Runtime against ``model`` on every batch: the error, top-1 agreement, samples read."""
    session = ort_session(Path(onnx_path))
    inputs = session.get_inputs()
    fixed = inputs[0].shape[0] if inputs and isinstance(inputs[0].shape[0], int) else None
    errors, agreeing, samples = ErrorAccumulator(), {}, 0
    with torch.no_grad():
        for batch in batches:
            chunks = [batch] if fixed is None else [
                take(batch, slice(start, start + fixed)) for start in range(0, batch_size(batch), fixed)
            ]
            for chunk in chunks:
                reference = call_on_copy(model, chunk)
                candidate = _run_session(session, chunk, onnx_path)
                try:
                    errors.add(reference, candidate)
                except ValueError as problem:  # output count or shape differs
                    raise ReportError(
                        f"{onnx_path} does not compute the model's outputs ({problem}); give the file the compile "
                        "of this model wrote."
                    ) from None
                for (name, ref), cand in zip(output_leaves(reference), candidate):
                    if _class_scores(ref):
                        same = (ref.argmax(1).numpy() == np.asarray(cand).argmax(1)).sum()
                        agreeing[name] = agreeing.get(name, 0) + int(same)
                samples += batch_size(chunk)
    return errors.result(), {name: count / samples for name, count in agreeing.items()}, samples


def _class_scores(output) -> bool:
    return isinstance(output, torch.Tensor) and output.is_floating_point() and output.dim() == 2 and output.shape[1] >= 2


def _run_session(session, batch, onnx_path) -> list[np.ndarray]:
    """ONNX Runtime on one batch: its tensors fed to the file's inputs in order (a dict's by name where they match)."""
    names = [value.name for value in session.get_inputs()]
    tensors = leaves(batch)
    if isinstance(batch, dict) and set(batch) == set(names):
        tensors = [batch[name] for name in names]
    if len(tensors) != len(names):
        raise CalibrationError(
            f"{onnx_path} takes {len(names)} inputs ({', '.join(names)}) and the data gives {len(tensors)}; give "
            "data of the form the compile was calibrated on."
        )
    feed = {name: np.ascontiguousarray(tensor.detach().cpu().numpy()) for name, tensor in zip(names, tensors)}
    try:
        return session.run(None, feed)
    except Exception as error:  # ORT's own exception types; the data or the file is at fault, say which run failed
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CalibrationError(
            f"ONNX Runtime cannot run {onnx_path} on the data ({sample_shape(batch)} per sample): {first}; give the "
            "model.onnx this compile wrote, and data of the shape and dtype it was calibrated on."
        ) from None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _indices(neurons: list[int], shown: int = 8) -> str:
    head = ", ".join(map(str, neurons[:shown]))
    return head + (f", ... (+{len(neurons) - shown})" if len(neurons) > shown else "")
