"""A small trained digits ResNet and its data splits, shared by the measure and method tests (trained once)."""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

from egp_export.demo.digits import digits_resnet
from egp_export.io.datasets import load_digits_split
from egp_export.prune.training import OptimConfig, as_dataset, train


@contextlib.contextmanager
def one_thread():
    """One torch thread: a model this small trains several times faster than with threads fighting for shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def digits_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """fit / val / test splits of the digits (the demo's 80/20 split of the train part)."""
    x, y, x_test, y_test = load_digits_split(seed=0)
    fit = len(x) - round(0.2 * len(x))
    return {"fit": (x[:fit], y[:fit]), "val": (x[fit:], y[fit:]), "test": (x_test, y_test)}


@functools.cache
def _trained() -> torch.nn.Module:
    torch.manual_seed(0)
    model = digits_resnet()
    config = OptimConfig(epochs=4, lr=0.1, scheduler="cosine", batch_size=64)
    with one_thread():
        train(model, as_dataset(digits_data()["fit"], "digits"), config, seed=0)
    return model.eval()


def trained_digits() -> torch.nn.Module:
    """A fresh copy of the digits ResNet trained 4 epochs (about 97 % validation accuracy)."""
    return copy.deepcopy(_trained())


def plain_cnn() -> torch.nn.Module:
    """conv-ReLU-pool-linear on 3-channel images: no residual unit at all."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    )
