"""Latency profiling with honest statistics: one model (``profile``) or two, interleaved (``compare``).

Every number comes from raw per-iteration timings (milliseconds; CUDA events
on GPU backends, ``perf_counter_ns`` on the CPU, see backends.py), which are
kept in the results for plots and re-analysis.

Comparisons run the two models in one process, in interleaved rounds: each
round times a block of baseline iterations and a block of candidate
iterations, in alternating order (AB, BA, AB, ...: neither model always
follows the other) or in a seeded random order. Machine-wide drift (another
job, clock boost, thermal throttling) then hits both models alike instead of
biasing whichever ran second. The speedup is ``median(baseline) /
median(candidate)``; its confidence interval is a percentile bootstrap that
resamples whole *rounds* with replacement (seeded), so the interval widens
when rounds disagree, which is exactly when a gate should not be sure.

Both time seeded random inputs (runtime/inputs.py says how they are drawn;
``val_range`` sets their range) unless ``inputs`` (a user's batch) is given:
then each batch size runs on the first that many samples. The result records
which (``inputs``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from egp_export.runtime.backends import DEFAULT_BACKEND, DEFAULT_THREADS, Backend, BackendError, LayerTime, get_backend
from egp_export.runtime.inputs import (
    ModelInputs,
    data_input_shape,
    fitted_feed,
    samples_for_batch,
)

DEFAULT_ITERATIONS = 100
DEFAULT_WARMUP = 10
DEFAULT_ROUNDS = 20
DEFAULT_ROUND_ITERATIONS = 20
DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
ORDERS = ("alternate", "random")
# Inferences the backend's own profiler averages over for the per-layer breakdown.
LAYER_ITERATIONS = 20
# Untimed runs at the start of each block: switching models evicts caches, and
# each model is timed in the steady state it would have when deployed alone.
BLOCK_WARMUP = 1
# Resamples per vectorised bootstrap chunk (bounds memory to chunk x all timings).
_BOOTSTRAP_CHUNK = 250


# Statistics (pure functions of timings) ---------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-iteration latencies in milliseconds (percentiles: linear interpolation)."""

    n: int
    median: float
    p90: float
    p99: float
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one timing
    min: float
    max: float

    def to_dict(self) -> dict:
        return {
            "n": self.n,
            "median_ms": self.median,
            "p90_ms": self.p90,
            "p99_ms": self.p99,
            "mean_ms": self.mean,
            "std_ms": self.std,
            "min_ms": self.min,
            "max_ms": self.max,
        }


def latency_stats(timings_ms: Sequence[float] | np.ndarray) -> LatencyStats:
    """Median, p90, p99, mean, std, min and max of raw timings (ms)."""
    values = np.asarray(timings_ms, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("no timings to summarise")
    median, p90, p99 = np.percentile(values, [50, 90, 99])
    return LatencyStats(
        n=int(values.size),
        median=float(median),
        p90=float(p90),
        p99=float(p99),
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        min=float(values.min()),
        max=float(values.max()),
    )


def ratio_of_medians(baseline_ms, candidate_ms) -> float:
    """Speedup of the candidate: median baseline latency / median candidate latency."""
    return float(np.median(np.asarray(baseline_ms, dtype=np.float64)) / np.median(np.asarray(candidate_ms, dtype=np.float64)))


def round_orders(rounds: int, order: str = "alternate", seed: int = 0) -> list[tuple[str, str]]:
    """Which model runs first in each round: alternating (AB, BA, ...) or a seeded random order."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    forward, backward = ("baseline", "candidate"), ("candidate", "baseline")
    if order == "alternate":
        return [forward if i % 2 == 0 else backward for i in range(rounds)]
    flips = np.random.default_rng(seed).integers(0, 2, size=rounds)
    return [backward if flip else forward for flip in flips]


def bootstrap_ratio_ci(
    baseline_rounds: np.ndarray,
    candidate_rounds: np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``ratio_of_medians`` resampling whole rounds (paired) with replacement.

    ``baseline_rounds`` and ``candidate_rounds`` are (rounds, iterations)
    arrays of timings; a resample draws round indices with replacement and
    takes both models' timings of those same rounds.
    """
    baseline = np.asarray(baseline_rounds, dtype=np.float64)
    candidate = np.asarray(candidate_rounds, dtype=np.float64)
    if baseline.ndim != 2 or candidate.ndim != 2 or baseline.shape[0] != candidate.shape[0]:
        raise ValueError("expected two (rounds, iterations) arrays with the same number of rounds")
    if baseline.shape[0] < 2:
        raise ValueError("a confidence interval needs at least 2 rounds")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    generator = np.random.default_rng(seed)
    rounds = baseline.shape[0]
    ratios = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        count = min(_BOOTSTRAP_CHUNK, resamples - start)
        picks = generator.integers(0, rounds, size=(count, rounds))
        base = np.median(baseline[picks].reshape(count, -1), axis=1)
        cand = np.median(candidate[picks].reshape(count, -1), axis=1)
        ratios[start : start + count] = base / cand
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)


