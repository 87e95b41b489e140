"""The op vocabulary: every predicate fires for every spelling fx records (module, function, method, in-place)."""

from __future__ import annotations

import inspect
import operator
import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

import egp_export
from egp_export.analysis import activations, ops
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.trace import trace
from egp_export.passes import BindFunctionalLayers, FoldBatchNorm, finalize
from egp_export.records import RefusalCode, RewriteKind
from egp_export.report.messages import describe_refusal
from tests.conftest import apply, assert_same_function, prepare, randomize_batchnorm


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
        (
            "aten-convolution",
            lambda m, x: torch.ops.aten.convolution.default(x, m.weight, m.bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1),
            None,
        ),
    ],
    "linear": [
        ("module", lambda m, x: m.layer(x), nn.Linear(4, 4)),
        ("function", lambda m, x: F.linear(x, m.weight.flatten(1), m.bias), None),
        ("aten", lambda m, x: torch.ops.aten.linear.default(x, m.weight.flatten(1), m.bias), None),
    ],
    "batch_norm": [
        ("module", lambda m, x: m.layer(x), nn.BatchNorm2d(4)),
        ("function", lambda m, x: F.batch_norm(x, m.mean, m.var, m.bias, m.bias, False), None),
        ("torch", lambda m, x: torch.batch_norm(x, m.bias, m.bias, m.mean, m.var, False, 0.1, 1e-5, False), None),
        (
            "aten",
            lambda m, x: torch.ops.aten.batch_norm.default(x, m.bias, m.bias, m.mean, m.var, False, 0.1, 1e-5, False),
            None,
        ),
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
        ("aten", lambda m, x: torch.ops.aten.dropout.default(x, 0.5, False), None),
    ],
    "flatten": [
        ("module", lambda m, x: m.layer(x), nn.Flatten()),
        ("function", lambda m, x: torch.flatten(x, 1), None),
        ("method", lambda m, x: x.flatten(1), None),
        ("aten", lambda m, x: torch.ops.aten.flatten.using_ints(x, 1), None),
    ],
    "global_pool": [
        ("module", lambda m, x: m.layer(x), nn.AdaptiveAvgPool2d(1)),
        ("module-tuple", lambda m, x: m.layer(x), nn.AdaptiveAvgPool2d((1, 1))),
        ("function", lambda m, x: F.adaptive_avg_pool2d(x, 1), None),
        ("aten", lambda m, x: torch.ops.aten.adaptive_avg_pool2d.default(x, [1, 1]), None),
        ("method-mean", lambda m, x: x.mean((2, 3), keepdim=True), None),
        ("torch-mean", lambda m, x: torch.mean(x, [2, 3], True), None),
        ("aten-mean", lambda m, x: torch.ops.aten.mean.dim(x, [2, 3], True), None),
    ],
    "pool": [
        ("module", lambda m, x: m.layer(x), nn.MaxPool2d(2)),
        ("function", lambda m, x: F.avg_pool2d(x, 2), None),
        ("aten", lambda m, x: torch.ops.aten.max_pool2d.default(x, [2, 2]), None),
        ("mean-no-keepdim", lambda m, x: x.mean((2, 3)), None),  # pools and flattens: a pool, no global pool
    ],
    "pad": [
        ("module", lambda m, x: m.layer(x), nn.ZeroPad2d(1)),
        ("function", lambda m, x: F.pad(x, (1, 1, 1, 1)), None),
        ("aten", lambda m, x: torch.ops.aten.constant_pad_nd.default(x, [1, 1, 1, 1]), None),
        ("aten-reflection", lambda m, x: torch.ops.aten.reflection_pad2d.default(x, [1, 1, 1, 1]), None),
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


# Every table entry, in every spelling it lists ---------------------------------
#
# The calls below are built from each callable's *real* signature (inspect, or
# the ATen schema a builtin dispatches to), never from the vocabulary's own
# table, so a table that lists a wrong operand order fails here.


# stochastic_depth is fx.wrap'ed only where torchvision calls it; wrap it here too so that it is traced as a call.
fx.wrap("stochastic_depth")


def real_signature(fn) -> tuple[str, ...]:
    """The operand names of ``fn`` in order: Python signature, or the ATen schema (builtins, ATen ops)."""
    if isinstance(fn, torch._ops.OpOverload):
        return tuple(a.name for a in fn._schema.arguments)
    if isinstance(fn, torch._ops.OpOverloadPacket):  # the overload a plain call resolves to first
        return real_signature(getattr(fn, "default" if "default" in fn.overloads() else fn.overloads()[0]))
    try:
        return tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a C builtin: torch.batch_norm, F.conv2d, F.relu_ ...
        return real_signature(getattr(torch.ops.aten, fn.__name__))


def _name(fn) -> str:
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"aten.{fn.__name__}"
    return f"{getattr(fn, '__module__', None) or ''}.{getattr(fn, '__name__', fn)}"


class Operands(nn.Module):
    """Parameters of every shape a table entry needs, each under its own name (so a swapped binding shows)."""

    def __init__(self, call) -> None:
        super().__init__()
        self.call = call
        self.conv1d = nn.Parameter(torch.randn(4, 4, 3))
        self.conv2d = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.conv3d = nn.Parameter(torch.randn(4, 4, 3, 3, 3))
        self.linear = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4) - 3.0)  # negative: a variance bound to it gives NaN
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return self.call(self, x)


