"""The plots of a pruning run: entropy per site, accuracy vs sparsity, linear sites per iteration.

They read the history records ``egp_export.prune`` writes (``metrics.jsonl``)
and nothing else, so they can be redrawn from a finished run's log.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from egp_export.io.fileio import atomic_path, check_writable

ENTROPY_PLOT = "entropy_per_site.png"
ACCURACY_PLOT = "accuracy_vs_sparsity.png"
LINEAR_SITES_PLOT = "linear_sites.png"
PLOTS = (ENTROPY_PLOT, ACCURACY_PLOT, LINEAR_SITES_PLOT)


def plot_history(history: Sequence[dict], out_dir: str | os.PathLike, *, force: bool = True) -> dict[str, Path]:
    """Three PNGs: entropy per site across iterations, accuracy vs sparsity, number of linear sites per iteration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    paths = {name: check_writable(Path(out_dir) / name, force=force) for name in PLOTS}
    iterations = [record["iteration"] for record in history]

    def save(figure: Figure, name: str) -> None:
        for axes in figure.axes:
            if axes.get_xlabel() == "iteration":
                axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.tight_layout()
        with atomic_path(paths[name], force=force) as tmp:
            figure.savefig(tmp, format="png")

    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    sites = list(dict.fromkeys(name for record in history for name in record["entropies"]))
    for site in sites:
        points = [(r["iteration"], r["entropies"][site]) for r in history if site in r["entropies"]]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=site)
    axes.set_xlabel("iteration")
    axes.set_ylabel("entropy (bits)")
    axes.set_title("EGP entropy per activation site")
    if len(sites) <= 12:
        axes.legend(fontsize=7, ncols=2, frameon=False)
    save(figure, ENTROPY_PLOT)

    figure = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([r["sparsity"] for r in history], [r["accuracy"] for r in history], marker="o")
    for record in history:
        axes.annotate(str(record["iteration"]), (record["sparsity"], record["accuracy"]), fontsize=7, xytext=(3, 3),
                      textcoords="offset points")
    axes.set_xlabel("sparsity of the pruned layers")
    axes.set_ylabel("accuracy (eval data)")
    axes.set_title("accuracy vs sparsity")
    save(figure, ACCURACY_PLOT)

    figure = Figure(figsize=(5.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(iterations, [r["linear_sites"] for r in history], marker="o", label="linear on the data")
    axes.plot(iterations, [r["zero_entropy_sites"] for r in history], marker="x", linestyle="--", label="zero entropy")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iteration")
    axes.set_ylabel("activation sites")
    axes.set_title("linear activation sites")
    axes.legend(fontsize=8, frameon=False)
    save(figure, LINEAR_SITES_PLOT)
    return paths
