"""PNG plots for reports (matplotlib, Agg canvas, no pyplot state) and a small Markdown → HTML renderer.

- :func:`plot_latency`: latency distributions of any labelled timings
  (histogram with medians, and every timing as a dot with p50 / p90 / p99 bars).
- :func:`plot_comparison`: a gate's baseline vs candidate distributions and
  the per-round speedups with the bootstrap interval and the threshold.
- :func:`plot_profile`: a profile's distributions, one per batch size.
- :func:`plot_depth`: a compile report's layers before/after (depth, conv and
  linear layers, nonlinear activations) and its activation sites in network
  order, linearized ones marked.
- :func:`plot_recheck`: a recheck's rewritten sites, the share of each one's
  rewritten neurons that left their region on the new data.
- :func:`render_html`: a self-contained HTML page from report Markdown, PNGs
  embedded as data URIs.

Every writer refuses to overwrite without ``force`` and writes atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from egp_export.io.fileio import atomic_path, check_writable
from egp_export.report.report import analysis_of, is_linearized

BASELINE_COLOUR = "#4c72b0"
CANDIDATE_COLOUR = "#dd8452"
KEPT_COLOUR = "#4c72b0"
LINEARIZED_COLOUR = "#dd8452"
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
# Histograms end at Q3 + 3 IQR (Tukey's far-out fence): one stall must not squash the bulk into one bin.
_FENCE_IQRS = 3.0
# Slowest timing over fastest median above which the timings panel uses a log scale.
_LOG_SPREAD = 5.0
_LABELLED_SITES = 40


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike, force: bool) -> Path:
    target = check_writable(path, force=force)
    figure.tight_layout()
    with atomic_path(target, force=force) as tmp:
        figure.savefig(tmp, format="png")
    return target


def _histogram_range(timings: Mapping[str, np.ndarray]) -> tuple[float, float]:
    """From the fastest timing to the highest upper Tukey fence (Q3 + 3 IQR) of any set: stalls do not squash the bulk."""
    sets = [np.asarray(values, dtype=np.float64).ravel() for values in timings.values()]
    low = min(float(values.min()) for values in sets)
    fences = []
    for values in sets:
        q1, q3 = np.percentile(values, [25, 75])
        fences.append(min(float(values.max()), q3 + _FENCE_IQRS * (q3 - q1)))
    high = max(fences)
    if high <= low:
        high = low * 1.01 + 1e-9
    return low, high


def _draw_histograms(axes, timings: Mapping[str, np.ndarray], colours: Sequence[str]) -> None:
    low, high = _histogram_range(timings)
    bins = np.linspace(low, high, 50)
    clipped = 0
    for (label, values), colour in zip(timings.items(), colours):
        values = np.asarray(values, dtype=np.float64).ravel()
        clipped += int((values > high).sum())
        median = float(np.median(values))
        shown = np.clip(values, low, high)
        axes.hist(shown, bins=bins, histtype="stepfilled", alpha=0.35, color=colour)
        axes.hist(shown, bins=bins, histtype="step", color=colour, label=f"{label} (median {median:.3g} ms)")
        axes.axvline(median, color=colour, linestyle="--", linewidth=1)
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("iterations")
    note = f"; {clipped} slow outliers counted in the last bin" if clipped else ""
    axes.set_title(f"distribution{note}", fontsize=9)
    axes.legend(fontsize=8, frameon=False)


def _draw_strips(axes, timings: Mapping[str, np.ndarray], colours: Sequence[str]) -> None:
    """Every timing as a jittered dot (log scale when stalls dwarf the medians), with p50 / p90 / p99 bars."""
    labels = list(timings)
    data = [np.asarray(timings[label], dtype=np.float64).ravel() for label in labels]
    jitter = np.random.default_rng(0)  # fixed: the same data draws the same picture
    ticks = []
    for position, (label, values, colour) in enumerate(zip(labels, data, colours), start=1):
        offsets = jitter.uniform(-0.25, 0.25, size=values.size)
        axes.plot(position + offsets, values, linestyle="none", marker="o", markersize=2.5, alpha=0.5, color=colour)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        axes.hlines([p50, p90, p99], position - 0.35, position + 0.35, colors="black", linewidths=[2.0, 1.0, 1.0])
        ticks.append(f"{label}\np50 {p50:.3g} · p90 {p90:.3g} · p99 {p99:.3g} ms")
    spread = max(float(values.max()) for values in data) / max(min(float(np.median(values)) for values in data), 1e-12)
    log = spread > _LOG_SPREAD
    if log:
        axes.set_yscale("log")
    axes.set_xticks(range(1, len(labels) + 1), ticks, fontsize=7)
    axes.set_xlim(0.4, len(labels) + 0.6)
    axes.set_ylabel("latency (ms)" + (", log scale" if log else ""))
    axes.set_title("every timing; bars at p50 (thick), p90, p99", fontsize=9)


def plot_latency(
    timings: Mapping[str, Sequence[float] | np.ndarray],
    path: str | os.PathLike,
    *,
    title: str = "Latency",
    force: bool = False,
) -> Path:
    """Histogram and every-timing strip of each labelled set of raw timings (ms)."""
    if not timings or any(np.asarray(values).size == 0 for values in timings.values()):
        raise ValueError("plot_latency needs at least one non-empty set of timings")
    colours = [_PALETTE[i % len(_PALETTE)] for i in range(len(timings))]
    figure = _figure(11.0, 4.2)
    _draw_histograms(figure.add_subplot(1, 2, 1), timings, colours)
    _draw_strips(figure.add_subplot(1, 2, 2), timings, colours)
    figure.suptitle(title, fontsize=11)
    return _save(figure, path, force)


def plot_profile(result, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Latency distributions of a :class:`egp_export.profiler.ProfileResult`, one per batch size."""
    timings = {f"batch {batch.batch_size}": batch.timings_ms for batch in result.batches}
    backend = result.backend.get("backend", "")
    return plot_latency(timings, path, title=f"{Path(str(result.model)).name} on {backend}", force=force)