def _layer_rank(fn) -> int:
    kind, _ = ops.FUNCTIONAL_LAYERS[fn]
    if kind is ops.LayerKind.CONV:
        return next((r for r in (1, 2, 3) if f"conv{r}d" in _name(fn)), 2)  # aten.convolution: any rank, 2 here
    return 0 if kind is ops.LayerKind.LINEAR else 2


def _layer_values(m: Operands, fn) -> dict:
    kind, _ = ops.FUNCTIONAL_LAYERS[fn]
    rank = _layer_rank(fn)
    if kind is ops.LayerKind.CONV:
        padding = "valid" if _name(fn).endswith(".padding") else [1] * rank
        weight = getattr(m, f"conv{rank}d")
        return {
            "weight": weight, "bias": m.bias, "stride": [1] * rank, "padding": padding, "dilation": [1] * rank, "groups": 1,
            "transposed": False, "output_padding": [0] * rank,
        }
    if kind is ops.LayerKind.LINEAR:
        return {"weight": m.linear, "bias": m.bias}
    return {
        "weight": m.gamma, "bias": m.beta, "running_mean": m.mean, "running_var": m.var,
        "training": False, "momentum": 0.1, "eps": 1e-5, "cudnn_enabled": False,
    }


# Where each parameter operand must come from (the attribute of Operands).
_EXPECTED_SOURCE = {
    ops.LayerKind.CONV: {"weight": "conv{rank}d", "bias": "bias"},
    ops.LayerKind.LINEAR: {"weight": "linear", "bias": "bias"},
    ops.LayerKind.BATCH_NORM: {"weight": "gamma", "bias": "beta", "running_mean": "mean", "running_var": "var"},
}


def _call(fn, names: tuple[str, ...], values: dict, style: str):
    """``fn(x, ...)`` with every operand after the input, positional or by keyword."""
    rest = names[1:]
    if style == "positional":
        call = lambda m, x: fn(x, *[values(m)[n] for n in rest])  # noqa: E731
    else:
        call = lambda m, x: fn(x, **{n: values(m)[n] for n in rest})  # noqa: E731
    if fn in ops.TUPLE_LAYERS:  # (output, saved statistics): the layer's output is [0]
        return lambda m, x: call(m, x)[0]
    return call


LAYER_CASES = [(fn, style) for fn in ops.FUNCTIONAL_LAYERS for style in ("positional", "keyword")]


