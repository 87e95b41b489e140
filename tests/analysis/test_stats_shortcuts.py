"""The statistics' shortcuts (counts and margins decided by low/high without a pass over z) are exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.analysis.test_analysis import site

ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-2.0, 3.0), nn.Hardswish(), nn.LeakyReLU(0.1), nn.GELU()]


def _reference(z: torch.Tensor, boundaries: tuple[float, ...]) -> dict:
    """Brute force over [neurons, observations]: counts above each boundary, ON counts, min distance to a boundary."""
    flat = z.movedim(1, 0).reshape(z.shape[1], -1).to(torch.float64)
    distances = [(flat - b).abs().amin(1) for b in boundaries]
    return {
        "on": (flat > 0).sum(1),
        "above": [(flat > b).sum(1) for b in boundaries],
        "margin": torch.stack(distances).amin(0) if distances else torch.full((z.shape[1],), float("inf"), dtype=torch.float64),
        "low": flat.amin(1),
        "high": flat.amax(1),
    }


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("layout", ["all-straddle", "none-straddle", "mixed"])
def test_counts_and_margins_match_brute_force(act, layout):
    generator = torch.Generator().manual_seed(0)
    # Neuron c is centred at shifts[c]: far from every boundary, or on one.
    shifts = {"all-straddle": [0.0, 3.0, -3.0, 6.0], "none-straddle": [-20.0, 20.0, 1.5, -9.0], "mixed": [0.0, 20.0, 4.5, -3.0]}
    z = torch.randn(6, 4, 3, 3, generator=generator) * 0.5 + torch.tensor(shifts[layout]).reshape(1, 4, 1, 1)
    stats = site(act)
    stats.observe(z[:3])
    stats.observe(z[3:])
    expected = _reference(z, stats.spec.boundaries)
    assert torch.equal(stats.on_counts, expected["on"])
    assert torch.equal(stats.low, expected["low"]) and torch.equal(stats.high, expected["high"])
    # Margins are exact for neurons that stayed in one region; a neuron seen in two has margin 0 (no pass over z),
    # however the batches fell, and the report leaves every such neuron out.
    one_region = stats.neuron_region >= 0 if stats.spec.boundaries else torch.ones(4, dtype=torch.bool)
    assert torch.allclose(stats.margin[one_region], expected["margin"][one_region], rtol=0, atol=1e-6)
    assert torch.all(stats.margin[~one_region] == 0)
    shown = stats.to_dict()["min_margin"]
    finite = expected["margin"][one_region & torch.isfinite(expected["margin"])]
    assert shown == (pytest.approx(float(finite.min()), abs=1e-6) if finite.numel() else None)
    if stats.spec.boundaries:
        above = expected["above"]
        counts = [stats.observations - above[0]] + [above[r - 1] - above[r] for r in range(1, len(above))] + [above[-1]]
        assert torch.equal(stats.region_counts, torch.stack(counts))


def test_calibrate_consumes_a_generator_in_one_pass():
    from egp_export.analysis.stats import calibrate
    from egp_export.analysis.trace import trace

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    held: list[int] = []

    def batches():
        for index in range(5):
            held.append(index)
            yield torch.randn(8, 4)

    gm = trace(model)
    (stats,) = calibrate(gm, batches())
    assert stats.observations == 5 * 8 * 1 and held == [0, 1, 2, 3, 4]


def test_calibrate_without_batches_is_refused():
    from egp_export.analysis.stats import calibrate
    from egp_export.analysis.trace import trace
    from egp_export.errors import CalibrationError

    with pytest.raises(CalibrationError, match="empty"):
        calibrate(trace(nn.Sequential(nn.ReLU()).eval()), iter([]))


@pytest.mark.parametrize("float_counts", [True, False], ids=["float-flags", "integer-fallback"])
def test_counts_are_exact_on_both_paths_and_a_shared_scratch_buffer_of_any_size(float_counts, monkeypatch):
    from egp_export.analysis import stats as stats_module

    if not float_counts:  # the path for more than 2**24 observations per neuron in one batch
        monkeypatch.setattr(stats_module, "_EXACT_FLOAT_COUNT", 1)
    generator = torch.Generator().manual_seed(1)
    scratch = stats_module.Scratch()
    for act, shape in [
        (nn.ReLU6(), (5, 4, 7, 3)),  # [batch, channels, H, W]
        (nn.ReLU(), (2, 4, 3)),  # a smaller z reuses the larger buffer
    ]:
        z = torch.randn(*shape, generator=generator) * 4
        z[0, 0].zero_()  # exact zeros are OFF
        stats = site(act)
        stats.observe(z, scratch)
        expected = _reference(z, stats.spec.boundaries)
        assert torch.equal(stats.on_counts, expected["on"]) and stats.on_counts.dtype == torch.int64
        assert torch.equal(stats.region_counts.sum(0), torch.full((4,), z.numel() // 4))
    assert scratch.buffer.numel() == 5 * 4 * 7 * 3 or not float_counts


def test_statistics_do_not_depend_on_how_the_samples_were_batched_or_sharded():
    # Neuron 0 is positive in the first half and negative in the second: no batch of the halves straddles 0.
    z = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(2)).abs() + 0.5
    z[4:, 0] *= -1
    whole, halves, shard_a, shard_b = site(nn.ReLU6()), site(nn.ReLU6()), site(nn.ReLU6()), site(nn.ReLU6())
    whole.observe(z)
    halves.observe(z[:4])
    halves.observe(z[4:])
    shard_a.observe(z[:4])
    shard_b.observe(z[4:])
    shard_a.merge(shard_b)
    for other in (halves, shard_a):
        for field in ("region_counts", "on_counts", "low", "high", "margin"):
            assert torch.equal(getattr(whole, field), getattr(other, field)), field
        assert (whole.observations, whole.samples) == (other.observations, other.samples)
    assert whole.margin[0] == 0 and whole.neuron_region[0] == -1