def plot_comparison(comparison, path: str | os.PathLike, *, min_speedup: float | None = None, force: bool = False) -> Path:
    """A :class:`egp_export.profiler.Comparison`: both distributions, and the speedup per round with its interval."""
    timings = {"baseline": comparison.baseline_rounds, "candidate": comparison.candidate_rounds}
    figure = _figure(11.0, 4.2)
    _draw_histograms(figure.add_subplot(1, 2, 1), timings, (BASELINE_COLOUR, CANDIDATE_COLOUR))
    axes = figure.add_subplot(1, 2, 2)
    speedups = comparison.round_speedups
    rounds = np.arange(1, len(speedups) + 1)
    low, high = comparison.ci
    axes.axhspan(low, high, color=CANDIDATE_COLOUR, alpha=0.2, label=f"{comparison.confidence:.0%} CI {low:.2f}–{high:.2f}x")
    axes.axhline(comparison.speedup, color=CANDIDATE_COLOUR, linewidth=1.5, label=f"speedup {comparison.speedup:.2f}x")
    first = [order[0] == "baseline" for order in comparison.orders]
    axes.plot(rounds[first], speedups[first], "o", color="black", markersize=4, label="round, baseline first")
    axes.plot(
        rounds[~np.array(first)], speedups[~np.array(first)], "s", color="grey", markersize=4, label="round, candidate first"
    )
    if min_speedup is not None:
        axes.axhline(min_speedup, color="#c44e52", linestyle="--", linewidth=1.2, label=f"required {min_speedup:.2f}x")
    axes.set_xlabel("round")
    axes.set_ylabel("speedup (baseline / candidate median)")
    axes.set_title("per-round speedup", fontsize=9)
    axes.legend(fontsize=7, frameon=False)
    backend = comparison.backend.get("backend", "")
    figure.suptitle(f"Baseline vs candidate on {backend}, batch {comparison.batch_size}", fontsize=11)
    return _save(figure, path, force)


