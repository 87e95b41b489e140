"""Every pass carries provenance (analysis/provenance.py): a node that replaces or absorbs others names their source
modules and the rewrite kinds, whatever pass made it. The ONNX side is tested in tests/export/test_provenance.py."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.provenance import PROVENANCE_KEY, Provenance, seed_provenance
from egp_export.passes import PassManager, default_steps
from egp_export.records import RewriteKind
from tests.conftest import assert_same_function, calibration_batches, engineer, prepare

K = RewriteKind


def _run(model: nn.Module, example: torch.Tensor, *, calibrate: bool = True) -> fx.GraphModule:
    gm = prepare(model, example, calibration=calibration_batches((16, *example.shape[1:])) if calibrate else None)
    PassManager(default_steps(channel_alignment=1), example_input=example[:1]).run(gm)
    assert_same_function(model, gm, torch.randn_like(example))
    return gm


def _provenance(gm: fx.GraphModule, target: str) -> Provenance:
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    return node.meta[PROVENANCE_KEY]


class ConvReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def test_a_linearized_site_folded_and_merged_names_both_convs_and_the_activation():
    model = ConvReluConv().eval()
    engineer(model.conv1, [50.0] * 6 + [-50.0] * 2)  # every neuron in one region: ON -> x, OFF -> 0
    gm = _run(model, torch.randn(4, 3, 8, 8))
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    provenance = conv.meta[PROVENANCE_KEY]
    assert provenance.modules == ("conv1", "relu", "conv2") and provenance.sites == ("conv1", "relu", "conv2")
    assert provenance.rewrites[:2] == (K.LINEARIZED, K.AFFINE_FOLDED), provenance
    assert {K.CHANNELS_REMOVED, K.MERGED_EXACT} <= set(provenance.rewrites), provenance


def test_dead_neurons_masked_and_removed_mark_the_producer_and_the_consumer():
    model = ConvReluConv().eval()
    with torch.no_grad():
        model.conv1.bias[6:] = -50.0  # two dead neurons; the other six cross zero: the site stays a ReLU
        model.conv1.weight[6:] *= 0.001
    gm = _run(model, torch.randn(4, 3, 8, 8))
    assert gm.get_submodule("conv1").out_channels == 6
    producer, consumer = _provenance(gm, "conv1"), _provenance(gm, "conv2")
    assert producer.modules == ("conv1", "relu"), producer  # the mask came from the ReLU site and folded into conv1
    assert producer.rewrites == (K.DEAD_MASKED, K.AFFINE_FOLDED, K.CHANNELS_REMOVED), producer
    assert consumer.modules == ("conv2",) and consumer.rewrites == (K.CHANNELS_REMOVED,), consumer
    assert _provenance(gm, "relu").rewrites == ()  # the ReLU itself is what it was


class FunctionalConv(nn.Module):
    """timm's StdConv2d pattern: a parameter and F.conv2d in the module's own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, None, 1, 1)


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.std = FunctionalConv()

    def forward(self, x):
        return self.std(x)


def test_a_bound_functional_layer_names_the_module_whose_forward_called_it():
    gm = _run(Holder().eval(), torch.randn(2, 3, 8, 8), calibrate=False)
    (conv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    provenance = conv.meta[PROVENANCE_KEY]
    assert provenance.modules[0] == "std" and provenance.rewrites == (K.FUNCTIONAL_LAYER_BOUND,), provenance


def test_seeding_keeps_what_a_graph_carries_already():
    gm = prepare(ConvReluConv().eval(), torch.randn(1, 3, 8, 8))
    seed_provenance(gm)
    conv1 = next(n for n in gm.graph.nodes if n.target == "conv1")
    conv1.meta[PROVENANCE_KEY] = Provenance(("somewhere",))
    seed_provenance(gm)
    assert conv1.meta[PROVENANCE_KEY].modules == ("somewhere",)
    relu = next(n for n in gm.graph.nodes if n.target == "relu")
    assert relu.meta[PROVENANCE_KEY] == Provenance(("relu",), ("relu",))
