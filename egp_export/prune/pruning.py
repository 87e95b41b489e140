"""Entropy-guided pruning (EGP) and its follow-ups NEPENTHE and EASIER, feeding the compiler.

EGP (Liao, Quétu, Nguyen, Tartaglione, ICCVW 2023) prunes the weights of
low-entropy layers until their activations are linear on the data; every
iteration it measures, prunes, fine-tunes:

    H_l = mean over neurons c of h(p_c)        p_c = P(z_c > 0) on training data, h = binary entropy (bits)
    I_l = H_l * mean |w|                       over the layer's non-zero weights
    R_l = (sum_k I_k) / I_l                    sum over the eligible layers k
    n_l = rate * N * softmax(R)_l              N = non-zero weights left in the eligible layers
    prune the n_l smallest |w| of layer l      (L1, unstructured, torch.nn.utils.prune masks)

The entropy is ``analysis.calibrate``'s, per activation *call site* (a
shared ``nn.ReLU`` called twice is two sites, functional ``F.relu`` /
``x.relu()`` calls are sites too), measured in eval mode on (the first
``entropy_samples`` of) the training data: exactly the statistics the
compiler later linearizes on.

Where the papers leave a choice open, this module decides:

- **The layer of a site** is the conv/linear whose output reaches the site
  through BatchNorm, eval-mode identities (Dropout, Identity) and pooling.
  Through a residual add the site belongs to every conv/linear operand
  (``relu(bn2(conv2(x)) + shortcut(x))`` -> conv2 and the shortcut conv, if
  any); an operand that is not a layer (the identity shortcut) contributes
  none. A site reached from anything else (concat, reshape, a model input)
  has no layer: its entropy is measured and logged, nothing is pruned for
  it. A layer feeding several sites (a shared conv, a conv read by two
  activations) gets the entropy of all their neurons together:
  ``H_l = mean(concat(h_s))``, zero only when every one of them is.
  Layers that feed no site (the classifier) are never pruned.
- **Eligible layers** have H_l > 0 and non-zero weights left. Zero-entropy
  layers are frozen (EGP): pruning them further only kills what the
  compiler will keep. ``N`` counts the eligible layers only, so the budget
  never asks for weights that may not be pruned; "halve the remaining
  weights" (rate 0.5) holds for them.
- **The softmax** is evaluated stably (``exp(R - max R)``); R is large when
  I is small and the softmax then puts (almost) the whole budget on the
  least important layer. ``I_l = 0`` with ``H_l > 0`` (NEPENTHE, when every
  neuron that still varies has lost all its own weights) is R_l = +inf: the
  limit of the softmax, so such layers share the budget equally first.
- **Caps**: a layer never loses more than it has. The excess is
  redistributed over the uncapped layers by the softmax of their own R
  (same R, the sum S is not recomputed), repeatedly until nothing is
  capped, then rounded to integers by largest remainder (ties to the
  earlier layer in graph order); the total is exactly
  ``min(round(rate * N), N)``, at least one weight.
- **Ties in magnitude** inside a layer: the lower flat index is pruned
  first (a stable sort), so runs are deterministic. A weight that is exactly
  zero counts as pruned.
- **Masks**: the first pruning of a layer calls
  ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` +
  ``weight_mask``); later iterations update that ``weight_mask`` in place,
  so one reparametrization per layer carries every iteration and
  checkpoints have the form ``checkpoint.load_state_dict`` folds.
- **NEPENTHE** (Liao et al. 2024) uses neuron-level weight magnitudes in the
  importance. Its text does not pin down the aggregation; here
  ``I_l = mean_c h(p_c) * mean|w_c|`` with ``w_c`` the non-zero incoming
  weights of neuron c (row c of the layer's weight; 0 for an emptied row),
  so a neuron that is already constant adds nothing, however large its
  weights. Budget, caps and exclusion are EGP's.
- **EASIER** (Quétu, Liao, Tartaglione, ECML PKDD 2024) prunes no weights:
  every iteration it replaces the activation site of lowest *positive*
  entropy by the identity (rewriting that call site in the traced
  ``GraphModule``, so a shared module keeps its other calls), then
  retrains. Its released code also turns every zero-entropy site into the
  identity; here those are left to the compiler, which replaces them
  *exactly* by their per-neuron ON/OFF map (the identity would switch their
  OFF neurons on). EASIER measures the entropy in training mode while
  training; here it is the eval-mode measurement EGP uses.
- **Stopping rules**, checked on the dense model and after every
  iteration: ``iterations`` done, ``target_sparsity`` reached (the last
  step is shortened to land on it), ``target_linear_sites`` activation
  sites linear on the data (identity sites included; the compiler's
  criterion, which for ReLU is zero entropy), or nothing left to prune.
  ``max_accuracy_drop`` *rejects* an iteration whose accuracy falls more
  than that below the dense model's: it stays in the history with
  ``accepted: false`` and the next iteration only fine-tunes, because a
  layer emptied by EGP's peaked budget usually recovers (measured on the
  quick digits demo: validation accuracy 0.807 right after a block's 3x3
  conv lost its last weight, 0.985 after the recovery iteration). A second
  rejection in a row stops. The
  result is always the last accepted iteration; targets count only when
  reached by an accepted one.

``prune`` returns the model with the masks made permanent (plain weights,
pruned ones zero): what ``egp_export.compile`` takes. The checkpoints it
writes keep ``weight_orig``/``weight_mask`` (``egp-export compile
--checkpoint`` reads them) and the per-layer masks are in the result.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from egp_export.analysis.ops import BATCHNORM_TYPES, CONV_TYPES, IDENTITY_TYPES, LINEAR_TYPES, module_of, named_modules
from egp_export.analysis.stats import SiteStats, calibrate
from egp_export.analysis.trace import trace
from egp_export.errors import CheckpointError, OutputError
from egp_export.io.fileio import check_writable
from egp_export.prune.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MOMENTUM,
    DEFAULT_WEIGHT_DECAY,
    METRICS_LOG,
    PLOTS,
    OptimConfig,
    Runtime,
    as_dataset,
    evaluate,
    input_batches,
    plot_history,
    save_torch_atomic,
    train,
    write_metrics,
)

METHODS = ("egp", "nepenthe", "easier")
DEFAULT_RATE = 0.5
DEFAULT_ITERATIONS = 10
DEFAULT_EPOCHS_PER_ITERATION = 5
DEFAULT_ENTROPY_SAMPLES = 4096
# A site counts as linear with the compiler's default tolerance (exact for piecewise-linear activations).
LINEAR_TOLERANCE = 1e-5

STATE_FILE = "state.pt"
PRUNED_CHECKPOINT = "pruned.pt"
ITERATIONS_DIR = "iterations"
STATE_FORMAT = "egp-export-prune-state"
METADATA_KEY = "egp_prune"
# Settings a resumed run must share with the run it continues (``iterations`` may grow).
RESUME_KEYS = (
    "method", "rate", "target_sparsity", "max_accuracy_drop", "target_linear_sites", "epochs_per_iteration",
    "optimizer", "lr", "momentum", "weight_decay", "scheduler", "batch_size", "entropy_samples", "seed", "world_size",
)

# Single-input modules a site's pre-activation passes through on its way from the layer (eval mode).
_PASS_THROUGH = BATCHNORM_TYPES + IDENTITY_TYPES + (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


# Sites and the layers that feed them ---------------------------------------


def _producers(node: fx.Node, modules: Mapping[str, nn.Module]) -> list[str]:
    module = module_of(node, modules)
    if isinstance(module, CONV_TYPES + LINEAR_TYPES):
        return [str(node.target)]
    if isinstance(module, _PASS_THROUGH) and node.args and isinstance(node.args[0], fx.Node):
        return _producers(node.args[0], modules)
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if is_add:
        return [layer for operand in node.all_input_nodes for layer in _producers(operand, modules)]
    return []


def site_layers(gm: fx.GraphModule, sites: Sequence[SiteStats]) -> dict[str, tuple[str, ...]]:
    """Activation site name -> qualified names of the conv/linear layers feeding it (see the module docstring)."""
    modules = named_modules(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    return {
        site.name: tuple(dict.fromkeys(_producers(nodes[site.name].args[0], modules)))
        for site in sites
    }


def layers_of(mapping: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Layer -> the sites it feeds, layers in the order they are first met."""
    layers: dict[str, list[str]] = {}
    for site, producers in mapping.items():
        for layer in producers:
            layers.setdefault(layer, []).append(site)
    return layers