# Profiling one model ------------------------------------------------------------------------


@dataclass
class BatchProfile:
    """Latency of one model at one batch size."""

    batch_size: int
    input_shape: tuple[int, ...]  # with the batch dimension (the first input's, for a model with several)
    stats: LatencyStats
    timings_ms: np.ndarray
    layers: list[LayerTime] | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every input by name

    @property
    def shapes_text(self) -> str:
        """``1x3x8x8``, or ``input_ids 1x12, attention_mask 1x12`` for several inputs."""
        if len(self.input_shapes) > 1:
            return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in self.input_shapes.items())
        return "x".join(map(str, self.input_shape))

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / (self.stats.median / 1000.0)

    def to_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "input_shape": list(self.input_shape),
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            **self.stats.to_dict(),
            "throughput_per_s": self.throughput,
            "timings_ms": [round(float(t), 6) for t in self.timings_ms],
            "layers": None if self.layers is None else [layer.to_dict() for layer in self.layers],
        }


@dataclass
class ProfileResult:
    """Latency of one model on one backend at one or more batch sizes."""

    model: str
    backend: dict  # Backend.describe()
    clock: str
    iterations: int
    warmup: int
    batches: list[BatchProfile] = field(default_factory=list)
    inputs: str = "random"  # what was timed: "random N(0, 1)" or the --inputs source

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "backend": dict(self.backend),
            "clock": self.clock,
            "iterations": self.iterations,
            "warmup": self.warmup,
            "inputs": self.inputs,
            "batches": [batch.to_dict() for batch in self.batches],
        }

    def format_table(self) -> str:
        """The latency table as aligned text (what ``egp-export profile`` prints)."""
        header = ["batch", "input", "median ms", "p90 ms", "p99 ms", "mean ms", "std ms", "samples/s"]
        rows = [
            [
                str(b.batch_size),
                b.shapes_text,
                f"{b.stats.median:.4f}",
                f"{b.stats.p90:.4f}",
                f"{b.stats.p99:.4f}",
                f"{b.stats.mean:.4f}",
                f"{b.stats.std:.4f}",
                f"{b.throughput:,.1f}",
            ]
            for b in self.batches
        ]
        return _aligned([header, *rows])

    def to_markdown(self, *, top_layers: int = 15) -> str:
        settings = ", ".join(f"{key} {value}" for key, value in self.backend.items() if key != "backend")
        lines = [
            "# egp-export latency profile",
            "",
            f"`{self.model}` on **{self.backend.get('backend')}**"
            + (f" ({settings})" if settings else "")
            + f"; {self.iterations} timed iterations after {self.warmup} warm-up, clock: {self.clock}; inputs: "
            f"{self.inputs}.",
            "",
            "| batch | input | median ms | p90 ms | p99 ms | mean ms | std ms | samples/s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for b in self.batches:
            s = b.stats
            lines.append(
                f"| {b.batch_size} | {b.shapes_text.replace('x', '×')} | {s.median:.4f} | {s.p90:.4f} | {s.p99:.4f} "
                f"| {s.mean:.4f} | {s.std:.4f} | {b.throughput:,.1f} |"
            )
        for b in self.batches:
            if not b.layers:
                continue
            total = sum(layer.ms for layer in b.layers)
            lines += [
                "",
                f"## Slowest layers at batch {b.batch_size}",
                "",
                f"Mean time per inference from the backend's own profiler (sum {total:.4f} ms; profiling adds overhead, "
                "so compare shares, not totals, with the table above).",
                "",
                "| layer | op | ms | share |",
                "|---|---|---:|---:|",
            ]
            for layer in b.layers[:top_layers]:
                share = layer.ms / total if total > 0 else 0.0
                lines.append(f"| `{layer.name}` | {layer.kind or '—'} | {layer.ms:.4f} | {share:.1%} |")
        return "\n".join(lines) + "\n"


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows)


