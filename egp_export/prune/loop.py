"""The iterative prune / fine-tune loop: measure, plan, prune (or remove an activation), fine-tune, record, save.

Every iteration measures the activation statistics of the model as it is
(masks folded, eval mode, on the entropy samples in batches of
``ENTROPY_BATCH_SIZE``, the reference's training batch size), plans one
row per layer (entropy, importance, weights left, why it is excluded),
prunes ``rate`` of the
weights left in the eligible layers (EGP, NEPENTHE) or replaces one site by
the identity (EASIER), fine-tunes and records. Choices this loop makes:

- **Eligible layers** have H_l > 0 and non-zero weights left. Zero-entropy
  layers are frozen (EGP): pruning them further only kills what the
  compiler will keep. ``N`` counts the eligible layers only (as the
  reference's ``total_layers_weight_paras``), so the budget never asks for
  weights that may not be pruned; "halve the remaining weights" (rate 0.5)
  holds for them. The step prunes ``min(round(rate * N), N)`` weights, at
  least one.
- **Stopping rules**, checked on the dense model and after every
  iteration: ``iterations`` done, ``target_sparsity`` reached (the last
  step is shortened to land on it), ``target_linear_sites`` activation
  sites linear on the data (identity sites included; the compiler's
  criterion, which for ReLU is zero pooled entropy), or nothing left to
  prune. ``max_accuracy_drop`` *rejects* an iteration whose accuracy falls
  more than that below the dense model's: it stays in the history with
  ``accepted: false`` and the next iteration only fine-tunes, because a
  layer emptied by EGP's peaked budget usually recovers (measured on the
  quick digits demo: validation accuracy 0.807 right after a block's 3x3
  conv lost its last weight, 0.985 after the recovery iteration). A second
  rejection in a row stops. The result is the last accepted iteration;
  targets count only when reached by an accepted one.
- **Files** (with ``out_dir``): after every iteration the resumable
  ``state.pt``, ``iterations/iteration_NN.pt`` and ``metrics.jsonl``; at
  the end ``pruned.pt`` and the plots. Checkpoints keep
  ``weight_orig``/``weight_mask`` (``egp-export compile --checkpoint`` reads
  them) and EASIER's identity sites under ``METADATA_KEY``. A run that
  diverges (NaN/Inf in a loss, weight, output or pre-activation: a
  ``TrainingError``) writes nothing of the diverged iteration and removes
  the files it wrote before: a failed run leaves no outputs (resuming it
  would diverge again, its settings being the same).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.data import Dataset

from egp_export.analysis.ops import CONV_TYPES, LINEAR_TYPES
from egp_export.analysis.stats import SiteStats, calibrate
from egp_export.analysis.trace import trace
from egp_export.distributed import Runtime
from egp_export.errors import CalibrationError, CheckpointError, TrainingError
from egp_export.io.checkpoint import PRUNE_METADATA_KEY
from egp_export.io.fileio import save_torch_atomic
from egp_export.prune.easier import lowest_positive_entropy_site, replace_with_identity
from egp_export.prune.importance import (
    allocate_budgets,
    batch_layer_entropies,
    egp_importance,
    nepenthe_importance,
    pooled_layer_entropy,
)
from egp_export.prune.masks import (
    attach_masks,
    copy_model,
    effective_weight,
    make_permanent,
    prune_smallest,
    refresh_pruned_weights,
)
from egp_export.prune.sites import layers_of, site_layers
from egp_export.prune.training import (
    DIVERGENCE_ADVICE,
    METRICS_LOG,
    OptimConfig,
    evaluate,
    input_batches,
    train,
    write_metrics,
)
from egp_export.report.prune_plots import PLOTS, plot_history

# The reference measures the entropy on training batches of 128 (test_entropy over train_loader).
ENTROPY_BATCH_SIZE = 128
# A site counts as linear with the compiler's default tolerance (exact for piecewise-linear activations).
LINEAR_TOLERANCE = 1e-5

STATE_FILE = "state.pt"
PRUNED_CHECKPOINT = "pruned.pt"
ITERATIONS_DIR = "iterations"
STATE_FORMAT = "egp-export-prune-state"
METADATA_KEY = PRUNE_METADATA_KEY
# Settings a resumed run must share with the run it continues (``iterations`` may grow).
RESUME_KEYS = (
    "method", "entropy", "prune_shortcuts", "rate", "target_sparsity", "max_accuracy_drop", "target_linear_sites",
    "epochs_per_iteration", "optimizer", "lr", "momentum", "weight_decay", "scheduler", "batch_size",
    "entropy_samples", "seed", "world_size",
)


def output_paths(out_dir: Path) -> dict[str, Path]:
    """Every file (and the per-iteration folder) a run writes into ``out_dir``."""
    paths = {name: out_dir / name for name in (STATE_FILE, PRUNED_CHECKPOINT, METRICS_LOG, *PLOTS)}
    paths[ITERATIONS_DIR] = out_dir / ITERATIONS_DIR
    return paths


# Measuring and planning ---------------------------------------------------------------------


@dataclass
class Measurement:
    """Activation statistics of one model state: pooled per site, and the reference layer entropy per layer."""

    sites: list[SiteStats]
    site_layers: dict[str, tuple[str, ...]]
    reference_entropy: dict[str, float]


def _calibrate_per_batch(
    gm: fx.GraphModule, batches: list[torch.Tensor]
) -> tuple[list[SiteStats], dict[str, torch.Tensor]]:
    """Pooled SiteStats over ``batches``, and per site a ``[batches, 1 + neurons]`` count table.

    Row b of a site's table holds the observations of batch b (samples times
    positions) and then each neuron's ON count in it; an empty batch (this
    rank's share of a short last batch) is a row of zeros.
    """
    pooled: list[SiteStats] = []
    rows: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        sites = calibrate(gm, [batch]) if len(batch) else []
        # Read this batch's counts before merging: the first batch's SiteStats become the pooled ones.
        rows.append({site.name: torch.cat([torch.tensor([site.observations]), site.on_counts]) for site in sites})
        if not pooled:
            pooled = sites
        else:
            for total, part in zip(pooled, sites):
                total.merge(part)
    tables = {
        site.name: torch.stack([row.get(site.name, torch.zeros(1 + site.num_neurons, dtype=torch.int64)) for row in rows])
        for site in pooled
    }
    return pooled, tables


def measure(model: nn.Module, batches: list[torch.Tensor], runtime: Runtime, *, include_shortcuts: bool) -> Measurement:
    """Per-site activation statistics of ``model`` (masks folded, eval mode, CPU), merged over ranks."""
    permanent = make_permanent(model).cpu().eval()
    gm = trace(permanent)
    sites, tables = _calibrate_per_batch(gm, batches)
    runtime.reduce_sites(sites)
    # Every rank holds its share of every batch: summing the count tables gives each batch's counts exactly.
    names = list(tables)
    merged = runtime.sum(torch.cat([tables[name].flatten() for name in names])) if names else torch.zeros(0)
    on_fractions = {}
    offset = 0
    for name in names:
        rows, columns = tables[name].shape
        table = merged[offset : offset + rows * columns].reshape(rows, columns).to(torch.float64)
        offset += rows * columns
        on_fractions[name] = table[:, 1:] / table[:, :1]  # p_c^b = ON count / observations of batch b
    mapping = site_layers(gm, sites, include_shortcuts=include_shortcuts)
    reference = {
        layer: float(batch_layer_entropies([on_fractions[site] for site in fed]).mean())
        for layer, fed in layers_of(mapping).items()
    }
    return Measurement(sites, mapping, reference)


def _weight_counts(model: nn.Module, layers: Sequence[str]) -> tuple[int, int]:
    """(zero weights, all weights) over ``layers``."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in layers:
        weight = effective_weight(modules[name])
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total