@pytest.mark.parametrize("fn, style", LAYER_CASES, ids=[f"{_name(f)}-{s}" for f, s in LAYER_CASES])
def test_every_functional_layer_binds_its_operands_by_its_own_signature(fn, style):
    kind, signature = ops.FUNCTIONAL_LAYERS[fn]
    assert signature[1:] == real_signature(fn)[1:], f"the table's operand order for {_name(fn)} is not its signature"
    model = Operands(_call(fn, real_signature(fn), lambda m: _layer_values(m, fn), style)).eval()
    rank = _layer_rank(fn)
    example = torch.randn(2, 4, *([5] * rank))
    node, modules = _node(model)
    if fn in ops.TUPLE_LAYERS:
        node = node.args[0]
    assert node.target is fn and ops.layer_kind(node, modules) is kind

    bound = {name: value.target for name, value in ops.functional_layer_args(node).items()}
    expected = {name: source.format(rank=rank) for name, source in _EXPECTED_SOURCE[kind].items()}
    assert bound == expected

    gm = prepare(model, example)
    result = apply(BindFunctionalLayers(), gm, example)
    assert [r.kind for r in result.rewrites] == [RewriteKind.FUNCTIONAL_LAYER_BOUND]
    assert_same_function(model, gm, torch.randn(3, 4, *([5] * rank)))


def test_a_batch_norm_spelt_torch_batch_norm_folds_and_verifies_on_fresh_inputs():
    """torch.batch_norm(input, weight, bias, running_mean, running_var, ...): compiled with the BN folded."""

    class TorchBatchNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 4, 1)
            randomize_batchnorm(self.bn)

        def forward(self, x):
            bn = self.bn
            x = torch.batch_norm(self.conv(x), bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.1, 1e-5, False)
            return self.head(x)  # no activation: nothing statistical, the compile is exact

    model = TorchBatchNorm().eval()
    result = egp_export.compile(model, torch.randn(64, 3, 8, 8))
    assert RewriteKind.BN_FOLDED.value in [r["kind"] for r in result.report["rewrites"]]
    assert not any(ops.is_batch_norm(n, ops.named_modules(result.module)) for n in result.module.graph.nodes)
    assert_same_function(model, result.module, torch.randn(16, 3, 8, 8))


def _activation_values(fn) -> dict:
    return {"min_val": -0.5, "max_val": 0.7, "negative_slope": 0.2, "approximate": "tanh"}


ACTIVATION_CASES = [(fn, style) for fn in activations.ACTIVATION_FUNCTIONS for style in ("positional", "keyword")]