# Importance and budget -------------------------------------------------------


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with: ``weight_orig * weight_mask`` while pruning masks are attached."""
    with torch.no_grad():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            return (module.weight_orig * module.weight_mask).detach()
        return module.weight.detach()


def egp_importance(neuron_entropies: Sequence[torch.Tensor], weight: torch.Tensor) -> tuple[float, float]:
    """(H_l, I_l) of EGP: layer entropy over all fed neurons, times the mean |w| of the non-zero weights."""
    entropy = float(torch.cat(list(neuron_entropies)).mean())
    alive = weight[weight != 0]
    mean_abs = float(alive.abs().to(torch.float64).mean()) if alive.numel() else 0.0
    return entropy, entropy * mean_abs


def nepenthe_importance(neuron_entropies: Sequence[torch.Tensor], weight: torch.Tensor) -> tuple[float, float]:
    """(H_l, I_l) of NEPENTHE: mean over neurons of h(p_c) times the mean |w| of neuron c's non-zero weights."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    alive = (rows != 0).sum(1)
    row_mean = torch.where(alive > 0, rows.abs().sum(1) / alive.clamp_min(1), torch.zeros_like(rows[:, 0]))
    terms = []
    for entropies in neuron_entropies:
        if entropies.numel() != row_mean.numel():
            raise ValueError(
                f"a site fed by a layer with {row_mean.numel()} output neurons has {entropies.numel()} neurons"
            )
        terms.append(entropies.to(torch.float64) * row_mean)
    return float(torch.cat(list(neuron_entropies)).mean()), float(torch.cat(terms).mean())


