"""PNG plots (latency distributions, comparison, depth diagram) and the Markdown → HTML renderer."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from egp_export.errors import OutputError
from egp_export.report.html import render_html
from egp_export.report.plots import plot_comparison, plot_depth, plot_latency, plot_profile
from egp_export.runtime.profiler import BatchProfile, Comparison, ProfileResult, latency_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width: int = 300) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.width >= min_width and image.height >= 200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 10, "the figure is blank"


def timings(median: float, size: int = 200, seed: int = 0) -> np.ndarray:
    values = median * np.exp(0.05 * np.random.default_rng(seed).standard_normal(size))
    values[::50] *= 20  # occasional stalls, as on a shared machine
    return values


def comparison() -> Comparison:
    baseline = timings(2.0, 60, seed=1).reshape(6, 10)
    candidate = timings(1.0, 60, seed=2).reshape(6, 10)
    return Comparison(
        backend={"backend": "ort-cpu", "threads": 1},
        clock="perf_counter_ns",
        batch_size=1,
        input_shape=(1, 3, 16, 16),
        baseline_rounds=baseline,
        candidate_rounds=candidate,
        orders=[("baseline", "candidate"), ("candidate", "baseline")] * 3,
        speedup=2.0,
        ci=(1.9, 2.1),
        confidence=0.95,
        resamples=2000,
        seed=0,
    )


def compile_report(sites: int = 12) -> dict:
    rows = [
        {"name": f"layer{i}_relu", "activation": "relu", "entropy": 0.0 if i % 3 == 0 else 0.7, "linearized": False}
        for i in range(sites)
    ]
    for row in rows[::3]:
        row["linearized"] = True
    return {
        "before": {"depth": 18, "layers": 21, "activations": sites},
        "after": {"depth": 16, "layers": 19, "activations": sites - len(rows[::3])},
        "analysis": {"sites": rows},
        "activations_linearized": len(rows[::3]),
    }


def test_latency_plot(tmp_path):
    path = plot_latency({"baseline": timings(2.0), "candidate": timings(1.0, seed=1)}, tmp_path / "latency.png")
    assert_png(path, min_width=800)


def test_latency_plot_of_constant_timings(tmp_path):
    assert_png(plot_latency({"only": np.full(10, 1.5)}, tmp_path / "flat.png"))


def test_latency_plot_refuses_empty_timings(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plot_latency({"nothing": []}, tmp_path / "empty.png")


def test_profile_plot(tmp_path):
    batches = [
        BatchProfile(batch_size=b, input_shape=(b, 3, 8, 8), stats=latency_stats(t), timings_ms=t)
        for b, t in ((1, timings(0.5)), (8, timings(2.5, seed=3)))
    ]
    result = ProfileResult(model="m.onnx", backend={"backend": "ort-cpu"}, clock="perf_counter_ns", iterations=200, warmup=5)
    result.batches = batches
    assert_png(plot_profile(result, tmp_path / "profile.png"))


def test_comparison_plot(tmp_path):
    assert_png(plot_comparison(comparison(), tmp_path / "gate.png", min_speedup=1.5), min_width=800)


@pytest.mark.parametrize("sites", [0, 12, 60], ids=["no-sites", "labelled", "many-sites"])
def test_depth_plot(tmp_path, sites):
    assert_png(plot_depth(compile_report(sites), tmp_path / "depth.png"))


def test_plots_do_not_overwrite_without_force(tmp_path):
    path = tmp_path / "latency.png"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        plot_latency({"a": timings(1.0)}, path)
    with pytest.raises(OutputError, match="already exists"):
        plot_depth(compile_report(), path)
    assert path.read_bytes() == b"keep me"
    plot_latency({"a": timings(1.0)}, path, force=True)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_render_html_tables_lists_code_and_images(tmp_path):
    image = plot_depth(compile_report(), tmp_path / "depth.png")
    extra = plot_latency({"a": timings(1.0)}, tmp_path / "latency.png")
    markdown = "\n".join(
        [
            "# Report <draft>",
            "",
            "Some **bold** text with `a|b <c>` code.",
            "",
            "| site | entropy |",
            "|---|---:|",
            "| `x\\|y` | 0.5 |",
            "",
            "- first item",
            "- second item",
            "",
            "![depth diagram](depth.png)",
        ]
    )
    page = render_html(markdown, {"depth.png": image, "latency.png": extra}, title="T")
    assert page.startswith("<!DOCTYPE html>") and "<title>T</title>" in page
    assert "<h1>Report &lt;draft&gt;</h1>" in page
    assert "<strong>bold</strong>" in page and "<code>a|b &lt;c&gt;</code>" in page
    assert '<th class="num">entropy</th>' in page and "<td><code>x|y</code></td>" in page
    assert "<li>first item</li>" in page and "<li>second item</li>" in page
    embedded = page.count("data:image/png;base64,")
    assert embedded == 2  # the referenced image in place, the other appended
    assert '<img alt="depth diagram" src="data:image/png;base64,' in page
    assert "<figcaption>latency.png</figcaption>" in page
    first = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(first)[:8] == PNG_MAGIC