@pytest.mark.parametrize("fn, style", ACTIVATION_CASES, ids=[f"{_name(f)}-{s}" for f, s in ACTIVATION_CASES])
def test_every_functional_activation_reads_its_operands_and_in_place_flag(fn, style):
    signature, _, always_inplace = activations.ACTIVATION_FUNCTIONS[fn]
    names = real_signature(fn)
    assert signature[1:] == names[1:], f"the table's operand order for {_name(fn)} is not its signature"
    inplace = style == "positional"  # positional calls ask for in place, keyword calls do not
    values = {**_activation_values(fn), "inplace": inplace}
    rest = [n for n in names[1:] if n in values]
    if style == "positional" and "approximate" not in rest:
        call = lambda m, x: fn(x * 1, *[values[n] for n in rest])  # noqa: E731 - x * 1: never write the input
    else:
        call = lambda m, x: fn(x * 1, **{n: values[n] for n in rest})  # noqa: E731
    model = Operands(call).eval()
    node, modules = _node(model)
    spec = activations.activation_spec(node, modules)
    assert spec is not None
    assert spec.inplace == (always_inplace or ("inplace" in rest and inplace))
    x = torch.randn(64, 4) * 4
    with torch.no_grad():
        torch.testing.assert_close(spec.fn(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "base, build", activations.ACTIVATION_MODULES, ids=[b.__name__ for b, _ in activations.ACTIVATION_MODULES]
)
def test_every_activation_module_is_known_and_a_subclass_with_its_own_forward_is_not(base, build):
    module = base()
    own = type(f"Scaled{base.__name__}", (base,), {"forward": lambda self, x: 2 * base.forward(self, x)})()
    same = type(f"Plain{base.__name__}", (base,), {})()
    modules = {"act": module, "own": own, "same": same}
    graph = fx.Graph()
    x = graph.placeholder("x")
    nodes = {name: graph.call_module(name, (x,)) for name in modules}
    z = torch.randn(64, 4) * 4
    spec = activations.activation_spec(nodes["act"], modules)
    with torch.no_grad():
        torch.testing.assert_close(spec.fn(z), module(z))
    assert activations.activation_spec(nodes["same"], modules) is not None
    assert activations.activation_spec(nodes["own"], modules) is None


IDENTITY_CASES = [(fn, style) for fn in ops.EVAL_IDENTITY_FUNCTIONS for style in ("positional", "keyword")]


@pytest.mark.parametrize("fn, style", IDENTITY_CASES, ids=[f"{_name(f)}-{s}" for f, s in IDENTITY_CASES])
def test_every_eval_identity_function_reads_its_training_operand(fn, style):
    signature, training, default = ops.EVAL_IDENTITY_FUNCTIONS[fn]
    names = real_signature(fn)
    if fn is stochastic_depth:  # through the module's global name, which fx.wrap patches while tracing
        fn = lambda *args, **kwargs: stochastic_depth(*args, **kwargs)  # noqa: E731
    assert signature[1:] == names[1:], f"the table's operand order for {_name(fn)} is not its signature"
    for value, identity in ((False, True), (True, False)):
        values = {"p": 0.5, "mode": "row", training: value, "inplace": False}
        rest = [n for n in names[1:] if n in values]
        if style == "positional":
            model = Operands(lambda m, x, values=values, rest=rest: fn(x, *[values[n] for n in rest]))
        else:
            model = Operands(lambda m, x, values=values, rest=rest: fn(x, **{n: values[n] for n in rest}))
        node, modules = _node(model)
        assert ops.is_identity(node, modules) is identity, (value, identity)
    if default is not None:  # training left out: its default decides
        node, modules = _node(Operands(lambda m, x: fn(x, 0.5) if "mode" not in names else fn(x, 0.5, "row")))
        assert ops.is_identity(node, modules) is (default is False)


@pytest.mark.parametrize("fn", list(ops.FLATTEN_FUNCTIONS), ids=_name)
def test_every_flatten_function_reads_its_dims(fn):
    assert ops.FLATTEN_FUNCTIONS[fn][1:] == real_signature(fn)[1:]
    for call, dims in (
        (lambda m, x: fn(x, 1, -1), (1, -1)),
        (lambda m, x: fn(x, start_dim=2, end_dim=3), (2, 3)),
        (lambda m, x: fn(x), (0, -1)),
    ):
        node, modules = _node(Operands(call))
        assert ops.flatten_dims(node, modules) == dims


@pytest.mark.parametrize("fn", list(ops.GLOBAL_POOL_FUNCTIONS), ids=_name)
def test_every_global_pool_function_reads_its_output_size(fn):
    assert ops.GLOBAL_POOL_FUNCTIONS[fn][1:] == real_signature(fn)[1:]
    rank = 1 if "1d" in _name(fn) else 3 if "3d" in _name(fn) else 2
    for size, pooled in ((1, True), ([1] * rank, True), (2, False)):
        for call in (lambda m, x, size=size: fn(x, size), lambda m, x, size=size: fn(x, output_size=size)):
            node, modules = _node(Operands(call))
            assert ops.is_global_average_pool(node, modules) is pooled and ops.is_pool(node, modules)


POOL_CALLS = {
    F.adaptive_max_pool1d: lambda x: F.adaptive_max_pool1d(x, 1),
    F.adaptive_max_pool2d: lambda x: F.adaptive_max_pool2d(x, 1),
    F.adaptive_max_pool3d: lambda x: F.adaptive_max_pool3d(x, 1),
    F.max_pool1d: lambda x: F.max_pool1d(x, 2),
    F.max_pool2d: lambda x: F.max_pool2d(x, 2),
    F.max_pool3d: lambda x: F.max_pool3d(x, 2),
    F.avg_pool1d: lambda x: F.avg_pool1d(x, 2),
    F.avg_pool2d: lambda x: F.avg_pool2d(x, 2),
    F.avg_pool3d: lambda x: F.avg_pool3d(x, 2),
    **{fn: (lambda x, fn=fn: fn(x, [2, 2])) for fn in ops.aten_ops("max_pool2d.default", "avg_pool2d.default")},
    **{fn: (lambda x, fn=fn: fn(x, [2])) for fn in ops.aten_ops("max_pool1d.default", "avg_pool1d.default")},
    **{fn: (lambda x, fn=fn: fn(x, [2, 2, 2])) for fn in ops.aten_ops("max_pool3d.default", "avg_pool3d.default")},
}
PAD_CALLS = {
    F.pad: lambda x: F.pad(x, (1, 1)),
    torch.constant_pad_nd: lambda x: torch.constant_pad_nd(x, [1, 1]),
    **{fn: (lambda x, fn=fn: fn(x, [1, 1])) for fn in ops.aten_ops("pad.default", "constant_pad_nd.default")},
    **{
        fn: (lambda x, fn=fn, rank=rank: fn(x, [1, 1] * rank))
        for rank in (1, 2, 3)
        for fn in ops.aten_ops(f"reflection_pad{rank}d.default", f"replication_pad{rank}d.default")
    },
}


def test_every_pool_and_pad_function_is_recognised():
    assert set(POOL_CALLS) == ops.POOL_FUNCTIONS - set(ops.GLOBAL_POOL_FUNCTIONS)
    assert set(PAD_CALLS) == ops.PAD_FUNCTIONS
    for fn, call in [*POOL_CALLS.items(), *PAD_CALLS.items()]:
        node, modules = _node(Operands(lambda m, x, call=call: call(x)))
        assert node.target is fn
        assert ops.is_pool(node, modules) is (fn in POOL_CALLS) and ops.is_pad(node, modules) is (fn in PAD_CALLS)


@pytest.mark.parametrize("fn", sorted(ops.ADD_FUNCTIONS, key=_name), ids=_name)
def test_every_add_function_is_an_add_without_alpha(fn):
    graph = fx.Graph()  # by hand: symbolic tracing records operator.iadd on a Proxy as operator.add
    a, b = graph.placeholder("a"), graph.placeholder("b")
    assert ops.is_add(graph.call_function(fn, (a, b)))
    assert ops.is_add(graph.call_function(fn, (a, b), {"alpha": 1}))
    assert not ops.is_add(graph.call_function(fn, (a, b), {"alpha": 2}))
    assert not ops.is_add(graph.call_function(fn, (a,)))


# Subclasses that compute something else are opaque ------------------------------


class StandardisedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation): its attributes do not describe it."""

    def forward(self, x):
        weight = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class BatchNormThenRelu(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


class PlainConv(nn.Conv2d):
    """A subclass that only adds a name: it computes what Conv2d computes."""


def _orthogonal_conv() -> nn.Conv2d:
    conv = nn.Conv2d(4, 4, 1)
    nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    return conv


def _hooked_conv() -> nn.Conv2d:
    conv = nn.Conv2d(4, 4, 1)
    conv.register_forward_hook(lambda module, inputs, output: output * 2)
    return conv


@pytest.mark.parametrize(
    "module, why",
    [
        (StandardisedConv(4, 4, 1), "overrides forward"),
        (ScaledLinear(4, 4), "overrides forward"),
        (BatchNormThenRelu(4), "overrides forward"),
        (_orthogonal_conv(), "parametrized"),
        (_hooked_conv(), "forward hooks"),
    ],
    ids=["conv-forward", "linear-forward", "batchnorm-forward", "parametrized", "hooked"],
)
def test_a_layer_subclass_that_computes_something_else_is_opaque_with_a_reason(module, why):
    graph = fx.Graph()
    node = graph.call_module("layer", (graph.placeholder("x"),))
    modules = {"layer": module}
    assert ops.layer_kind(node, modules) is None and not ops.is_module_layer(node, modules)
    reason = ops.layer_opaque_reason(module)
    assert reason.code is RefusalCode.OPAQUE_MODULE and reason.detail["why"] == why


@pytest.mark.parametrize("module, kind", [(PlainConv(4, 4, 1), ops.LayerKind.CONV), (nn.Conv2d(4, 4, 1), ops.LayerKind.CONV)])
def test_a_subclass_that_computes_what_its_base_does_is_that_layer(module, kind):
    graph = fx.Graph()
    node = graph.call_module("layer", (graph.placeholder("x"),))
    assert ops.layer_kind(node, {"layer": module}) is kind and ops.layer_opaque_reason(module) is None


class ConvSubclassBn(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(8)
        randomize_batchnorm(self.bn)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_conv_subclass_with_its_own_forward_is_not_folded_into():
    model = ConvSubclassBn(StandardisedConv(3, 8, 3, padding=1)).eval()
    example = torch.randn(4, 3, 8, 8)
    gm = trace(model, leaf_modules=[StandardisedConv])
    propagate_shapes(gm, example[:1])
    result = FoldBatchNorm()(gm)
    finalize(gm)
    assert [r.kind for r in result.rewrites] == [RewriteKind.BN_TO_AFFINE]
    [kept] = result.refusals
    because = kept.reason.detail["because"]
    assert because.code is RefusalCode.OPAQUE_MODULE and because.detail["module_type"] == "StandardisedConv"
    assert "StandardisedConv, a Conv2d subclass that overrides forward" in describe_refusal(kept)
    assert_same_function(model, gm, torch.randn(6, 3, 8, 8))


class TimmSameBlock(nn.Module):
    """A BatchNorm on the input (it folds forwards into the conv if the conv is taken for unpadded), then
    timm's Conv2dSame (stride 2: padding computed from the input size at run time) + BN + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.conv = timm.layers.create_conv2d(3, 8, 3, stride=2, padding="same")
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        randomize_batchnorm(self.norm)
        randomize_batchnorm(self.bn)

    def forward(self, x):
        return self.act(self.bn(self.conv(self.norm(x))))