def _progress_bar(total: int, description: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="it", disable=not enabled, file=sys.stderr, leave=False)


def _backend(backend: str | Backend, threads: int, options: dict | None) -> Backend:
    if isinstance(backend, Backend):
        return backend
    return get_backend(backend, threads=threads, **(options or {}))


def profile(
    model,
    *,
    backend: str | Backend = DEFAULT_BACKEND,
    batch_sizes: Sequence[int] = (1,),
    iterations: int = DEFAULT_ITERATIONS,
    warmup: int = DEFAULT_WARMUP,
    input_shape: Sequence[int] | None = None,
    dims: Mapping[str, int] | None = None,
    layers: bool = False,
    threads: int = DEFAULT_THREADS,
    backend_options: dict | None = None,
    seed: int = 0,
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> ProfileResult:
    """Time ``model`` (an ONNX path, or an nn.Module for torch-cuda) at each batch size.

    ``warmup`` untimed runs precede the ``iterations`` timed ones at each batch
    size. ``input_shape`` is the per-sample shape of a one-input model (read
    from the ONNX file when its dimensions are static); ``dims`` sizes named
    dynamic dimensions of any input (``{"seq": 12}``), which ``inputs`` also
    size. A model with several inputs runs on a dict of arrays, one per ONNX
    input name (runtime/inputs.py). With ``layers`` the backend's own profiler adds
    a per-layer breakdown where it offers one. ``inputs`` (a user's batch,
    ``inputs_source`` naming it) replaces the seeded random inputs: each batch
    size runs on its first samples.
    """
    if iterations < 1 or warmup < 0:
        raise BackendError(f"need iterations >= 1 and warmup >= 0, got {iterations} and {warmup}.")
    runner = _backend(backend, threads, backend_options)
    _prepare(runner, model, input_shape, dims, batch_sizes, inputs, inputs_source)
    clock = runner.clock()
    notes: list[str] = []
    data = None if inputs is None else fitted_feed(inputs, runner.inputs, inputs_source, notes)
    result = ProfileResult(
        model=_label(model),
        backend=runner.describe(),
        clock=clock.source,
        iterations=iterations,
        warmup=warmup,
        inputs=_timed_on(runner.inputs, data, inputs_source, val_range),
    )
    try:
        with _progress_bar(len(batch_sizes) * (warmup + iterations), f"profile {runner.name}", progress) as bar:
            for batch_size in batch_sizes:
                inputs = _batch(runner.inputs, data, int(batch_size), seed, inputs_source, val_range)
                bound = runner.bind(inputs)
                for _ in range(warmup):
                    bound()
                bar.update(warmup)
                timings = _measure_in_chunks(clock, bound, iterations, bar)
                breakdown = runner.layer_times(inputs, LAYER_ITERATIONS) if layers else None
                result.batches.append(
                    BatchProfile(
                        batch_size=int(batch_size),
                        input_shape=tuple(next(iter(inputs.values())).shape),
                        stats=latency_stats(timings),
                        timings_ms=timings,
                        layers=breakdown,
                        input_shapes={name: tuple(array.shape) for name, array in inputs.items()},
                    )
                )
    finally:
        if not isinstance(backend, Backend):
            runner.close()
    return result


def _measure_in_chunks(clock, bound, iterations: int, bar) -> np.ndarray:
    """``clock.measure`` in a few chunks, so that a progress bar moves during long runs."""
    chunk = max(1, iterations // 20)
    parts = []
    for start in range(0, iterations, chunk):
        count = min(chunk, iterations - start)
        parts.append(clock.measure(bound, count))
        bar.update(count)
    return np.concatenate(parts)


# Comparing two models -------------------------------------------------------------------------


@dataclass
class Comparison:
    """Interleaved A/B timings of a baseline and a candidate, and the speedup with its confidence interval."""

    backend: dict
    clock: str
    batch_size: int
    input_shape: tuple[int, ...]
    baseline_rounds: np.ndarray  # (rounds, iterations) ms
    candidate_rounds: np.ndarray
    orders: list[tuple[str, str]]
    speedup: float  # median(baseline) / median(candidate), all rounds pooled
    ci: tuple[float, float]
    confidence: float
    resamples: int
    seed: int
    baseline: str = ""
    candidate: str = ""
    inputs: str = "random"  # what was timed: "random N(0, 1)" or the --inputs source
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every input by name

    @property
    def round_speedups(self) -> np.ndarray:
        """Per-round ratio of medians (how stable the speedup was over the run)."""
        return np.median(self.baseline_rounds, axis=1) / np.median(self.candidate_rounds, axis=1)

    @property
    def baseline_stats(self) -> LatencyStats:
        return latency_stats(self.baseline_rounds)

    @property
    def candidate_stats(self) -> LatencyStats:
        return latency_stats(self.candidate_rounds)

    def to_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "candidate": self.candidate,
            "backend": dict(self.backend),
            "clock": self.clock,
            "batch_size": self.batch_size,
            "input_shape": list(self.input_shape),
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "rounds": int(self.baseline_rounds.shape[0]),
            "iterations_per_round": int(self.baseline_rounds.shape[1]),
            "orders": ["".join(side[0].upper() for side in order) for order in self.orders],
            "speedup": self.speedup,
            "ci": list(self.ci),
            "confidence": self.confidence,
            "resamples": self.resamples,
            "seed": self.seed,
            "round_speedups": [float(r) for r in self.round_speedups],
            "baseline_stats": self.baseline_stats.to_dict(),
            "candidate_stats": self.candidate_stats.to_dict(),
            "inputs": self.inputs,
            "baseline_timings_ms": np.round(self.baseline_rounds, 6).tolist(),
            "candidate_timings_ms": np.round(self.candidate_rounds, 6).tolist(),
        }


def run_interleaved(
    measure: dict[str, Callable[[int], np.ndarray]],
    orders: list[tuple[str, str]],
    iterations: int,
    *,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Run the rounds: for each round, ``measure[side](iterations)`` for both sides in that round's order.

    Returns each side's timings as a (rounds, iterations) array.
    """
    timings: dict[str, list[np.ndarray]] = {side: [] for side in measure}
    with _progress_bar(len(orders), "A/B rounds", progress) as bar:
        for order in orders:
            for side in order:
                timings[side].append(np.asarray(measure[side](iterations), dtype=np.float64))
            bar.update(1)
    return {side: np.stack(values) for side, values in timings.items()}


def compare(
    baseline,
    candidate,
    *,
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
    inputs=None,
    inputs_source: str = "inputs",
    val_range: tuple[float, float] | None = None,
    progress: bool = False,
) -> Comparison:
    """Time ``baseline`` and ``candidate`` (ONNX paths, or modules for torch-cuda) interleaved, in one process.

    Both run on the same backend, the same input batch (seeded random, or
    the first ``batch_size`` samples of ``inputs``), after
    ``warmup`` untimed runs each (``input_shape``, ``dims``: :func:`profile`); then ``rounds`` rounds of ``iterations``
    timed runs per model (each block preceded by one untimed run), ordered by
    ``order`` (see :func:`round_orders`). Returns the speedup
    (baseline / candidate median latency) and its bootstrap interval.
    """
    if rounds < 2 or iterations < 1 or warmup < 0:
        raise BackendError(f"need rounds >= 2, iterations >= 1 and warmup >= 0, got {rounds}, {iterations}, {warmup}.")
    if order not in ORDERS:
        raise BackendError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}.")
    runners = {side: get_backend(backend, threads=threads, **(backend_options or {})) for side in ("baseline", "candidate")}
    try:
        for side, model in (("baseline", baseline), ("candidate", candidate)):
            _prepare(runners[side], model, input_shape, dims, (batch_size,), inputs, inputs_source)
        specs = {side: runner.inputs for side, runner in runners.items()}
        check_same_inputs(specs["baseline"], specs["candidate"])
        data = None if inputs is None else fitted_feed(inputs, specs["baseline"], inputs_source)
        timed_on = _timed_on(specs["baseline"], data, inputs_source, val_range)
        inputs = _batch(specs["baseline"], data, batch_size, seed, inputs_source, val_range)
        # bind casts to each side's dtypes
        bounds = {side: runner.bind(fed_to(runner.inputs, inputs)) for side, runner in runners.items()}
        clocks = {side: runner.clock() for side, runner in runners.items()}
        for bound in bounds.values():
            for _ in range(warmup):
                bound()

        def measure_side(side: str) -> Callable[[int], np.ndarray]:
            def measure(count: int) -> np.ndarray:
                for _ in range(BLOCK_WARMUP):
                    bounds[side]()
                return clocks[side].measure(bounds[side], count)

            return measure

        orders = round_orders(rounds, order, seed)
        timings = run_interleaved({side: measure_side(side) for side in runners}, orders, iterations, progress=progress)
        description = runners["baseline"].describe()
        clock_source = clocks["baseline"].source
    finally:
        for runner in runners.values():
            runner.close()
    return Comparison(
        backend=description,
        clock=clock_source,
        batch_size=batch_size,
        input_shape=tuple(next(iter(inputs.values())).shape),
        baseline_rounds=timings["baseline"],
        candidate_rounds=timings["candidate"],
        orders=orders,
        speedup=ratio_of_medians(timings["baseline"], timings["candidate"]),
        ci=bootstrap_ratio_ci(timings["baseline"], timings["candidate"], confidence=confidence, resamples=resamples, seed=seed),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
        baseline=_label(baseline),
        candidate=_label(candidate),
        inputs=timed_on,
        input_shapes={name: tuple(array.shape) for name, array in inputs.items()},
    )


def check_same_inputs(baseline: ModelInputs, candidate: ModelInputs) -> None:
    """Refuse two models that do not take the same named inputs of the same per-sample shapes (dtypes may differ:
    each backend casts the one feed to its model's dtypes)."""

    def shapes(inputs: ModelInputs) -> str:
        return ", ".join(
            f"{spec.name!r} [{', '.join(map(str, (spec.fixed_batch or 'B', *spec.sample_shape)))}] {np.dtype(spec.dtype)}"
            for spec in inputs.specs
        )

    def key(inputs: ModelInputs) -> list:  # one input each: its name may differ (the feed is matched by position)
        return [(s.name if len(inputs.specs) > 1 else "", s.sample_shape) for s in inputs.specs]

    if key(baseline) != key(candidate):
        raise BackendError(
            f"the models take different inputs: baseline {shapes(baseline)}, candidate {shapes(candidate)}; the gate "
            "compares two versions of one model, so export both for the same inputs."
        )


def fed_to(inputs: ModelInputs, feed: dict):
    """``feed`` for a model taking ``inputs``: by name, or (one input each) its one array, whatever its name."""
    return next(iter(feed.values())) if len(inputs.specs) == 1 and len(feed) == 1 else feed


def _prepare(runner: Backend, model, input_shape, dims, batch_sizes, inputs, source: str) -> None:
    """``runner.prepare``, its dynamic dimensions sized by the user's ``inputs`` when given (and no ``input_shape``)."""
    if inputs is not None and input_shape is None and runner.accepts == "onnx":
        input_shape = data_input_shape(model, inputs, source)
    runner.prepare(model, input_shape=input_shape, batch_sizes=batch_sizes, dims=dims)


def _timed_on(inputs: ModelInputs, data, source: str, val_range) -> str:
    return f"random {inputs.describe_random(val_range)}" if data is None else source


def _batch(inputs: ModelInputs, data, batch_size: int, seed: int, source: str, val_range) -> dict:
    """What one batch size is timed on (a feed): the first samples of the user's data, or seeded random inputs."""
    if data is None:
        return inputs.random_batch(batch_size, seed, val_range)
    inputs.check_batch(batch_size)
    return samples_for_batch(data, batch_size, source)


def _label(model) -> str:
    return type(model).__name__ if hasattr(model, "forward") else str(model)