def plot_depth(report: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Layers before/after a compile (report["before"] / ["after"]) and the activation sites in network order."""
    from matplotlib.patches import Patch, Rectangle

    before, after = report.get("before") or {}, report.get("after") or {}
    sites = analysis_of(report).get("sites", [])
    figure = _figure(min(max(7.0, 0.28 * len(sites) + 3.0), 24.0), 5.2)
    grid = figure.add_gridspec(2, 1, height_ratios=[2.0, 1.0])
    top = figure.add_subplot(grid[0])
    rows = [
        ("depth", "depth (longest conv/linear chain)"),
        ("layers", "conv/linear layers"),
        ("activations", "nonlinear activations"),
    ]
    rows = [(key, label) for key, label in rows if key in before and key in after]
    positions = np.arange(len(rows))
    height = 0.38
    top.barh(positions - height / 2, [before[key] for key, _ in rows], height, color="#b0b0b0", label="before")
    top.barh(positions + height / 2, [after[key] for key, _ in rows], height, color=LINEARIZED_COLOUR, label="after")
    for position, (key, _) in zip(positions, rows):
        top.annotate(
            f"{before[key]} → {after[key]}",
            (max(before[key], after[key]), position),
            xytext=(4, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    top.set_yticks(positions, [label for _, label in rows], fontsize=8)
    top.invert_yaxis()
    top.set_xlim(0, max([1] + [max(before[k], after[k]) for k, _ in rows]) * 1.18)
    top.set_title("Layers before and after compilation", fontsize=10)
    top.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))

    strip = figure.add_subplot(grid[1])
    for index, site in enumerate(sites):
        colour = LINEARIZED_COLOUR if is_linearized(site) else KEPT_COLOUR
        strip.add_patch(Rectangle((index + 0.05, 0.0), 0.9, 1.0, color=colour))
    strip.set_xlim(0, max(len(sites), 1))
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    if sites and len(sites) <= _LABELLED_SITES:
        strip.set_xticks(np.arange(len(sites)) + 0.5, [site["name"] for site in sites], rotation=90, fontsize=7)
    else:
        strip.set_xlabel("activation site (network order)")
    linearized = sum(1 for site in sites if is_linearized(site))
    strip.set_title(f"Activation sites in network order: {linearized} of {len(sites)} linearized", fontsize=10)
    strip.legend(
        handles=[Patch(color=KEPT_COLOUR, label="kept (nonlinear)"), Patch(color=LINEARIZED_COLOUR, label="linearized")],
        fontsize=8,
        frameon=False,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
    )
    return _save(figure, path, force)


def plot_recheck(result: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Per rewritten site of a recheck (``RecheckResult.to_dict()``), the share of its rewritten neurons that left
    their region (or whose surrogate is off) on the new data; drifted sites in the candidate colour."""
    sites = result.get("sites", [])
    figure = _figure(7.0, min(max(2.2, 0.3 * len(sites) + 1.4), 24.0))
    axes = figure.add_subplot()
    shares = [site["left"] / max(site["rewritten"], 1) for site in sites]
    colours = [CANDIDATE_COLOUR if site["left"] else BASELINE_COLOUR for site in sites]
    positions = np.arange(len(sites))
    axes.barh(positions, shares, color=colours)
    for position, site in zip(positions, sites):
        axes.annotate(f"{site['left']} of {site['rewritten']}", (shares[position], position), xytext=(4, 0),
                      textcoords="offset points", va="center", fontsize=8)
    axes.set_yticks(positions, [f"{site['site']} ({site['rewrite']})" for site in sites], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.15)
    axes.set_xlabel("share of the rewritten neurons that left their region")
    verdict = "holds" if result.get("holds") else "no longer holds"
    axes.set_title(f"Recheck on {result.get('samples', 0)} samples: the guarantee {verdict}", fontsize=10)
    return _save(figure, path, force)


# HTML ----------------------------------------------------------------------------------


def plot_entropy(report: dict, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a PNG bar chart of EGP's layer entropy per activation site, linearized sites highlighted."""
    from matplotlib.patches import Patch

    sites = analysis_of(report).get("sites", [])
    names = [site["name"] for site in sites]
    entropies = [float(site.get("entropy", 0.0)) for site in sites]
    colours = [LINEARIZED_COLOUR if is_linearized(site) else KEPT_COLOUR for site in sites]
    compiled = "activations_linearized" in report
    figure = _figure(min(max(4.0, 0.35 * len(sites) + 2.0), 24.0), 4.0)
    axes = figure.add_subplot()
    positions = range(len(sites))
    axes.bar(positions, entropies, color=colours)
    # Linearized sites have zero entropy, hence no visible bar: mark them by colour in the tick labels too.
    axes.set_xticks(positions, names, rotation=90 if len(sites) > 6 else 0, fontsize=8)
    for label, colour in zip(axes.get_xticklabels(), colours):
        label.set_color(colour)
    if len(sites) <= _LABELLED_SITES:
        for position, entropy, colour in zip(positions, entropies, colours):
            axes.annotate(
                f"{entropy:.2f}",
                (position, entropy),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color=colour,
            )
    axes.set_ylim(0.0, 1.3)
    axes.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("entropy (bits)")
    axes.set_xlabel("activation call site")
    axes.set_title("EGP layer entropy per activation site" + ("" if sites else " (no activation sites)"))
    linear_label = "linearized" if compiled else "linear on the data"
    axes.legend(
        handles=[Patch(color=KEPT_COLOUR, label="nonlinear"), Patch(color=LINEARIZED_COLOUR, label=linear_label)],
        loc="upper center",
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    return _save(figure, path, force)