def softmax_shares(ratios: torch.Tensor) -> torch.Tensor:
    """softmax(ratios), computed as exp(R - max R); +inf entries share everything equally (the limit)."""
    ratios = ratios.to(torch.float64)
    infinite = torch.isinf(ratios) & (ratios > 0)
    if infinite.any():
        return infinite.to(torch.float64) / infinite.sum()
    exps = torch.exp(ratios - ratios.max())
    return exps / exps.sum()


def allocate_budgets(importance: Mapping[str, float], remaining: Mapping[str, int], amount: int) -> dict[str, int]:
    """How many weights each layer loses: ``amount`` split by softmax(S / I), capped, excess redistributed.

    ``importance`` and ``remaining`` are keyed by the eligible layers, in graph
    order. R_l = S / I_l with S = sum of all I; layers whose share exceeds what
    they have left lose all of it and the rest of ``amount`` is split over the
    others by the softmax of their R, until no share exceeds its cap. Shares
    are rounded by largest remainder (ties to the earlier layer), so the
    budgets add up to ``min(amount, sum(remaining))`` exactly.
    """
    names = list(importance)
    if set(names) != set(remaining):
        raise ValueError("importance and remaining must name the same layers")
    values = torch.tensor([float(importance[n]) for n in names], dtype=torch.float64)
    if (values < 0).any() or torch.isnan(values).any():
        raise ValueError(f"importances must be non-negative numbers, got {values.tolist()}")
    total = values.sum()
    with torch.no_grad():
        ratios = torch.where(values > 0, total / values.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    ratio_of = dict(zip(names, ratios.tolist()))
    budgets = {name: 0 for name in names}
    left = min(int(amount), sum(int(remaining[n]) for n in names))
    open_layers = [n for n in names if remaining[n] > 0]
    while left > 0 and open_layers:
        shares = softmax_shares(torch.tensor([ratio_of[n] for n in open_layers], dtype=torch.float64))
        desired = (left * shares).tolist()
        capped = [n for n, want in zip(open_layers, desired) if want >= remaining[n]]
        if capped:
            for name in capped:
                budgets[name] = int(remaining[name])
                left -= int(remaining[name])
            open_layers = [n for n in open_layers if n not in capped]
            continue
        floors = [math.floor(want) for want in desired]
        by_remainder = sorted(range(len(open_layers)), key=lambda i: -(desired[i] - floors[i]))
        for position in by_remainder[: left - sum(floors)]:
            floors[position] += 1
        for name, count in zip(open_layers, floors):
            budgets[name] = count
        left = 0
    return budgets


# Masks ---------------------------------------------------------------------------


def _refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute pruned ``weight`` attributes outside autograd, so the model can be deep-copied.

    A forward pass with gradients leaves ``weight = weight_orig * weight_mask``
    as a non-leaf tensor, which ``copy.deepcopy`` refuses.
    """
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, pruning reparametrizations included."""
    _refresh_pruned_weights(model)
    return copy.deepcopy(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every pruning mask folded into its tensor (``torch.nn.utils.prune.remove``)."""
    permanent = copy_model(model)
    for module in permanent.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return permanent


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Qualified layer name -> boolean keep-mask of its weight, for every layer with a pruning mask."""
    return {
        name: module.weight_mask.detach().to(torch.bool).clone()
        for name, module in model.named_modules()
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig")
    }


def prune_smallest(module: nn.Module, count: int) -> int:
    """Prune the ``count`` smallest-magnitude non-zero weights of ``module`` (ties: lower flat index first).

    The first call attaches a ``torch.nn.utils.prune`` mask; later calls update
    it in place. Returns the number of weights left.
    """
    weight = effective_weight(module)
    alive = (weight != 0).flatten()
    if count > int(alive.sum()):
        raise ValueError(f"cannot prune {count} weights: only {int(alive.sum())} are left")
    scores = torch.where(alive, weight.abs().flatten(), torch.full_like(weight.flatten(), torch.inf))
    chosen = torch.argsort(scores, stable=True)[:count]
    keep = alive.clone()
    keep[chosen] = False
    mask = keep.view_as(weight).to(weight.dtype)
    with torch.no_grad():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            module.weight_mask.copy_(mask)
        else:
            torch_prune.custom_from_mask(module, "weight", mask)
    return int(keep.sum())


def attach_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give every layer that ``state_dict`` has a ``weight_mask`` for a (still all-ones) pruning mask."""
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(".weight_mask"):
            continue
        module = modules.get(key[: -len(".weight_mask")])
        if module is not None and not hasattr(module, "weight_mask"):
            torch_prune.identity(module, "weight")


# EASIER -----------------------------------------------------------------------------


def replace_with_identity(model: nn.Module, sites: Sequence[str]) -> fx.GraphModule:
    """``model`` as a GraphModule with the activation call sites ``sites`` (node names) replaced by the identity.

    A GraphModule is rewritten in place; any other module is traced first (a
    copy, in eval mode). Only the named call is rewritten: a module called at
    several sites keeps its other calls.
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(copy_model(model).eval())
    nodes = {node.name: node for node in gm.graph.nodes}
    for name in sites:
        node = nodes.get(name)
        if node is None or not node.args or not isinstance(node.args[0], fx.Node):
            raise ValueError(f"the model has no activation call site named {name!r}")
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


# The loop ---------------------------------------------------------------------------


@dataclass
class PruneResult:
    """What ``prune`` produced.

    ``model``: the last accepted iteration with its masks made permanent (a
    GraphModule for EASIER), ready for ``egp_export.compile``. ``masks``:
    layer -> boolean keep-mask of that model. ``history``: one record per
    iteration (0 = the model as given) with accuracy, sparsity, entropy per
    site, zero-entropy and linear site counts, each layer's entropy,
    importance and budget, and whether the iteration was accepted.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    history: list[dict]
    stop_reason: str
    method: str
    identity_sites: list[str] = field(default_factory=list)
    site_layers: dict[str, list[str]] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def final(self) -> dict:
        """The record of the returned model (the last accepted iteration)."""
        return next(record for record in reversed(self.history) if record["accepted"])

    @property
    def dense_accuracy(self) -> float:
        return self.history[0]["accuracy"]

    @property
    def accuracy(self) -> float:
        return self.final["accuracy"]

    @property
    def sparsity(self) -> float:
        return self.final["sparsity"]


@dataclass
class _Measurement:
    sites: list[SiteStats]
    site_layers: dict[str, tuple[str, ...]]


def _measure(model: nn.Module, batches: list[torch.Tensor], runtime: Runtime) -> _Measurement:
    """Per-site activation statistics of ``model`` (masks folded, eval mode, CPU), merged over ranks."""
    permanent = make_permanent(model).cpu().eval()
    gm = trace(permanent)
    sites = calibrate(gm, batches)
    runtime.reduce_sites(sites)
    return _Measurement(sites, site_layers(gm, sites))


def _weight_counts(model: nn.Module, layers: Sequence[str]) -> tuple[int, int]:
    """(zero weights, all weights) over ``layers``."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for name in layers:
        weight = effective_weight(modules[name])
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros, total


def _plan(model: nn.Module, measurement: _Measurement, method: str) -> list[dict]:
    """One row per layer feeding a site: entropy, importance, weights left, and why it is excluded (or None)."""
    modules = dict(model.named_modules())
    stats = {site.name: site for site in measurement.sites}
    importance_of = nepenthe_importance if method == "nepenthe" else egp_importance
    rows = []
    for layer, sites in layers_of(measurement.site_layers).items():
        weight = effective_weight(modules[layer])
        entropy, importance = importance_of([stats[s].neuron_entropy for s in sites], weight)
        remaining = int((weight != 0).sum())
        excluded = "zero entropy" if entropy == 0.0 else "no weights left" if remaining == 0 else None
        rows.append({
            "layer": layer, "sites": list(sites), "entropy": entropy, "importance": importance,
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


def _easier_choice(measurement: _Measurement) -> SiteStats | None:
    """The site of lowest positive entropy (ties: first in graph order), or None when every site is constant."""
    candidates = [site for site in measurement.sites if site.entropy > 0.0]
    return min(candidates, key=lambda site: site.entropy) if candidates else None


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
    _refresh_pruned_weights(model)
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


def _load_state(path: Path, settings: dict) -> dict:
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


class _Pruning:
    """The state of one pruning run: the model being pruned, the last accepted snapshot, the history."""

    def __init__(self, original, train_set, eval_set, settings, optim, runtime, out_dir, show) -> None:
        self.original = original
        self.train_set, self.eval_set = train_set, eval_set
        self.settings, self.optim, self.runtime = settings, optim, runtime
        self.out_dir = out_dir
        self.show = show
        self.method = settings["method"]
        self.calibration = input_batches(train_set, settings["entropy_samples"], runtime=runtime)
        self.history: list[dict] = []
        self.identity_sites: list[str] = []
        self.stop: str | None = None

    # Starting ----------------------------------------------------------------

    def start(self) -> None:
        started = time.perf_counter()
        self.working = copy_model(self.original).to(self.runtime.device).eval()
        self.measurement = _measure(self.working, self.calibration, self.runtime)
        rows = _plan(self.working, self.measurement, self.method)
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
        self.measurement = _measure(self.working, self.calibration, self.runtime)
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
        rows = _plan(self.working, self.measurement, self.method)
        if not recovering and not self._shrink(rows):
            return
        loss = train(
            self.working, self.train_set, self.optim, seed=self.settings["seed"] * 1_000_003 + iteration,
            runtime=self.runtime, progress=self.show, desc=f"iteration {iteration}",
        )
        accuracy = evaluate(self.working, self.eval_set, runtime=self.runtime)
        self.measurement = _measure(self.working, self.calibration, self.runtime)
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
            chosen = _easier_choice(self.measurement)
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

    def _paths(self) -> dict[str, Path]:
        return _output_paths(Path(self.out_dir)) if self.out_dir is not None and self.runtime.is_main else {}

    def _save(self, record: dict) -> None:
        """After an iteration: the resumable state, that iteration's checkpoint, the metrics log."""
        paths = self._paths()
        if not paths:
            return
        working = self._save_state(paths)
        iteration_file = paths[ITERATIONS_DIR] / f"iteration_{record['iteration']:02d}.pt"
        iteration_file.parent.mkdir(parents=True, exist_ok=True)
        save_torch_atomic(_checkpoint(working, record, self.method), iteration_file)
        write_metrics(self.history, paths[METRICS_LOG])

    def _save_state(self, paths: dict[str, Path]) -> dict:
        working = _snapshot(self.working, self.identity_sites)
        state = {
            "format": STATE_FORMAT, "settings": self.settings, "history": self.history, "stop_reason": self.stop,
            "working": working, "accepted": self.accepted,
        }
        save_torch_atomic(state, paths[STATE_FILE])
        return working

    def finish(self) -> PruneResult:
        final = next(record for record in reversed(self.history) if record["accepted"])
        model = self.working if self.history[-1]["accepted"] else self._rebuild(self.accepted)
        paths = self._paths()
        if paths:
            self._save_state(paths)
            save_torch_atomic(_checkpoint(self.accepted, final, self.method), paths[PRUNED_CHECKPOINT])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # matplotlib's layout notes
                plot_history(self.history, self.out_dir)
        measurement = self.measurement if model is self.working else _measure(model, self.calibration, self.runtime)
        return PruneResult(
            model=make_permanent(model).cpu().eval(),
            masks={name: mask.cpu() for name, mask in masks_of(model).items()},
            history=self.history,
            stop_reason=self.stop or "",
            method=self.method,
            identity_sites=list(self.accepted["identity_sites"]),
            site_layers={site: list(layers) for site, layers in measurement.site_layers.items()},
            paths=paths,
        )


def _output_paths(out_dir: Path) -> dict[str, Path]:
    paths = {name: out_dir / name for name in (STATE_FILE, PRUNED_CHECKPOINT, METRICS_LOG, *PLOTS)}
    paths[ITERATIONS_DIR] = out_dir / ITERATIONS_DIR
    return paths


def check_outputs(out_dir: Path, *, force: bool) -> None:
    """Refuse, before any work, a prune output folder whose files exist (without ``force``) or cannot be written."""
    for name, path in _output_paths(out_dir).items():
        if name == ITERATIONS_DIR:
            if path.is_dir() and any(path.iterdir()) and not force:
                raise OutputError(f"{path} already holds checkpoints; pass --force (force=True) to overwrite them.")
            continue
        check_writable(path, force=force)


def prune(
    model: nn.Module,
    train_data,
    eval_data,
    method: str = "egp",
    *,
    rate: float = DEFAULT_RATE,
    iterations: int = DEFAULT_ITERATIONS,
    target_sparsity: float | None = None,
    max_accuracy_drop: float | None = None,
    target_linear_sites: int | None = None,
    epochs_per_iteration: int = DEFAULT_EPOCHS_PER_ITERATION,
    optimizer: str = "sgd",
    lr: float = DEFAULT_LR,
    momentum: float = DEFAULT_MOMENTUM,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    scheduler: str = "multistep",
    batch_size: int = DEFAULT_BATCH_SIZE,
    entropy_samples: int | None = DEFAULT_ENTROPY_SAMPLES,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    runtime: Runtime | None = None,
) -> PruneResult:
    """Prune ``model`` with EGP, NEPENTHE or EASIER until a stopping rule holds, fine-tuning after every step.

    ``train_data`` / ``eval_data``: ``(inputs, targets)`` tensors, a map-style
    Dataset of (input, target), or a DataLoader (its dataset is used). The
    entropy is measured on the first ``entropy_samples`` training samples
    (all for None); accuracy on ``eval_data``. Each iteration prunes ``rate``
    of the weights left in the eligible layers (EGP, NEPENTHE) or removes one
    activation (EASIER), then trains ``epochs_per_iteration`` epochs with a
    fresh optimizer and schedule (training.py). An iteration more than
    ``max_accuracy_drop`` below the dense accuracy is rejected; the next one
    only fine-tunes (layer collapse often recovers), and a second rejection
    in a row stops. The result is the last accepted iteration.

    With ``out_dir`` every iteration writes ``state.pt`` (for ``resume``),
    ``iterations/iteration_NN.pt`` and ``metrics.jsonl``; the end writes
    ``pruned.pt`` and three plots. Existing outputs need ``force``; ``resume``
    continues from ``state.pt`` with the same settings (``iterations`` may
    grow) and repeats the uninterrupted run exactly. ``runtime`` runs the work
    under DDP (egp_export.prune.distributed). ``model`` is never modified.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    if target_sparsity is not None and not 0.0 < target_sparsity <= 1.0:
        raise ValueError(f"target_sparsity must be in (0, 1], got {target_sparsity}")
    if target_sparsity is not None and method == "easier":
        raise ValueError("EASIER removes activations and prunes no weights: target_sparsity does not apply")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0.0:
        raise ValueError(f"max_accuracy_drop must be non-negative, got {max_accuracy_drop}")
    if target_linear_sites is not None and target_linear_sites < 0:
        raise ValueError(f"target_linear_sites must be non-negative, got {target_linear_sites}")
    if entropy_samples is not None and entropy_samples < 1:
        raise ValueError(f"entropy_samples must be positive, got {entropy_samples}")
    runtime = runtime or Runtime()
    optim = OptimConfig(
        epochs=epochs_per_iteration, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
        scheduler=scheduler, batch_size=batch_size,
    )
    settings = {
        "method": method, "rate": rate, "target_sparsity": target_sparsity, "max_accuracy_drop": max_accuracy_drop,
        "target_linear_sites": target_linear_sites, "epochs_per_iteration": epochs_per_iteration,
        "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "scheduler": scheduler,
        "batch_size": batch_size, "entropy_samples": entropy_samples, "seed": seed, "world_size": runtime.world_size,
    }
    state = None
    if out_dir is not None:
        # Every rank checks (they share the folder); none writes before all have.
        state_file = Path(out_dir) / STATE_FILE
        if resume and state_file.exists():
            state = _load_state(state_file, settings)
        else:
            check_outputs(Path(out_dir), force=force)
        runtime.barrier()
    show = progress and runtime.is_main
    run = _Pruning(
        copy_model(model).eval(), as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data"),
        settings, optim, runtime, out_dir, show,
    )
    if state is None:
        run.start()
    else:
        run.resume(state, iterations)
    first = run.history[-1]["iteration"] + 1
    bar = None
    if show and first <= iterations and run.stop is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=iterations - first + 1, desc=f"{method.upper()} pruning", unit="iteration")
    for iteration in range(first, iterations + 1):
        if run.stop is not None:
            break
        run.step(iteration)
        if run.stop is None and iteration == iterations:
            run.stop = f"iterations: all {iterations} iterations done"
        if bar is not None:
            last = run.history[-1]
            bar.update(1)
            bar.set_postfix(acc=f"{last['accuracy']:.4f}", sparsity=f"{last['sparsity']:.3f}", linear=last["linear_sites"])
    if bar is not None:
        bar.close()
    if run.stop is None:
        run.stop = f"iterations: all {iterations} iterations done"
    return run.finish()


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """A copy of ``model`` with a checkpoint written by ``prune`` applied: masks folded, EASIER's identity sites rewritten.

    ``egp-export compile --checkpoint`` reads the weights of these files too,
    but knows nothing of identity sites: use this for EASIER results.
    """
    from egp_export.io.checkpoint import apply_state_dict, load_state_dict

    state_dict = load_state_dict(path)
    loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    metadata = loaded.get(METADATA_KEY, {}) if isinstance(loaded, dict) else {}
    sites = list(metadata.get("identity_sites", []))
    target = replace_with_identity(model, sites) if sites else copy_model(model)
    apply_state_dict(target, state_dict)
    return target.eval()


__all__ = [
    "METHODS",
    "PruneResult",
    "allocate_budgets",
    "egp_importance",
    "load_pruned",
    "make_permanent",
    "masks_of",
    "nepenthe_importance",
    "prune",
    "prune_smallest",
    "replace_with_identity",
    "site_layers",
    "softmax_shares",
]