@pytest.mark.parametrize("size", [9, 10], ids=["odd", "even"])
def test_a_timm_conv2d_same_model_compiles_and_matches_on_fresh_inputs(size):
    model = TimmSameBlock().eval()
    assert type(model.conv) is timm.layers.Conv2dSame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv2dSame is untraceable: made a leaf, with a warning
        result = egp_export.compile(model, torch.randn(64, 3, size, size))
    assert_same_function(model, result.module, torch.randn(32, 3, size, size))
    kept = [r for r in result.report["refusals"] if r["code"] == RefusalCode.BN_NOT_FOLDED_BACKWARDS.value]
    assert any(r["detail"]["because"]["code"] == RefusalCode.OPAQUE_MODULE.value for r in kept)


@pytest.mark.parametrize(
    "call, writes",
    [
        (lambda m, x: F.relu(x * 1, True), True),
        (lambda m, x: F.relu(x * 1, inplace=True), True),
        (lambda m, x: F.relu(x * 1, False), False),
        (lambda m, x: F.relu(x * 1), False),
        (lambda m, x: torch.ops.aten.relu_.default(x * 1), True),
        (lambda m, x: torch.ops.aten.relu.default(x * 1), False),
        (lambda m, x: torch.ops.aten.hardtanh_(x * 1, 0.0, 6.0), True),
        (lambda m, x: (x * 1).relu_(), True),
    ],
    ids=["positional", "keyword", "positional-false", "default", "aten-overload", "aten-pure", "aten-packet", "method"],
)
def test_writes_in_place_reads_every_spelling_of_in_place(call, writes):
    node, modules = _node(Operands(call))
    assert ops.writes_in_place(node, modules) is writes


