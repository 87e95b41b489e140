"""The end-to-end demo: train a small CNN on scikit-learn's digits, compile it, export it, check it.

Everything runs on the CPU in well under a minute and needs no download: the
digits (1,797 8x8 images) ship with scikit-learn. The network is
conv-BN-ReLU x3 with a max-pool, global average pooling and a linear
classifier (about 22k parameters), trained with Adam.

Adam with coupled L2 weight decay and a high peak learning rate leaves some
filters dead (ReLU input negative on every sample; Mehta et al., "On Implicit
Filter Level Sparsity in Convolutional Neural Networks", CVPR 2019), which is
what a pruned network looks like to the compiler: the report shows their
channels removed. Whole activations rarely become linear by training alone;
that needs entropy-guided pruning, which is not part of egp-export.

``run_demo`` writes into ``out_dir``: ``checkpoint.pt`` (the trained dense
model's state dict, loadable with ``--arch egp_export.demo:digits_cnn``),
``model.onnx``, ``report.json``, ``report.md``, ``entropy.png`` and
``summary.json`` (accuracies before/after, depth, parameters, MACs).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .compiler import compile as compile_model
from .datasets import load_digits_split
from .fileio import atomic_path, write_text_atomic
from .report import COMPILE_OUTPUTS, ENTROPY_PLOT, ONNX_MODEL, check_outputs, plot_entropy, with_export, write_report

DEFAULT_EPOCHS = 10
BATCH_SIZE = 64
# OneCycle peak learning rate and Adam's (coupled, L2) weight decay; together
# they leave a few filters dead while test accuracy stays around 98-99 %.
PEAK_LEARNING_RATE = 3e-2
WEIGHT_DECAY = 1e-2
NUM_CLASSES = 10
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
DEMO_OUTPUTS = (*COMPILE_OUTPUTS, CHECKPOINT, SUMMARY)


def digits_cnn(widths: tuple[int, int, int] = (24, 32, 48), num_classes: int = NUM_CLASSES) -> nn.Module:
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, global average pool, linear: for 1x8x8 inputs."""
    first, second, third = widths

    def block(index: int, in_channels: int, out_channels: int) -> list[tuple[str, nn.Module]]:
        return [
            (f"conv{index}", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)),
            (f"bn{index}", nn.BatchNorm2d(out_channels)),
            (f"relu{index}", nn.ReLU()),
        ]

    layers = [
        *block(1, 1, first),
        *block(2, first, second),
        ("pool", nn.MaxPool2d(2)),
        *block(3, second, third),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(third, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` in place with Adam and a one-cycle schedule; return it in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=PEAK_LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(inputs) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=PEAK_LEARNING_RATE, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(inputs), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if progress:
            print(f"  epoch {epoch + 1}/{epochs}: training loss {total_loss / len(inputs):.4f}", flush=True)
    return model.eval()


def accuracy(logits, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (tensor or array, [N, classes]) against ``labels``."""
    predictions = torch.as_tensor(logits).argmax(dim=1)
    return float((predictions == labels).to(torch.float64).mean())


@contextlib.contextmanager
def _single_thread():
    # One intra-op thread: fast for a model this small, and the result does not
    # depend on how many cores the machine has.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train, compile, export and check the digits CNN; write everything to ``out_dir``; return the summary.

    ``seed`` fixes the train/test split, the initialisation and the batch
    order. Raises OutputError (before training) when an output exists and
    ``force`` is false, and VerificationError if the compiled model or the
    ONNX file does not match the trained one.
    """
    # onnx and onnxruntime load only here, so that --arch egp_export.demo:digits_cnn stays light.
    from .onnx_export import export_onnx, ort_session, run_onnx

    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    started = time.perf_counter()
    paths = check_outputs(out_dir, DEMO_OUTPUTS, force=force)

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    # fork_rng: seeding here must not change the caller's global random state.
    with _single_thread(), torch.random.fork_rng():
        x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
        torch.manual_seed(seed)
        model = digits_cnn()
        say(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter CNN on {len(x_train)} digits ...")
        train(model, x_train, y_train, epochs=epochs, seed=seed, progress=progress)
        with torch.no_grad():
            accuracy_dense = accuracy(model(x_test), y_test)
        say(f"test accuracy (PyTorch, dense): {accuracy_dense:.4f}")

        say("compiling with the training split as calibration data ...")
        result = compile_model(model, x_train)
        exported = export_onnx(result.module, x_train[:1], paths[ONNX_MODEL], verify_inputs=x_test, force=force)
        accuracy_compiled = accuracy(run_onnx(ort_session(exported.path), x_test)[0], y_test)

    report = with_export(result.report, exported)
    with atomic_path(paths[CHECKPOINT], force=force) as tmp:
        torch.save(model.state_dict(), tmp)
    write_report(report, out_dir, force=force)
    plot_entropy(report, paths[ENTROPY_PLOT], force=force)
    sites = report["analysis"]["sites"]
    summary = {
        "seed": seed,
        "epochs": epochs,
        "train_samples": len(x_train),
        "test_samples": len(x_test),
        "accuracy_dense": accuracy_dense,
        "accuracy_compiled": accuracy_compiled,
        "activations": len(sites),
        "activations_linearized": report["activations_linearized"],
        "dead_neurons": sum(site["dead_neurons"] for site in sites),
        "depth_before": report["before"]["depth"],
        "depth_after": report["after"]["depth"],
        "params_before": report["before"]["params"],
        "params_after": report["after"]["params"],
        "macs_before": report["before"]["macs"],
        "macs_after": report["after"]["macs"],
        "pytorch_max_rel_error": report["verification"]["pytorch"]["max_rel"],
        "onnxruntime_max_rel_error": report["verification"]["onnxruntime"]["max_rel"],
        "seconds": round(time.perf_counter() - started, 2),
        "files": {name: str(path) for name, path in paths.items()},
    }
    write_text_atomic(paths[SUMMARY], json.dumps(summary, indent=2) + "\n", force=force)
    say(
        f"test accuracy (ONNX Runtime, compiled): {accuracy_compiled:.4f}; "
        f"{summary['dead_neurons']} dead neurons, params {summary['params_before']:,} -> "
        f"{summary['params_after']:,}, MACs {summary['macs_before']:,} -> {summary['macs_after']:,}"
    )
    say(f"wrote {', '.join(str(Path(out_dir) / name) for name in DEMO_OUTPUTS)}")
    return summary
