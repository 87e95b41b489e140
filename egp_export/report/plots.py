"""PNG plots for reports (matplotlib, Agg canvas, no pyplot state) and a small Markdown → HTML renderer.

- :func:`plot_latency`: latency distributions of any labelled timings
  (histogram with medians, and every timing as a dot with p50 / p90 / p99 bars).
- :func:`plot_comparison`: a gate's baseline vs candidate distributions and
  the per-round speedups with the bootstrap interval and the threshold.
- :func:`plot_profile`: a profile's distributions, one per batch size.
- :func:`plot_depth`: a compile report's layers before/after (depth, conv and
  linear layers, nonlinear activations) and its activation sites in network
  order, linearized ones marked.
- :func:`render_html`: a self-contained HTML page from report Markdown, PNGs
  embedded as data URIs.

Every writer refuses to overwrite without ``force`` and writes atomically.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from egp_export.io.fileio import atomic_path, check_writable

BASELINE_COLOUR = "#4c72b0"
CANDIDATE_COLOUR = "#dd8452"
KEPT_COLOUR = "#4c72b0"  # report.py's entropy chart uses the same pair
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

    from egp_export.report.report import analysis_of, is_linearized

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


# HTML ----------------------------------------------------------------------------------

_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_LIST_ITEM = re.compile(r"^[-*]\s+")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem}"
    "td.num,th.num{text-align:right}code{background:#f3f3f3;padding:0 .2rem}img{max-width:100%}"
)


def _data_uri(image: str | os.PathLike | bytes) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _inline(text: str, images: Mapping[str, str | os.PathLike | bytes], used: set[str]) -> str:
    """Escape, then render code spans, images, links and bold (code spans are left alone)."""
    pieces = text.split("`")
    out = []
    for index, piece in enumerate(pieces):
        if index % 2 == 1 and index < len(pieces) - 1:
            out.append(f"<code>{html.escape(piece)}</code>")
            continue
        if index % 2 == 1:  # an unmatched backtick
            piece = "`" + piece

        def image(match: re.Match) -> str:
            alt, target = match.group(1), match.group(2)
            if target in images:
                used.add(target)
                return f'<img alt="{html.escape(alt)}" src="{_data_uri(images[target])}">'
            return f'<img alt="{html.escape(alt)}" src="{html.escape(target)}">'

        escaped = html.escape(piece, quote=False)
        escaped = _IMAGE_LINK.sub(image, escaped)
        escaped = _LINK.sub(lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', escaped)
        out.append(_BOLD.sub(r"<strong>\1</strong>", escaped))
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)]


def _table_row(tag: str, cells: list[str], numeric: list[bool], images, used: set[str]) -> str:
    def open_tag(column: int) -> str:
        return f'<{tag} class="num">' if column < len(numeric) and numeric[column] else f"<{tag}>"

    return "<tr>" + "".join(f"{open_tag(i)}{_inline(cell, images, used)}</{tag}>" for i, cell in enumerate(cells)) + "</tr>"


def render_html(
    markdown_text: str, images: Mapping[str, str | os.PathLike | bytes] | None = None, *, title: str = "egp-export report"
) -> str:
    """A self-contained HTML page from report Markdown (headings, paragraphs, lists, tables, code, bold, links).

    ``images`` maps a name to a PNG (path or bytes): ``![alt](name)`` in the
    Markdown is embedded in place; images the Markdown does not reference are
    appended at the end, under their names.
    """
    images = dict(images or {})
    used: set[str] = set()
    lines = markdown_text.splitlines()
    body: list[str] = []
    paragraph: list[str] = []
    index = 0

    def flush() -> None:
        if paragraph:
            body.append("<p>" + " ".join(_inline(line, images, used) for line in paragraph) + "</p>")
            paragraph.clear()

    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        heading = re.match(r"^(#{1,6})\s+(.*)$", stripped)
        if not stripped:
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2), images, used)}</h{level}>")
        elif stripped.startswith("|") and index + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[index + 1].strip()):
            flush()
            header = _cells(stripped)
            numeric = [cell.strip().endswith(":") for cell in _cells(lines[index + 1])]
            rows = []
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1

            table = ["<table>", _table_row("th", header, numeric, images, used)]
            table += [_table_row("td", row, numeric, images, used) for row in rows]
            table.append("</table>")
            body.append("\n".join(table))
            continue
        elif _LIST_ITEM.match(stripped):
            flush()
            items = []
            while index < len(lines) and _LIST_ITEM.match(lines[index].strip()):
                item = _LIST_ITEM.sub("", lines[index].strip())
                items.append(f"<li>{_inline(item, images, used)}</li>")
                index += 1
            body.append("<ul>\n" + "\n".join(items) + "\n</ul>")
            continue
        else:
            paragraph.append(stripped)
        index += 1
    flush()
    for name, image in images.items():
        if name not in used:
            caption = html.escape(name)
            body.append(f'<figure><img alt="{caption}" src="{_data_uri(image)}"><figcaption>{caption}</figcaption></figure>')
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
