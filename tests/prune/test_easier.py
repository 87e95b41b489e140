"""EASIER's rewrite: one call site of a shared module becomes the identity; other names are refused with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.trace import trace
from egp_export.prune.easier import ReplaceSitesWithIdentity, replace_with_identity
from egp_export.records import RefusalCode
from tests.prune.subjects import SharedAndFunctional

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def test_replace_with_identity_rewrites_one_call_of_a_shared_module():
    model = SharedAndFunctional().eval()
    gm = trace(model)
    first = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu")
    rewritten = replace_with_identity(model, [first])
    assert sum(1 for n in rewritten.graph.nodes if n.op == "call_module" and n.target == "relu") == 1
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        a = model.bn1(model.conv1(x))  # no relu at the first site now
        b = model.relu(model.conv2(a) + a)
        c = F.relu(model.conv3(b))
        expected = model.fc(torch.cat([c, b], 1).relu().mean((2, 3)))
        assert torch.allclose(rewritten(x), expected, atol=1e-6)
    assert isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule)  # the input is untouched
    with pytest.raises(ValueError, match="no activation call site"):
        replace_with_identity(model, ["nope"])


def test_the_pass_refuses_names_that_are_no_activation_site():
    gm = trace(SharedAndFunctional().eval())
    before = [node.name for node in gm.graph.nodes]
    result = ReplaceSitesWithIdentity(["conv1", "nope"])(gm)
    assert not result.modified and [node.name for node in gm.graph.nodes] == before
    codes = {refusal.node: refusal.code for refusal in result.refusals}
    assert codes == {"conv1": RefusalCode.NOT_AN_ACTIVATION, "nope": RefusalCode.NO_SUCH_SITE}
    with pytest.raises(ValueError, match="conv1"):
        replace_with_identity(gm, ["conv1"])


def test_the_pass_records_each_rewrite():
    gm = trace(SharedAndFunctional().eval())
    sites = [node.name for node in gm.graph.nodes if node.op in ("call_module", "call_function", "call_method")
             and "relu" in node.name]
    result = ReplaceSitesWithIdentity(sites[:2])(gm)
    assert result.modified and [rewrite.nodes for rewrite in result.rewrites] == [(sites[0],), (sites[1],)]
