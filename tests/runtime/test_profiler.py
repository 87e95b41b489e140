"""Profiler statistics on synthetic timings, the interleaving of A/B rounds, and one real ORT profile."""

from __future__ import annotations

import numpy as np
import pytest

from egp_export.runtime.backends import BackendError
from egp_export.runtime.profiler import (
    bootstrap_ratio_ci,
    latency_stats,
    profile,
    ratio_of_medians,
    round_orders,
    run_interleaved,
)
from tests.perf_models import export_model


def synthetic_rounds(median_ms: float, noise: float, rounds: int, iterations: int, seed: int) -> np.ndarray:
    """Log-normal timings with the given median (the shape real latencies have: a floor and a right tail)."""
    generator = np.random.default_rng(seed)
    return median_ms * np.exp(noise * generator.standard_normal((rounds, iterations)))


# Summary statistics ----------------------------------------------------------------


def test_percentiles_of_known_timings():
    stats = latency_stats(np.arange(1, 101, dtype=float))  # 1..100 ms
    # Linear interpolation between order statistics: position q * (n - 1).
    assert stats.median == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5)
    assert stats.std == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert (stats.min, stats.max, stats.n) == (1.0, 100.0, 100)


def test_percentiles_ignore_order_and_shape():
    timings = np.random.default_rng(0).permutation(np.arange(1, 101, dtype=float)).reshape(10, 10)
    assert latency_stats(timings) == latency_stats(np.arange(1, 101, dtype=float))


def test_one_timing_has_zero_spread():
    stats = latency_stats([2.5])
    assert stats.median == stats.p90 == stats.p99 == stats.mean == 2.5
    assert stats.std == 0.0


def test_no_timings_is_refused():
    with pytest.raises(ValueError, match="no timings"):
        latency_stats([])


def test_a_stall_moves_p99_not_the_median():
    timings = np.full(100, 1.0)
    timings[-1] = 100.0
    stats = latency_stats(timings)
    assert stats.median == 1.0
    assert stats.p90 == 1.0
    # Position 0.99 * (n - 1) = 98.01: 1% of the way from the 99th order statistic (1) to the 100th (100).
    assert stats.p99 == pytest.approx(1.99)
    assert stats.max == 100.0


# Ratio and its confidence interval -------------------------------------------------------


