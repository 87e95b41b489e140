"""The op vocabulary: every predicate fires for every spelling fx records (module, function, method, in-place)."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis import ops
from egp_export.analysis.trace import trace


class Spelled(nn.Module):
    """One op, spelt one way: ``forward`` applies ``fn`` to the input (and, for binary ops, to itself)."""

    def __init__(self, fn, module: nn.Module | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.layer = module
        self.weight = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bias = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return self.fn(self, x)


def _node(model: nn.Module) -> tuple[fx.Node, dict]:
    """The last computing node of the traced model (the op under test)."""
    gm = trace(model.eval())
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    return nodes[-1], ops.named_modules(gm)


SPELLINGS = {
    "conv": [
        ("module", lambda m, x: m.layer(x), nn.Conv2d(4, 4, 1)),
        ("function", lambda m, x: F.conv2d(x, m.weight, m.bias), None),
        ("torch", lambda m, x: torch.conv2d(x, m.weight, m.bias), None),
        ("aten", lambda m, x: torch.ops.aten.conv2d.default(x, m.weight, m.bias), None),
    ],
    "linear": [
        ("module", lambda m, x: m.layer(x), nn.Linear(4, 4)),
        ("function", lambda m, x: F.linear(x, m.weight.flatten(1), m.bias), None),
        ("aten", lambda m, x: torch.ops.aten.linear.default(x, m.weight.flatten(1), m.bias), None),
    ],
    "batch_norm": [
        ("module", lambda m, x: m.layer(x), nn.BatchNorm2d(4)),
        ("function", lambda m, x: F.batch_norm(x, m.mean, m.var, m.bias, m.bias, False), None),
    ],
    "add": [
        ("operator", lambda m, x: x + x, None),
        ("inplace", lambda m, x: operator.iadd(x * 1, x), None),
        ("torch", lambda m, x: torch.add(x, x), None),
        ("method", lambda m, x: x.add(x), None),
        ("method-inplace", lambda m, x: (x * 1).add_(x), None),
        ("aten", lambda m, x: torch.ops.aten.add.Tensor(x, x), None),
    ],
    "identity": [
        ("identity", lambda m, x: m.layer(x), nn.Identity()),
        ("dropout", lambda m, x: m.layer(x), nn.Dropout(0.5)),
        ("alpha-dropout", lambda m, x: m.layer(x), nn.AlphaDropout(0.5)),
        ("function", lambda m, x: F.dropout(x, 0.5, training=False), None),
        ("function-positional", lambda m, x: F.dropout(x, 0.5, False), None),
    ],
    "flatten": [
        ("module", lambda m, x: m.layer(x), nn.Flatten()),
        ("function", lambda m, x: torch.flatten(x, 1), None),
        ("method", lambda m, x: x.flatten(1), None),
    ],
    "global_pool": [
        ("module", lambda m, x: m.layer(x), nn.AdaptiveAvgPool2d(1)),
        ("module-tuple", lambda m, x: m.layer(x), nn.AdaptiveAvgPool2d((1, 1))),
        ("function", lambda m, x: F.adaptive_avg_pool2d(x, 1), None),
    ],
    "pool": [
        ("module", lambda m, x: m.layer(x), nn.MaxPool2d(2)),
        ("function", lambda m, x: F.avg_pool2d(x, 2), None),
    ],
    "pad": [
        ("module", lambda m, x: m.layer(x), nn.ZeroPad2d(1)),
        ("function", lambda m, x: F.pad(x, (1, 1, 1, 1)), None),
    ],
}

PREDICATES = {
    "conv": lambda n, m: ops.is_conv(n, m),
    "linear": lambda n, m: ops.is_linear(n, m),
    "batch_norm": lambda n, m: ops.is_batch_norm(n, m),
    "add": lambda n, m: ops.is_add(n),
    "identity": lambda n, m: ops.is_identity(n, m),
    "flatten": lambda n, m: ops.is_flatten_from_channels(n, m),
    "global_pool": lambda n, m: ops.is_global_average_pool(n, m),
    "pool": lambda n, m: ops.is_pool(n, m),
    "pad": lambda n, m: ops.is_pad(n, m),
}

CASES = [(kind, spelling, fn, module) for kind, spellings in SPELLINGS.items() for spelling, fn, module in spellings]


@pytest.mark.parametrize("kind, spelling, fn, module", CASES, ids=[f"{k}-{s}" for k, s, _, _ in CASES])
def test_each_predicate_fires_for_each_spelling_and_only_its_own(kind, spelling, fn, module):
    node, modules = _node(Spelled(fn, module))

    assert PREDICATES[kind](node, modules), f"{kind} not recognised in its {spelling} spelling"
    others = [other for other, predicate in PREDICATES.items() if other != kind and predicate(node, modules)]
    # a global average pool is a pool too; nothing else may claim the node
    assert set(others) <= ({"pool"} if kind == "global_pool" else set()), others


def test_dropout_in_training_is_not_an_identity():
    node, modules = _node(Spelled(lambda m, x: F.dropout(x, 0.5, training=True)))
    assert not ops.is_identity(node, modules)


def test_add_with_alpha_is_not_a_plain_add():
    node, _ = _node(Spelled(lambda m, x: torch.add(x, x, alpha=2)))
    assert not ops.is_add(node)


def test_flatten_from_other_dims_is_not_a_channel_flatten():
    node, modules = _node(Spelled(lambda m, x: torch.flatten(x, 2)))
    assert ops.flatten_dims(node, modules) == (2, -1)
    assert not ops.is_flatten_from_channels(node, modules)


def test_functional_layer_args_name_the_parameter_operands():
    node, _ = _node(Spelled(lambda m, x: F.conv2d(x, m.weight, m.bias)))
    args = ops.functional_layer_args(node)
    assert set(args) == {"weight", "bias"} and all(a.op == "get_attr" for a in args.values())


def test_follow_identities_walks_to_the_next_op():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Identity(), nn.Linear(4, 2)).eval()
    gm = trace(model)
    modules = ops.named_modules(gm)
    first = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "0")
    between, after = ops.follow_identities(first, modules)
    assert [n.target for n in between] == ["1", "2"] and after.target == "3"
