"""Diverged fine-tuning is an error, never a checkpoint; non-finite arguments are refused (issue 15, items 4 and 12)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from egp_export.cli.main import main
from egp_export.demo.digits import digits_resnet
from egp_export.errors import OptionError, TrainingError
from egp_export.prune.api import prune
from egp_export.prune.blocks import prune_energy
from egp_export.prune.itpruner import prune_itpruner
from egp_export.prune.sap import prune_sap
from egp_export.prune.training import OptimConfig
from tests.prune.subjects import FAST, data, tiny

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")

DIVERGING = 1e30  # the learning rate of the report
SMALL_RESNET = {"width": 4, "expansion": 1, "stages": (2,)}  # two residual units on 1x8x8 inputs


def _digit_like(samples: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 8, 8, generator=generator)
    return x, (x.mean((1, 2, 3)) > 0).long()


@pytest.mark.parametrize("method", ["egp", "nepenthe", "easier"])
def test_an_entropy_method_that_diverges_raises_and_leaves_no_outputs(tmp_path, method):
    with pytest.raises(TrainingError, match=r"diverged in iteration 1, epoch 1 of 1: .*lower the learning rate"):
        prune(tiny(), data(), data(32, 1), method, iterations=2, out_dir=tmp_path, **{**FAST, "lr": DIVERGING})
    # Iteration 0 had written state.pt, iterations/iteration_00.pt and metrics.jsonl: a failed run removes them.
    assert list(tmp_path.rglob("*")) == []


def _sap(model, train, held, **options):
    return prune_sap(model, train, held, iterations=1, **options)


def _energy(model, train, held, **options):
    return prune_energy(model, train, held, samples=32, rounds=1, **options)


def _itpruner(model, train, held, **options):
    return prune_itpruner(model, train, held, rebuild=functools.partial(digits_resnet, **SMALL_RESNET), samples=16,
                          **options)


@pytest.mark.parametrize("method", [_sap, _energy, _itpruner], ids=["sap", "energy", "itpruner"])
def test_a_retraining_method_that_diverges_raises_and_writes_nothing(tmp_path, method):
    torch.manual_seed(0)
    model = digits_resnet(**SMALL_RESNET).eval()
    with pytest.raises(TrainingError, match=r"diverged in .*epoch 1 of 1: .*lower the learning rate"):
        method(model, _digit_like(64, 0), _digit_like(32, 1), epochs=1, batch_size=32, lr=DIVERGING, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_prune_with_a_diverging_lr_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    x, y = data(64)
    torch.save((x, y), tmp_path / "train.pt")
    out = tmp_path / "out"
    code = main(["prune", "--arch", "tests.prune.subjects:Tiny", "--data", str(tmp_path / "train.pt"), "--out", str(out),
                 "--iterations", "2", "--epochs-per-iteration", "1", "--batch-size", "32", "--lr", "1e30", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("egp-export: error: fine-tuning diverged in iteration 1"), err
    assert not out.exists() or list(out.rglob("*")) == []


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_prune_function_refuses_non_finite_float_arguments(value):
    model, train, held = tiny(), data(), data(32, 1)
    calls = {
        "prune(lr)": lambda: prune(model, train, held, lr=value, iterations=0, progress=False),
        "prune(rate)": lambda: prune(model, train, held, rate=value, iterations=0, progress=False),
        "prune(max_accuracy_drop)": lambda: prune(model, train, held, max_accuracy_drop=value, iterations=0,
                                                  progress=False),
        "prune(momentum)": lambda: prune(model, train, held, momentum=value, iterations=0, progress=False),
        "prune_sap(beta)": lambda: prune_sap(model, train, held, beta=value, iterations=0, epochs=0),
        "prune_sap(lr)": lambda: prune_sap(model, train, held, lr=value, iterations=0, epochs=0),
        "prune_energy(lr)": lambda: prune_energy(model, train, held, lr=value, epochs=0),
        "prune_itpruner(beta)": lambda: _itpruner(model, train, held, beta=value, epochs=0),
        "prune_itpruner(flops_ratio)": lambda: _itpruner(model, train, held, flops_ratio=value, epochs=0),
        "OptimConfig(weight_decay)": lambda: OptimConfig(epochs=1, weight_decay=value),
    }
    for name, call in calls.items():
        with pytest.raises(OptionError, match="must be a finite number"):
            call()
            pytest.fail(f"{name} accepted {value}")