def _plan(model: nn.Module, measurement: Measurement, method: str, entropy: str) -> list[dict]:
    """One row per layer feeding a site: entropy, importance, weights left, and why it is excluded (or None)."""
    modules = dict(model.named_modules())
    stats = {site.name: site for site in measurement.sites}
    rows = []
    for layer, sites in layers_of(measurement.site_layers).items():
        weight = effective_weight(modules[layer])
        neuron_entropies = [stats[s].neuron_entropy for s in sites]
        if entropy == "reference":
            layer_entropy = measurement.reference_entropy[layer]
        else:
            layer_entropy = pooled_layer_entropy(neuron_entropies)
        if method == "nepenthe":
            importance = nepenthe_importance(neuron_entropies, weight)
        else:
            importance = egp_importance(layer_entropy, weight)
        remaining = int((weight != 0).sum())
        excluded = "zero entropy" if layer_entropy == 0.0 else "no weights left" if remaining == 0 else None
        rows.append({
            "layer": layer, "sites": list(sites), "entropy": layer_entropy, "importance": importance,
            "remaining": remaining, "size": weight.numel(), "excluded": excluded, "budget": 0,
        })
    return rows


def _prune_step(model: nn.Module, rows: list[dict], rate: float, limit: int | None) -> int:
    """Allocate this iteration's budget over the eligible rows and prune; returns the number of weights pruned."""
    eligible = [row for row in rows if row["excluded"] is None]
    left = sum(row["remaining"] for row in eligible)
    amount = min(left, max(1, math.floor(rate * left + 0.5)))
    if limit is not None:
        amount = min(amount, limit)
    budgets = allocate_budgets(
        {row["layer"]: row["importance"] for row in eligible}, {row["layer"]: row["remaining"] for row in eligible}, amount
    )
    modules = dict(model.named_modules())
    for row in eligible:
        row["budget"] = budgets[row["layer"]]
        if row["budget"]:
            prune_smallest(modules[row["layer"]], row["budget"])
    return sum(budgets.values())


