"""Tracing: requested leaves, automatic leaves for untraceable submodules, and warnings for hidden activations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from egp_export.analysis.fx import activation_nodes
from egp_export.analysis.trace import trace, trace_facts
from egp_export.errors import TraceError


class ShapeGate(nn.Module):
    """timm's ConvMlp habit: control flow on the input's spatial size (untraceable symbolically)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.shape[-2] < 7:
            x = nn.functional.adaptive_avg_pool2d(x, 7)
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_act = nn.ReLU()
        self.gate = ShapeGate()

    def forward(self, x):
        return self.gate(self.stem_act(self.stem(x)))


class TopLevelBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def _trace_quietly(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = trace(model, **kwargs)
    return gm, [str(w.message) for w in caught]


def _same_outputs(model, gm, shape=(2, 3, 5, 5)):
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(model(x), gm(x))


def test_untraceable_submodule_without_automatic_leaves_says_how_to_make_it_a_leaf():
    with pytest.raises(TraceError, match=r"inside 'gate'.*leaf_modules=\['gate'\].*--leaf-module gate"):
        trace(Net().eval(), automatic_leaves=False)


def test_untraceable_submodule_becomes_a_leaf_recorded_with_the_reason_and_a_warning():
    model = Net().eval()
    gm, messages = _trace_quietly(model)
    (leaf,) = trace_facts(gm).leaf_modules
    assert (leaf.name, leaf.type, leaf.hidden_activations) == ("gate", "ShapeGate", 1)
    assert leaf.reason.startswith("untraceable: ")
    assert any("'gate' (ShapeGate)" in m and "1 activation(s)" in m for m in messages)
    # Only the stem's activation is a site; the one inside the leaf is not seen.
    assert [n.target for n in activation_nodes(gm)] == ["stem_act"]
    _same_outputs(model, gm)


@pytest.mark.parametrize("leaf", ["gate", ShapeGate], ids=["by-name", "by-type"])
def test_requested_leaves_by_name_or_type(leaf):
    model = Net().eval()
    gm, _ = _trace_quietly(model, leaf_modules=[leaf], automatic_leaves=False)
    (fact,) = trace_facts(gm).leaf_modules
    assert (fact.name, fact.reason) == ("gate", "requested")
    _same_outputs(model, gm)


def test_unknown_leaf_name_is_refused():
    with pytest.raises(TraceError, match="'gat' is neither a submodule name"):
        trace(Net().eval(), leaf_modules=["gat"])


def test_top_level_forward_cannot_be_a_leaf():
    with pytest.raises(TraceError, match=r"inside 'the top-level forward\(\)'.*cannot be made a leaf"):
        trace(TopLevelBranch().eval())


def test_torch_nn_container_that_hides_activations_is_named_in_a_warning():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    model = nn.Sequential(nn.Linear(8, 16), encoder).eval()
    gm, messages = _trace_quietly(model)
    (fact,) = trace_facts(gm).leaf_modules
    assert (fact.name, fact.type, fact.hidden_activations) == ("1", "TransformerEncoder", 2)
    assert any("'1' (TransformerEncoder)" in m and "not analysed" in m for m in messages)


def test_a_clean_model_has_no_leaves_and_no_warnings():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gm = trace(model)
    assert trace_facts(gm).leaf_modules == []
