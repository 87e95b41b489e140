"""Which layers feed which activation call site: functional and shared sites, residual adds, shortcut convs."""

from __future__ import annotations

import ast
import operator
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torchvision

from egp_export.analysis.ops import is_add
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.prune.sites import layers_of, site_layers
from tests.prune.subjects import DownsampleBlock, SharedAndFunctional

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def _mapping(model: nn.Module, example: torch.Tensor, **options) -> dict[str, tuple[str, ...]]:
    gm = trace(model.eval())
    return site_layers(gm, calibrate(gm, [example]), **options)


def test_each_call_site_maps_to_the_layer_that_feeds_it():
    mapping = _mapping(SharedAndFunctional(), torch.randn(8, 2, 5, 5))
    assert list(mapping.values()) == [("conv1",), ("conv2",), ("conv3",), ()]
    assert len(mapping) == 4  # the shared nn.ReLU is two sites


def test_a_residual_site_belongs_to_its_branch_conv_not_to_the_shortcut_conv():
    mapping = _mapping(DownsampleBlock(), torch.randn(4, 2, 6, 6))
    assert list(mapping.values()) == [("conv1",), ("conv2",)]
    assert layers_of(mapping) == {"conv1": ["relu"], "conv2": ["relu_1"]}  # never the classifier either
    with_shortcuts = _mapping(DownsampleBlock(), torch.randn(4, 2, 6, 6), include_shortcuts=True)
    assert list(with_shortcuts.values()) == [("conv1",), ("conv2", "downsample.0")]


class ParallelBranches(nn.Module):
    """RepVGG-style: two convs read the same tensor; neither skips over the other."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(2, 4, 3, padding=1)
        self.point = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        return torch.relu(self.wide(x) + self.point(x))


def test_parallel_branches_reading_the_same_tensor_are_both_kept():
    assert list(_mapping(ParallelBranches(), torch.randn(2, 2, 4, 4)).values()) == [("wide", "point")]


def test_torchvision_resnet18_never_maps_a_site_to_a_downsample_conv_or_the_classifier():
    mapping = _mapping(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    layers = layers_of(mapping)
    assert len(mapping) == 17  # the stem's ReLU and two call sites per BasicBlock
    assert not any("downsample" in layer or layer == "fc" for layer in layers)
    assert sorted(layers) == sorted(["conv1"] + [f"layer{s}.{b}.conv{c}" for s in range(1, 5) for b in (0, 1) for c in (1, 2)])
    assert all(len(producers) == 1 for producers in mapping.values())
    with_shortcuts = layers_of(_mapping(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32),
                                        include_shortcuts=True))
    assert sorted(set(with_shortcuts) - set(layers)) == [f"layer{s}.0.downsample.0" for s in (2, 3, 4)]


class Adds(nn.Module):
    def forward(self, x, y):
        a = x + y
        b = torch.add(a, y)
        c = a.add(b)
        return c.add_(a) * x


def test_is_add_knows_every_spelling_of_an_add():
    gm = fx.symbolic_trace(Adds())
    output = next(node for node in gm.graph.nodes if node.op == "output")
    with gm.graph.inserting_before(output):  # symbolic tracing records `c += b` as operator.add; other graphs keep iadd
        in_place = gm.graph.call_function(operator.iadd, tuple(output.args[0].args))
    adds = [node for node in gm.graph.nodes if is_add(node)]
    assert [node.target for node in adds] == [operator.add, torch.add, "add", "add_", operator.iadd]
    assert in_place in adds
    assert not any(is_add(node) for node in gm.graph.nodes if node.target is operator.mul)


PRUNE_PACKAGE = Path(__file__).resolve().parents[2] / "egp_export" / "prune"


def test_prune_imports_nothing_from_the_cli():
    for path in PRUNE_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("egp_export.cli"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("egp_export.cli") for alias in node.names), path.name


def test_importing_the_package_loads_no_torch_and_reexports_the_api():
    code = (
        "import sys, egp_export.prune as p; assert 'torch' not in sys.modules, 'torch loaded'; "
        "from egp_export.prune import prune, load_pruned, PruneResult; "
        "from egp_export.prune.api import prune as api_prune; assert prune is api_prune; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
