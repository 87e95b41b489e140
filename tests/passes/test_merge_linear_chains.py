"""Tests for MergeLinearChains: Linear∘Linear, and a 1x1 conv before a pooled head, become one Linear where exact and cheaper.

Conv∘conv chains belong to MergeConvChains (test_merge_conv_chains.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.passes import MergeLinearChains
from tests.conftest import (
    Slot,
    actions,
    apply,
    assert_onnx_valid,
    assert_same_function,
    count_calls,
    modules_of_type,
    prepare,
    reasons,
)


class Chain(nn.Module):
    def __init__(self, a: nn.Module, between: list[nn.Module], b: nn.Module) -> None:
        super().__init__()
        self.a = a
        self.between = nn.Sequential(*between)
        self.b = b

    def forward(self, x):
        return self.b(self.between(self.a(x)))


def _merge(model: nn.Module, example: torch.Tensor):
    model = model.eval()
    gm = prepare(model, example)
    return gm, apply(MergeLinearChains(), gm, example)


# Linear -> Linear: W = W2 W1, b = W2 b1 + b2 ------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 2, 3, 4)], ids=["BC", "BNC", "BHWC"])
@pytest.mark.parametrize(
    "between",
    [[], [nn.Dropout(0.5)], [nn.Identity()], [nn.Dropout(0.1), nn.Identity()]],
    ids=["direct", "dropout", "identity", "dropout+identity"],
)
@pytest.mark.parametrize(("bias_a", "bias_b"), [(True, True), (False, True), (True, False), (False, False)])
def test_linear_linear_merges(shape, between, bias_a, bias_b):
    model = Chain(nn.Linear(4, 16, bias=bias_a), between, nn.Linear(16, 3, bias=bias_b))
    gm, result = _merge(model, torch.randn(shape))

    (merged,) = modules_of_type(gm, nn.Linear)
    assert merged.weight.shape == (3, 4) and merged.bias is not None
    assert count_calls(gm, nn.Dropout, nn.Identity) == 0
    assert actions(result) == ["linear->linear: 'a' absorbed 'b'"]
    assert_same_function(model, gm, torch.randn(shape))


def test_linear_merge_refused_when_macs_grow():
    model = Chain(nn.Linear(16, 2), [nn.Dropout()], nn.Linear(2, 16))
    gm, result = _merge(model, torch.randn(3, 16))

    assert count_calls(gm, nn.Linear) == 2 and not result.modified
    assert reasons(result) == [
        "linear->linear merge of 'a' and 'b' refused: MACs would grow from 64 to 256 per token "
        "(hidden width 2 is too narrow)"
    ]
    assert_same_function(model, gm, torch.randn(3, 16))


# 1x1 conv -> global average pool -> flatten -> Linear: mean(W1 x + b1) = W1 mean(x) + b1 ---------------


class PooledHead(nn.Module):
    def __init__(self, conv: nn.Module, pool, flatten, between: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.pool = pool
        self.flatten = flatten
        self.between = nn.Sequential(*(between or []))
        self.fc = nn.Linear(conv.out_channels, 3)

    def forward(self, x):
        return self.fc(self.between(self.flatten(self.pool(self.conv(x)))))


HEADS = [
    ("conv2d-module-pool", nn.Conv2d, lambda: nn.AdaptiveAvgPool2d(1), lambda: nn.Flatten(), []),
    ("conv2d-functional-pool", nn.Conv2d, lambda: Slot(lambda x: F.adaptive_avg_pool2d(x, 1)),
     lambda: Slot(lambda x: torch.flatten(x, 1)), [nn.Dropout()]),
    ("conv2d-method-flatten", nn.Conv2d, lambda: nn.AdaptiveAvgPool2d((1, 1)), lambda: Slot(lambda x: x.flatten(1)), []),
    ("conv1d", nn.Conv1d, lambda: nn.AdaptiveAvgPool1d(1), lambda: nn.Flatten(), [nn.Identity()]),
]


@pytest.mark.parametrize(("name", "cls", "pool", "flatten", "between"), HEADS, ids=[h[0] for h in HEADS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pointwise_conv_before_a_pooled_head_joins_the_linear(name, cls, pool, flatten, between, bias):
    model = PooledHead(cls(8, 16, 1, bias=bias), pool(), flatten(), between)
    example = torch.randn(2, 8, 9) if cls is nn.Conv1d else torch.randn(2, 8, 5, 5)
    gm, result = _merge(model, example)

    assert count_calls(gm, cls) == 0
    (fc,) = modules_of_type(gm, nn.Linear)
    assert fc.weight.shape == (3, 8)
    assert "moved behind the global pool and merged into 'fc'" in actions(result)[0]
    assert_same_function(model, gm, torch.randn_like(example))


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(8, 16, 3), nn.Conv2d(8, 16, 1, padding=1), nn.Conv2d(8, 16, 1, stride=2), nn.Conv2d(8, 16, 1, groups=2)],
    ids=["3x3", "1x1-padded", "1x1-stride2", "1x1-groups2"],
)
def test_pooled_head_refused_when_the_conv_is_not_plain_pointwise(conv):
    model = PooledHead(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    gm, result = _merge(model, torch.randn(2, 8, 5, 5))

    assert count_calls(gm, nn.Conv2d) == 1 and not result.modified
    assert reasons(result) == [
        "pooled-head merge of 'conv' into 'fc' refused: the conv is not 1x1 with stride 1, no padding and no groups"
    ]
    assert_same_function(model, gm, torch.randn(2, 8, 5, 5))


def test_pooled_head_needs_a_global_pool():
    model = PooledHead(nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    model.fc = nn.Linear(16, 3)
    gm, result = _merge(model, torch.randn(2, 8, 5, 5))

    assert not result.modified and count_calls(gm, nn.Conv2d) == 1
    assert_same_function(model, gm, torch.randn(2, 8, 5, 5))


def test_conv_chains_are_left_to_merge_conv_chains():
    model = Chain(nn.Conv2d(4, 16, 3), [nn.Dropout()], nn.Conv2d(16, 4, 1))
    gm, result = _merge(model, torch.randn(2, 4, 7, 7))

    assert count_calls(gm, nn.Conv2d) == 2
    assert not result.modified and result.refusals == []


class SharedFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


class SharedSecond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.b(self.b(self.a(x)))


class SharedHeadLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)))


@pytest.mark.parametrize(
    ("model", "shared"),
    [(SharedFirst(), "a"), (SharedSecond(), "b"), (SharedHeadLinear(), "fc")],
    ids=["shared-first", "shared-second", "shared-pooled-head-linear"],
)
def test_shared_layers_are_refused(model, shared):
    example = torch.randn(2, 4, 5, 5) if isinstance(model, SharedHeadLinear) else torch.randn(3, 4)
    gm, result = _merge(model, example)

    assert not result.modified
    assert any(f"weights of '{shared}' are shared by 2 call sites" in r for r in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn_like(example))


class FirstReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = self.a(x)
        return self.b(h), h


def test_first_layer_with_other_readers_is_not_merged():
    model = FirstReadTwice()
    gm, result = _merge(model, torch.randn(3, 4))

    assert count_calls(gm, nn.Linear) == 2 and not result.modified
    assert_same_function(model, gm, torch.randn(3, 4))


def test_linear_then_conv_has_no_rule():
    model = Chain(nn.Linear(5, 5), [], nn.Conv1d(3, 2, 1))
    gm, result = _merge(model, torch.randn(2, 3, 5))

    assert not result.modified and result.refusals == []
    assert count_calls(gm, nn.Linear, nn.Conv1d) == 2


class SecondByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(input=self.a(x))


def test_second_layer_called_with_a_keyword_argument():
    # fx records `self.b(input=h)` with empty args: the pass must merge or refuse ("not the layer's input"), not crash.
    model = SecondByKeyword()
    gm, result = _merge(model, torch.randn(3, 4))

    assert result.modified or any("not the layer's input" in r for r in reasons(result))
    assert_same_function(model, gm, torch.randn(3, 4))


def test_onnx_export_after_merging_is_valid():
    # conv3x3 -> conv1x1 -> pool -> flatten -> fc1 -> dropout -> fc2: the 1x1 conv joins fc1, then fc2 joins too.
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 32), nn.Dropout(), nn.Linear(32, 2))
    gm, result = _merge(model, torch.randn(2, 3, 6, 6))

    assert len(result.rewrites) == 2
    assert count_calls(gm, nn.Conv2d) == 1 and count_calls(gm, nn.Linear) == 1
    onnx_model = assert_onnx_valid(gm, torch.randn(2, 3, 6, 6))
    op_types = [node.op_type for node in onnx_model.graph.node]
    assert op_types.count("Conv") == 1 and op_types.count("Gemm") + op_types.count("MatMul") == 1
    assert_same_function(model, gm, torch.randn(2, 3, 6, 6))