def _target_reached(record: dict, settings: dict) -> str | None:
    """The target (linear sites, sparsity) that the model in ``record`` meets, or None."""
    target = settings["target_linear_sites"]
    if target is not None and record["linear_sites"] >= target:
        return f"target_linear_sites: {record['linear_sites']} sites are linear on the data (target {target})"
    sparsity = settings["target_sparsity"]
    if sparsity is not None and record["sparsity"] >= sparsity - 1e-12:
        return f"target_sparsity: sparsity {record['sparsity']:.4f} reached the target {sparsity:g}"
    return None


def _snapshot(model: nn.Module, identity_sites: Sequence[str]) -> dict:
    """Everything needed to rebuild ``model`` from the original one: weights with masks, identity sites."""
    refresh_pruned_weights(model)
    return {
        "state_dict": {key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        "identity_sites": list(identity_sites),
    }


def _checkpoint(snapshot: dict, record: dict, method: str) -> dict:
    """A checkpoint ``egp-export compile --checkpoint`` reads: weights with masks, plus what pruning did."""
    metadata = {key: record[key] for key in ("iteration", "accuracy", "sparsity", "linear_sites")}
    return {
        "state_dict": snapshot["state_dict"],
        METADATA_KEY: {"method": method, **metadata, "identity_sites": snapshot["identity_sites"]},
    }


def load_state(path: Path, settings: dict) -> dict:
    """The pruning state saved in ``path``, refused unless it was started with the same ``settings``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise CheckpointError(
            f"cannot read the pruning state {path} ({type(error).__name__}: {error}); "
            "delete it, or start again without resume."
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not an egp-export pruning state; start again without resume.")
    saved = state["settings"]
    different = [
        f"{key}: {saved.get(key)!r} then, {settings[key]!r} now" for key in RESUME_KEYS if saved.get(key) != settings[key]
    ]
    if different:
        raise CheckpointError(
            f"cannot resume {path}: it was started with other settings ({'; '.join(different)}). "
            "Resume with the same settings, or start again in another output folder."
        )
    return state


class Pruning:
    """The state of one pruning run: the model being pruned, the last accepted snapshot, the history."""

    def __init__(
        self,
        original: nn.Module,
        train_set: Dataset,
        eval_set: Dataset,
        settings: dict,
        optim: OptimConfig,
        runtime: Runtime,
        out_dir: str | os.PathLike | None,
        show: bool,
    ) -> None:
        self.original = original
        self.train_set, self.eval_set = train_set, eval_set
        self.settings, self.optim, self.runtime = settings, optim, runtime
        self.out_dir = out_dir
        self.show = show
        self.method = settings["method"]
        self.calibration = input_batches(
            train_set, settings["entropy_samples"], runtime=runtime, batch_size=ENTROPY_BATCH_SIZE
        )
        self.history: list[dict] = []
        self.identity_sites: list[str] = []
        self.stop: str | None = None
        self.written: set[Path] = set()

    # Starting ----------------------------------------------------------------

    def start(self) -> None:
        started = time.perf_counter()
        self.working = copy_model(self.original).to(self.runtime.device).eval()
        self.measurement = self._measure(self.working)
        rows = _plan(self.working, self.measurement, self.method, self.settings["entropy"])
        self.prunable = [row["layer"] for row in rows]
        accuracy = evaluate(self.working, self.eval_set, runtime=self.runtime)
        record = self._record(0, rows, accuracy, float("nan"), started)
        self.accepted = _snapshot(self.working, self.identity_sites)
        self.stop = _target_reached(record, self.settings)
        self._save(record)

    def resume(self, state: dict, iterations: int) -> None:
        self.history = list(state["history"])
        self.identity_sites = list(state["working"]["identity_sites"])
        self.working = self._rebuild(state["working"])
        self.accepted = state["accepted"]
        self.prunable = [row["layer"] for row in self.history[0]["layers"]]
        self.measurement = self._measure(self.working)
        self.stop = state["stop_reason"]
        if self.stop is not None and self.stop.startswith("iterations") and self.history[-1]["iteration"] < iterations:
            self.stop = None

    def _rebuild(self, snapshot: dict) -> nn.Module:
        model = copy_model(self.original)
        if snapshot["identity_sites"]:
            model = replace_with_identity(model, snapshot["identity_sites"])
        attach_masks(model, snapshot["state_dict"])
        model.load_state_dict(snapshot["state_dict"], strict=True)
        return model.to(self.runtime.device).eval()

    # One iteration ----------------------------------------------------------

    def step(self, iteration: int) -> None:
        """Prune (or, after a rejected iteration, only recover), fine-tune, measure, record, save."""
        started = time.perf_counter()
        recovering = not self.history[-1]["accepted"]
        rows = _plan(self.working, self.measurement, self.method, self.settings["entropy"])
        if not recovering and not self._shrink(rows):
            return
        loss = train(
            self.working, self.train_set, self.optim, seed=self.settings["seed"] * 1_000_003 + iteration,
            runtime=self.runtime, progress=self.show, desc=f"iteration {iteration}",
        )
        accuracy = evaluate(self.working, self.eval_set, runtime=self.runtime)
        try:
            self.measurement = self._measure(self.working)
        except CalibrationError as error:  # iteration 0 measured this data: only the fine-tuned weights changed
            raise TrainingError(
                f"fine-tuning diverged in iteration {iteration}: {error} {DIVERGENCE_ADVICE}."
            ) from None
        record = self._record(iteration, rows, accuracy, loss, started)
        record["recovery"] = recovering
        if self.method == "easier" and not recovering:
            record["removed_site"] = self.identity_sites[-1]
        dense = self.history[0]["accuracy"]
        bound = self.settings["max_accuracy_drop"]
        if bound is not None and dense - accuracy > bound:
            record["accepted"] = False
            if recovering:
                self.stop = (
                    f"max_accuracy_drop: accuracy {accuracy:.4f} still more than {bound:g} below the dense "
                    f"{dense:.4f} after a recovery iteration; the result is the last accepted iteration"
                )
        else:
            self.accepted = _snapshot(self.working, self.identity_sites)
            self.stop = _target_reached(record, self.settings)
        self._save(record)

    def _shrink(self, rows: list[dict]) -> bool:
        """This iteration's pruning (EGP, NEPENTHE) or activation removal (EASIER); False when nothing is left."""
        if self.method == "easier":
            chosen = lowest_positive_entropy_site(self.measurement.sites)
            if chosen is None:
                self.stop = "nothing to prune: every remaining activation site has zero entropy"
                return False
            self.identity_sites.append(chosen.name)
            self.working = replace_with_identity(self.working, [chosen.name])
            return True
        limit = None
        if self.settings["target_sparsity"] is not None:
            zeros, total = _weight_counts(self.working, self.prunable)
            limit = max(0, math.ceil(self.settings["target_sparsity"] * total - 1e-9) - zeros)
        if _prune_step(self.working, rows, self.settings["rate"], limit) == 0:
            self.stop = "nothing to prune: every layer feeding an activation has zero entropy or no weights left"
            return False
        return True

    def _record(self, iteration: int, rows: list[dict], accuracy: float, loss: float, started: float) -> dict:
        zeros, total = _weight_counts(self.working, self.prunable)
        every_layer = [n for n, m in self.working.named_modules() if isinstance(m, CONV_TYPES + LINEAR_TYPES)]
        all_zeros, all_total = _weight_counts(self.working, every_layer)
        sites = self.measurement.sites
        record = {
            "iteration": iteration,
            "accuracy": accuracy,
            "train_loss": loss if math.isfinite(loss) else None,  # None: no training (iteration 0, zero epochs)
            "sparsity": zeros / total if total else 0.0,
            "global_sparsity": all_zeros / all_total if all_total else 0.0,
            "remaining_weights": total - zeros,
            "entropies": {site.name: site.entropy for site in sites},
            "zero_entropy_sites": sum(1 for site in sites if site.entropy == 0.0),
            "linear_sites": sum(1 for site in sites if site.linear_map(LINEAR_TOLERANCE).ok) + len(self.identity_sites),
            "identity_sites": list(self.identity_sites),
            "layers": rows,
            "budgets": {row["layer"]: row["budget"] for row in rows if row["budget"]},
            "pruned": sum(row["budget"] for row in rows),
            "accepted": True,
            "recovery": False,
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.history.append(record)
        return record

    # Files -------------------------------------------------------------------

    def paths(self) -> dict[str, Path]:
        """The files this process writes (none on ranks other than 0, or without ``out_dir``)."""
        return output_paths(Path(self.out_dir)) if self.out_dir is not None and self.runtime.is_main else {}

    def _save(self, record: dict) -> None:
        """After an iteration: the resumable state, that iteration's checkpoint, the metrics log."""
        paths = self.paths()
        if not paths:
            return
        working = self._save_state(paths)
        iteration_file = paths[ITERATIONS_DIR] / f"iteration_{record['iteration']:02d}.pt"
        iteration_file.parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(_checkpoint(working, record, self.method), iteration_file)
        write_metrics(self.history, paths[METRICS_LOG])
        self.written |= {iteration_file, paths[METRICS_LOG]}

    def _save_state(self, paths: dict[str, Path]) -> dict:
        working = _snapshot(self.working, self.identity_sites)
        state = {
            "format": STATE_FORMAT, "settings": self.settings, "history": self.history, "stop_reason": self.stop,
            "working": working, "accepted": self.accepted,
        }
        save_torch_atomic(state, paths[STATE_FILE])
        self.written.add(paths[STATE_FILE])
        return working

    def remove_outputs(self) -> None:
        """Delete every file this run wrote (after a TrainingError: a failed run leaves no outputs)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        folder = self.paths().get(ITERATIONS_DIR)
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        self.written.clear()

    def _measure(self, model: nn.Module) -> Measurement:
        return measure(model, self.calibration, self.runtime, include_shortcuts=self.settings["prune_shortcuts"])

    # Running and finishing ------------------------------------------------------------

    def run(self, iterations: int) -> None:
        """Iterate up to ``iterations`` (counting those already done) or until a stopping rule holds."""
        first = self.history[-1]["iteration"] + 1
        bar = None
        if self.show and first <= iterations and self.stop is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=iterations - first + 1, desc=f"{self.method.upper()} pruning", unit="iteration")
        for iteration in range(first, iterations + 1):
            if self.stop is not None:
                break
            self.step(iteration)
            if bar is not None:
                last = self.history[-1]
                bar.update(1)
                bar.set_postfix(acc=f"{last['accuracy']:.4f}", sparsity=f"{last['sparsity']:.3f}",
                                linear=last["linear_sites"])
        if bar is not None:
            bar.close()
        if self.stop is None:
            self.stop = f"iterations: all {iterations} iterations done"

    def finish(self) -> tuple[nn.Module, Measurement]:
        """Write the final files; return the last accepted model (masks attached) and its measurement."""
        final = next(record for record in reversed(self.history) if record["accepted"])
        model = self.working if self.history[-1]["accepted"] else self._rebuild(self.accepted)
        paths = self.paths()
        if paths:
            self._save_state(paths)
            save_torch_atomic(_checkpoint(self.accepted, final, self.method), paths[PRUNED_CHECKPOINT])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # matplotlib's layout notes
                plot_history(self.history, self.out_dir)
        measurement = self.measurement if model is self.working else self._measure(model)
        return model, measurement