MODULE_RULES = [
    ("identity", nn.Identity, (), ops.is_identity),
    ("dropout", nn.Dropout, (0.5,), ops.is_identity),
    ("flatten", nn.Flatten, (), ops.is_flatten_from_channels),
    ("global_pool", nn.AdaptiveAvgPool2d, (1,), ops.is_global_average_pool),
    ("pool", nn.MaxPool2d, (2,), ops.is_pool),
    ("pad", nn.ZeroPad2d, (1,), ops.is_pad),
]


@pytest.mark.parametrize("name, base, args, predicate", MODULE_RULES, ids=[r[0] for r in MODULE_RULES])
def test_each_module_rule_fires_for_its_class_and_not_for_a_subclass_with_its_own_forward(name, base, args, predicate):
    own = type(f"Own{base.__name__}", (base,), {"forward": lambda self, x: 2 * base.forward(self, x)})
    modules = {"plain": base(*args), "own": own(*args)}
    graph = fx.Graph()
    x = graph.placeholder("x")
    assert predicate(graph.call_module("plain", (x,)), modules)
    assert not predicate(graph.call_module("own", (x,)), modules)


def test_an_opaque_conv_is_still_a_layer_for_depth_and_pruning_but_not_for_the_algebra():
    graph = fx.Graph()
    node = graph.call_module("layer", (graph.placeholder("x"),))
    modules = {"layer": StandardisedConv(4, 4, 1)}
    assert ops.is_layer(node, modules) and ops.is_any_layer_module(modules["layer"])
    assert not ops.is_module_layer(node, modules) and not ops.is_conv(node, modules)
    assert not ops.is_layer(graph.call_module("norm", (node,)), {"norm": nn.BatchNorm2d(4)})