def test_ratio_of_medians_is_the_speedup():
    assert ratio_of_medians([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2.5)


def test_bootstrap_interval_contains_the_true_ratio():
    baseline = synthetic_rounds(10.0, 0.05, rounds=20, iterations=20, seed=1)
    candidate = synthetic_rounds(5.0, 0.05, rounds=20, iterations=20, seed=2)
    low, high = bootstrap_ratio_ci(baseline, candidate, seed=0)
    assert low <= 2.0 <= high
    assert low <= ratio_of_medians(baseline, candidate) <= high


def test_bootstrap_interval_covers_at_its_nominal_rate():
    """Over independent synthetic experiments a 90% interval holds the true ratio about 90% of the time."""
    hits = 0
    experiments = 60
    for seed in range(experiments):
        baseline = synthetic_rounds(3.0, 0.2, rounds=12, iterations=10, seed=2 * seed + 100)
        candidate = synthetic_rounds(2.0, 0.2, rounds=12, iterations=10, seed=2 * seed + 101)
        low, high = bootstrap_ratio_ci(baseline, candidate, confidence=0.9, resamples=500, seed=seed)
        hits += low <= 1.5 <= high
    assert 0.75 <= hits / experiments <= 1.0


def test_bootstrap_interval_is_narrow_for_low_noise_and_wide_for_high_noise():
    quiet = bootstrap_ratio_ci(synthetic_rounds(10.0, 0.01, 20, 20, seed=3), synthetic_rounds(5.0, 0.01, 20, 20, seed=4), seed=0)
    noisy = bootstrap_ratio_ci(synthetic_rounds(10.0, 0.5, 20, 20, seed=3), synthetic_rounds(5.0, 0.5, 20, 20, seed=4), seed=0)
    assert quiet[1] - quiet[0] < 0.02  # < 1% of the ratio
    assert noisy[1] - noisy[0] > 10 * (quiet[1] - quiet[0])


def test_bootstrap_resamples_whole_rounds():
    """Rounds that disagree (drift hit one round) widen the interval; the same timings spread evenly do not."""
    generator = np.random.default_rng(5)
    baseline = 10.0 + 0.01 * generator.standard_normal((10, 20))
    candidate = 5.0 + 0.01 * generator.standard_normal((10, 20))
    drifted = baseline.copy()
    drifted[:3] *= 1.5  # three rounds ran on a busy machine
    clustered = bootstrap_ratio_ci(drifted, candidate, seed=0)
    shuffled = generator.permutation(drifted.ravel()).reshape(drifted.shape)
    spread = bootstrap_ratio_ci(shuffled, candidate, seed=0)
    assert clustered[1] - clustered[0] > spread[1] - spread[0]


def test_bootstrap_is_reproducible_with_a_seed():
    baseline = synthetic_rounds(10.0, 0.2, 8, 8, seed=6)
    candidate = synthetic_rounds(7.0, 0.2, 8, 8, seed=7)
    assert bootstrap_ratio_ci(baseline, candidate, seed=11) == bootstrap_ratio_ci(baseline, candidate, seed=11)
    assert bootstrap_ratio_ci(baseline, candidate, seed=11) != bootstrap_ratio_ci(baseline, candidate, seed=12)


@pytest.mark.parametrize(
    ("baseline", "candidate", "message"),
    [
        (np.ones((1, 5)), np.ones((1, 5)), "at least 2 rounds"),
        (np.ones((3, 5)), np.ones((4, 5)), "same number of rounds"),
        (np.ones(5), np.ones(5), "same number of rounds"),
    ],
)
def test_bootstrap_refuses_bad_shapes(baseline, candidate, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ratio_ci(baseline, candidate)


# Interleaving -------------------------------------------------------------------------


def test_alternating_order_swaps_who_goes_first():
    orders = round_orders(4, "alternate")
    assert orders == [
        ("baseline", "candidate"),
        ("candidate", "baseline"),
        ("baseline", "candidate"),
        ("candidate", "baseline"),
    ]


def test_random_order_is_seeded_and_mixed():
    orders = round_orders(40, "random", seed=3)
    assert orders == round_orders(40, "random", seed=3)
    assert orders != round_orders(40, "random", seed=4)
    firsts = [order[0] for order in orders]
    assert 10 <= firsts.count("baseline") <= 30
    assert all(sorted(order) == ["baseline", "candidate"] for order in orders)


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="unknown order"):
        round_orders(3, "sequential")


def test_rounds_run_in_the_planned_order():
    log: list[str] = []

    def fake(side: str, latency: float):
        def measure(iterations: int) -> np.ndarray:
            log.append(side)
            return np.full(iterations, latency)

        return measure

    orders = round_orders(4, "alternate")
    timings = run_interleaved({"baseline": fake("baseline", 2.0), "candidate": fake("candidate", 1.0)}, orders, 3)
    assert "".join(side[0] for side in log) == "bccbbccb"
    assert timings["baseline"].shape == timings["candidate"].shape == (4, 3)
    assert ratio_of_medians(timings["baseline"], timings["candidate"]) == 2.0


def test_drift_is_shared_when_interleaved():
    """A machine that slows down over the run: interleaved rounds still see the true ratio."""
    clock = {"now": 0}

    def drifting(cost: float):
        def measure(iterations: int) -> np.ndarray:
            values = []
            for _ in range(iterations):
                clock["now"] += 1
                values.append(cost * (1.0 + clock["now"] / 100.0))  # everything gets slower with time
            return np.array(values)

        return measure

    timings = run_interleaved({"baseline": drifting(2.0), "candidate": drifting(1.0)}, round_orders(20), 5)
    interleaved = ratio_of_medians(timings["baseline"], timings["candidate"])
    # Not interleaved: all baseline runs first, then all candidate runs (slower machine by then).
    clock["now"] = 0
    blocked_base = drifting(2.0)(100)
    blocked_cand = drifting(1.0)(100)
    blocked = ratio_of_medians(blocked_base, blocked_cand)
    assert abs(interleaved - 2.0) < 0.05
    assert abs(blocked - 2.0) > 0.5


# A real profile -------------------------------------------------------------------------


def test_profile_on_ort_cpu(small_onnx):
    result = profile(small_onnx, batch_sizes=(1, 3), iterations=15, warmup=2, layers=True)
    assert [batch.batch_size for batch in result.batches] == [1, 3]
    assert result.batches[1].input_shape == (3, 3, 8, 8)
    assert result.clock == "perf_counter_ns"
    assert result.backend["threads"] == 1
    for batch in result.batches:
        assert batch.timings_ms.shape == (15,)
        assert (batch.timings_ms > 0).all()
        assert batch.stats.median == pytest.approx(np.median(batch.timings_ms))
        assert batch.layers and {layer.kind for layer in batch.layers} >= {"Conv"}
    data = result.to_dict()
    assert len(data["batches"][0]["timings_ms"]) == 15
    assert "median ms" in result.format_table()
    assert "| 3 | 3×3×8×8 |" in result.to_markdown()


def test_profile_refuses_bad_iterations(small_onnx):
    with pytest.raises(BackendError, match="iterations"):
        profile(small_onnx, iterations=0)


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    return export_model("small", tmp_path_factory.mktemp("models"))
