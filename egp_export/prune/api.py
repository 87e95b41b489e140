"""Entropy-guided pruning (EGP) and its follow-ups NEPENTHE and EASIER, feeding the compiler: the public API.

EGP (Liao, Quétu, Nguyen, Tartaglione, ICCVW 2023) prunes the weights of
low-entropy layers until their activations are linear on the data; every
iteration it measures, prunes, fine-tunes:

    H_l = layer entropy of the sites l feeds     per batch over non-constant neurons (importance.py)
    I_l = H_l * mean |w|                         over the layer's non-zero weights
    R_l = S / I_l                                S = sum of I over the layers not yet capped
    n_l = rate * N * softmax(R)_l                N = non-zero weights left in the eligible layers
    prune the n_l smallest |w| of layer l        (L1, unstructured, torch.nn.utils.prune masks)

By default every one of these follows EGP's reference code
(ZhuLIAO001/Unstructured_Relu_Pruning_Reduce_Depth, ``src/main.py``) where the
paper is open:

- the layer entropy is the reference's ``test_entropy`` (``entropy="reference"``;
  ``"pooled"`` averages h(p_c) over all neurons with p_c over all samples at
  once, the compiler's own measurement, which its linearity decisions use
  either way);
- a layer capped at its remaining weights leaves S, and R is recomputed for
  the rest (the reference's ``while True`` loop);
- a site's layer is the conv/linear before it; shortcut (downsample) convs
  and the classifier are never pruned nor counted in N
  (``prune_shortcuts=True`` prunes shortcut convs as well);
- fine-tuning: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, MultiStepLR.

The entropy is measured per activation *call site* (a shared ``nn.ReLU``
called twice is two sites, functional ``F.relu`` / ``x.relu()`` calls are
sites too: the reference hooks modules and sees only a shared module's last
call), in eval mode on (the first ``entropy_samples`` of) the training data.
Where the modules of this package decide something the papers leave open,
their docstrings say so: sites.py (which layers feed a site), importance.py
(entropy, importance, budget), masks.py (masks, ties), easier.py (EASIER),
loop.py (eligibility, stopping rules, files).

``prune`` returns the model with the masks made permanent (plain weights,
pruned ones zero): what ``egp_export.compile`` takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from egp_export.distributed import Runtime
from egp_export.errors import OutputError, TrainingError
from egp_export.io.checkpoint import apply_state_dict, load_state_dict
from egp_export.io.fileio import check_writable
from egp_export.prune.easier import replace_with_identity
from egp_export.prune.importance import ENTROPY_DEFINITIONS
from egp_export.prune.loop import (
    ITERATIONS_DIR,
    METADATA_KEY,
    PRUNED_CHECKPOINT,
    STATE_FILE,
    Pruning,
    load_state,
    output_paths,
)
from egp_export.prune.masks import copy_model, make_permanent, masks_of
from egp_export.prune.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LR,
    DEFAULT_MOMENTUM,
    DEFAULT_WEIGHT_DECAY,
    OptimConfig,
    as_dataset,
    require_finite,
)

METHODS = ("egp", "nepenthe", "easier")
DEFAULT_RATE = 0.5
DEFAULT_ITERATIONS = 10
DEFAULT_EPOCHS_PER_ITERATION = 5
DEFAULT_ENTROPY_SAMPLES = 4096
# The layer entropy each method uses by default; NEPENTHE and EASIER have no reference code to follow.
DEFAULT_ENTROPY = {"egp": "reference", "nepenthe": "pooled", "easier": "pooled"}


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


def check_outputs(out_dir: Path, *, force: bool) -> None:
    """Refuse, before any work, a prune output folder whose files exist (without ``force``) or cannot be written."""
    for name, path in output_paths(out_dir).items():
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
    entropy: str | None = None,
    prune_shortcuts: bool = False,
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
    (all for None), in batches of 128, as ``entropy`` defines it (None: the
    method's default, ``DEFAULT_ENTROPY``; ``"reference"`` is EGP's only);
    accuracy on ``eval_data``. ``prune_shortcuts`` also prunes the shortcut
    convs of residual adds (the reference never does). Each iteration prunes
    ``rate`` of the weights left in the eligible layers (EGP, NEPENTHE) or
    removes one activation (EASIER), then trains ``epochs_per_iteration`` epochs with a
    fresh optimizer and schedule (training.py). An iteration more than
    ``max_accuracy_drop`` below the dense accuracy is rejected; the next one
    only fine-tunes (layer collapse often recovers), and a second rejection
    in a row stops. The result is the last accepted iteration.

    With ``out_dir`` every iteration writes ``state.pt`` (for ``resume``),
    ``iterations/iteration_NN.pt`` and ``metrics.jsonl``; the end writes
    ``pruned.pt`` and three plots. Existing outputs need ``force``; ``resume``
    continues from ``state.pt`` with the same settings (``iterations`` may
    grow) and repeats the uninterrupted run exactly. A run that diverges
    (NaN/Inf loss, weights, outputs or pre-activations) raises TrainingError
    and leaves no outputs. ``runtime`` runs the work
    under DDP (egp_export.distributed). ``model`` is never modified.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    entropy = DEFAULT_ENTROPY[method] if entropy is None else entropy
    if entropy not in ENTROPY_DEFINITIONS:
        raise ValueError(f"entropy must be one of {', '.join(ENTROPY_DEFINITIONS)}, got {entropy!r}")
    if entropy == "reference" and method != "egp":
        raise ValueError(
            f"entropy='reference' is EGP's reference code's layer entropy; {method.upper()} uses the pooled "
            "per-neuron entropy: pass entropy='pooled' or leave it unset"
        )
    require_finite(
        rate=rate, target_sparsity=target_sparsity, max_accuracy_drop=max_accuracy_drop, lr=lr, momentum=momentum,
        weight_decay=weight_decay,
    )
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
        "method": method, "entropy": entropy, "prune_shortcuts": prune_shortcuts, "rate": rate,
        "target_sparsity": target_sparsity, "max_accuracy_drop": max_accuracy_drop,
        "target_linear_sites": target_linear_sites, "epochs_per_iteration": epochs_per_iteration,
        "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "scheduler": scheduler,
        "batch_size": batch_size, "entropy_samples": entropy_samples, "seed": seed, "world_size": runtime.world_size,
    }
    state = None
    if out_dir is not None:
        # Every rank checks (they share the folder); none writes before all have.
        state_file = Path(out_dir) / STATE_FILE
        if resume and state_file.exists():
            state = load_state(state_file, settings)
        else:
            check_outputs(Path(out_dir), force=force)
        runtime.barrier()
    show = progress and runtime.is_main
    run = Pruning(
        copy_model(model).eval(), as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data"),
        settings, optim, runtime, out_dir, show,
    )
    try:
        if state is None:
            run.start()
        else:
            run.resume(state, iterations)
        run.run(iterations)
        model, measurement = run.finish()
    except TrainingError:
        run.remove_outputs()
        raise
    return PruneResult(
        model=make_permanent(model).cpu().eval(),
        masks={name: mask.cpu() for name, mask in masks_of(model).items()},
        history=run.history,
        stop_reason=run.stop or "",
        method=method,
        identity_sites=list(run.accepted["identity_sites"]),
        site_layers={site: list(layers) for site, layers in measurement.site_layers.items()},
        paths=run.paths(),
    )


def load_pruned(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """A copy of ``model`` with a checkpoint written by ``prune`` applied: masks folded, EASIER's identity sites rewritten.

    ``egp-export compile --checkpoint`` reads the weights of these files too,
    but knows nothing of identity sites: use this for EASIER results.
    """
    state_dict = load_state_dict(path)
    loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    metadata = loaded.get(METADATA_KEY, {}) if isinstance(loaded, dict) else {}
    sites = list(metadata.get("identity_sites", []))
    target = replace_with_identity(model, sites) if sites else copy_model(model)
    apply_state_dict(target, state_dict)
    return target.eval()


__all__ = [
    "DEFAULT_ENTROPY",
    "METADATA_KEY",
    "METHODS",
    "PRUNED_CHECKPOINT",
    "PruneResult",
    "STATE_FILE",
    "check_outputs",
    "load_pruned",
    "prune",
]