@pytest.mark.parametrize(
    "module",
    [
        timm.layers.BatchNormAct2d(4),
        timm.layers.Conv2dSame(4, 4, 3, stride=2),
        timm.layers.StdConv2dSame(4, 4, 3, stride=2, padding="SAME"),
        timm.layers.ScaledStdConv2d(4, 4, 3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_timm_layers_with_their_own_forward_are_opaque_when_called_as_one_module(module):
    """As leaves (requested, or untraceable like Conv2dSame) they are no BatchNorm/conv: BatchNormAct2d's
    activation and Conv2dSame's run-time padding are not in their attributes."""
    graph = fx.Graph()
    node = graph.call_module("layer", (graph.placeholder("x"),))
    assert ops.layer_kind(node, {"layer": module}) is None
    assert ops.layer_opaque_reason(module).detail["why"] == "overrides forward"


# Axis moves and layer norms (the neuron axis) ------------------------------------

PERMUTATIONS = [
    ("method-permute", lambda m, x: x.permute(0, 2, 3, 1), [0, 2, 3, 1]),
    ("method-permute-list", lambda m, x: x.permute([0, 2, 3, 1]), [0, 2, 3, 1]),
    ("torch-permute", lambda m, x: torch.permute(x, (0, 2, 3, 1)), [0, 2, 3, 1]),
    ("aten-permute", lambda m, x: torch.ops.aten.permute.default(x, [0, 2, 3, 1]), [0, 2, 3, 1]),
    ("method-transpose", lambda m, x: x.transpose(1, -1), [0, 3, 2, 1]),
    ("method-swapaxes", lambda m, x: x.swapaxes(1, -1), [0, 3, 2, 1]),
    ("torch-transpose", lambda m, x: torch.transpose(x, 1, 3), [0, 3, 2, 1]),
    ("torch-swapaxes", lambda m, x: torch.swapaxes(x, 1, 3), [0, 3, 2, 1]),
    ("aten-transpose", lambda m, x: torch.ops.aten.transpose.int(x, 1, 3), [0, 3, 2, 1]),
    ("aten-swapaxes", lambda m, x: torch.ops.aten.swapaxes.default(x, 1, 3), [0, 3, 2, 1]),
]


@pytest.mark.parametrize("call, perm", [(c, p) for _, c, p in PERMUTATIONS], ids=[n for n, _, _ in PERMUTATIONS])
def test_every_permutation_spelling_says_where_each_axis_goes(call, perm):
    node, _ = _node(Operands(call))
    assert ops.is_permutation(node) and ops.permutation(node, 4) == perm
    # conv (channels at dim 1) -> permute -> relu: the site's neurons are where the permutation moved dim 1
    model = Spelled(lambda m, x: F.relu(call(m, m.layer(x))), nn.Conv2d(4, 4, 1)).eval()
    gm = prepare(model, torch.randn(2, 4, 5, 5))
    site = next(n for n in gm.graph.nodes if n.target is F.relu)
    moved = perm.index(1)
    assert fx_site_dim(site, ops.named_modules(gm)) == (-1 if moved == 3 else moved)


def fx_site_dim(node, modules):
    from egp_export.analysis.fx import site_neuron_dim

    return site_neuron_dim(node, modules)


LAYER_NORMS = [
    ("module", lambda m, x: m.layer(x), nn.LayerNorm(4)),
    ("function", lambda m, x: F.layer_norm(x, [4]), None),
    ("torch", lambda m, x: torch.layer_norm(x, [4]), None),
    ("aten", lambda m, x: torch.ops.aten.layer_norm.default(x, [4]), None),
    ("aten-native", lambda m, x: torch.ops.aten.native_layer_norm.default(x, [4], None, None, 1e-5)[0], None),
]


@pytest.mark.parametrize("call, module", [(c, m) for _, c, m in LAYER_NORMS], ids=[n for n, _, _ in LAYER_NORMS])
def test_every_layer_norm_spelling_fixes_a_channels_last_layout(call, module):
    """[B, 4, 6, 4] -> layer norm (last dim) -> relu: the neurons are the last dim, although rank 4 reads as NCHW."""
    model = Spelled(lambda m, x: F.relu(call(m, x)), module).eval()
    gm = prepare(model, torch.randn(2, 4, 6, 4))
    site = next(n for n in gm.graph.nodes if n.target is F.relu)
    modules = ops.named_modules(gm)
    norm = site.args[0] if site.args[0].target is not operator.getitem else site.args[0].args[0]
    assert ops.is_layer_norm(norm, modules)
    assert fx_site_dim(site, modules) == -1


def test_a_transposed_aten_convolution_is_no_conv():
    node, modules = _node(
        Operands(lambda m, x: torch.ops.aten.convolution.default(x, m.conv2d, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1))
    )
    assert ops.layer_kind(node, modules) is None and not ops.is_conv(node, modules)


@pytest.mark.parametrize(
    "call, pooled",
    [
        (lambda m, x: x.mean((-1, -2), keepdim=True), True),  # negative dims, read against the input's rank
        (lambda m, x: x.mean((1, 2, 3), keepdim=True), False),  # the channel dim too: no channel-wise op
        (lambda m, x: x.mean(3, keepdim=True), False),  # one of two spatial dims
        (lambda m, x: torch.ops.aten.mean.dim(x, [-2, -1], True), True),
    ],
)
def test_a_mean_is_a_global_pool_only_over_every_spatial_dim(call, pooled):
    gm = prepare(Operands(call).eval(), torch.randn(2, 4, 5, 5))
    node = [n for n in gm.graph.nodes if n.op in ("call_method", "call_function")][-1]
    modules = ops.named_modules(gm)
    assert ops.is_global_average_pool(node, modules) is pooled and ops.is_pool(node, modules) is pooled
