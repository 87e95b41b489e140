"""Tests for EliminateDeadChannels: all-zero filters (unstructured pruning, folded OFF neurons) are removed.

A dead channel goes from every producer (output rows), every affine map on its
way and every consumer (input columns). Each refusal reason has a test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.passes import EliminateDeadChannels
from egp_export.passes.eliminate_dead_channels import zero_rows
from egp_export.records import RefusalCode
from tests.conftest import (
    CONV_VARIANTS,
    ConvVariant,
    Slot,
    actions,
    apply,
    assert_onnx_valid,
    assert_same_function,
    install_affine,
    prepare,
    reasons,
    zero_channels,
)

DEAD = [1, 5]
# These tests are about which channels may go; the alignment of what is kept has its own tests below.
UNALIGNED = 1


def _eliminate(model: nn.Module, example: torch.Tensor):
    model = model.eval()
    gm = prepare(model, example)
    return gm, apply(EliminateDeadChannels(alignment=UNALIGNED), gm, example)


def _widths(gm, name: str) -> tuple[int, int]:
    layer = gm.get_submodule(name)
    if isinstance(layer, nn.Linear):
        assert layer.weight.shape == (layer.out_features, layer.in_features)
        return layer.in_features, layer.out_features
    assert layer.weight.shape[:2] == (layer.out_channels, layer.in_channels // layer.groups)
    return layer.in_channels, layer.out_channels


def _refused(model: nn.Module, example: torch.Tensor, reason: str) -> None:
    gm, result = _eliminate(model, example)

    assert not result.modified, actions(result)
    assert any(reason in r for r in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn_like(example))


# Removal -----------------------------------------------------------------------------


class ConvChain(nn.Module):
    def __init__(self, first: nn.Module, middle: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.middle, self.second = first, middle, second

    def forward(self, x):
        return self.second(self.middle(self.first(x)))


UNGROUPED = [v for v in CONV_VARIANTS if v.kwargs.get("groups", 1) == 1]
GROUPED = [v for v in CONV_VARIANTS if v.kwargs.get("groups", 1) != 1]


@pytest.mark.parametrize("variant", UNGROUPED, ids=[v.id for v in UNGROUPED])
def test_zero_filters_are_removed_from_producer_and_consumer(variant: ConvVariant):
    second = variant.cls(8, 3, 3, padding=1)  # a padded consumer: removed columns read zeros anyway
    model = ConvChain(variant.make(), nn.ReLU(), second)
    zero_channels(model.first, DEAD)
    gm, result = _eliminate(model, variant.input())

    assert _widths(gm, "first")[1] == 6
    assert _widths(gm, "second") == (6, 3)
    assert not zero_rows(gm.get_submodule("first")).any()
    assert actions(result) == ["removed 2 of 8 channels from first (consumers: second)"]
    assert_same_function(model, gm, variant.input())


@pytest.mark.parametrize("variant", GROUPED, ids=[v.id for v in GROUPED])
def test_grouped_producer_is_left_alone_or_removed_consistently(variant: ConvVariant):
    # Output channels of a grouped conv are tied to its input groups: dropping rows breaks `groups`.
    model = ConvChain(variant.make(), nn.ReLU(), variant.cls(8, 3, 1))
    zero_channels(model.first, [1, 2])  # both in the first group: the groups would no longer line up
    gm, result = _eliminate(model, variant.input())

    assert_same_function(model, gm, variant.input())
    assert result.modified or any("group" in r for r in reasons(result)), reasons(result)


@pytest.mark.parametrize(
    "middle",
    [nn.ReLU(), nn.ReLU6(inplace=True), nn.GELU(), nn.PReLU(1), nn.Dropout(), nn.Identity(),
     nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))],
    ids=["relu", "relu6-inplace", "gelu", "prelu1", "dropout", "identity", "maxpool", "avgpool", "leaky+maxpool"],
)
def test_dead_channels_pass_through_zero_preserving_ops(middle: nn.Module):
    model = ConvChain(nn.Conv2d(3, 8, 3, padding=1), middle, nn.Conv2d(8, 2, 1))
    zero_channels(model.first, DEAD)
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert _widths(gm, "first")[1] == 6 and _widths(gm, "second")[0] == 6
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))


class PoolFlattenLinear(nn.Module):
    def __init__(self, flatten, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)  # 6x6 -> 4x4
        self.pool = nn.AdaptiveAvgPool2d(1) if pool else nn.Identity()
        self.flatten = flatten
        self.fc = nn.Linear(8 if pool else 8 * 16, 5)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(F.relu(self.conv(x)))))


@pytest.mark.parametrize(
    "flatten",
    [lambda x: torch.flatten(x, 1), lambda x: x.flatten(1), nn.Flatten()],
    ids=["torch.flatten", "x.flatten", "nn.Flatten"],
)
@pytest.mark.parametrize("pool", [True, False], ids=["pooled", "unpooled"])
def test_flatten_into_linear_removes_blocks_of_columns(flatten, pool: bool):
    model = PoolFlattenLinear(flatten if isinstance(flatten, nn.Module) else Slot(flatten), pool)
    zero_channels(model.conv, DEAD)
    gm, _ = _eliminate(model, torch.randn(2, 3, 6, 6))

    block = 1 if pool else 16
    assert _widths(gm, "conv")[1] == 6
    assert _widths(gm, "fc") == (6 * block, 5)
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 6), (2, 3, 3, 6)], ids=["BC", "BNC", "BHWC"])
def test_linear_chain_in_token_layout(shape):
    model = ConvChain(nn.Linear(6, 8), nn.Sequential(nn.GELU(), nn.Dropout()), nn.Linear(8, 3))
    zero_channels(model.first, DEAD)
    gm, _ = _eliminate(model, torch.randn(shape))

    assert _widths(gm, "first") == (6, 6) and _widths(gm, "second") == (6, 3)
    assert_same_function(model, gm, torch.randn(shape))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(F.relu(self.a(x)) + self.b(x))


def test_residual_add_where_both_branches_agree():
    model = Residual()
    zero_channels(model.a, DEAD)
    zero_channels(model.b, DEAD)
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert _widths(gm, "a")[1] == _widths(gm, "b")[1] == _widths(gm, "c")[0] == 6
    assert actions(result) == ["removed 2 of 8 channels from a, b (consumers: c)"]
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))


def test_residual_add_where_the_branches_disagree_is_refused():
    model = Residual()
    zero_channels(model.a, [1, 5])
    zero_channels(model.b, [2, 6])
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert _widths(gm, "a")[1] == _widths(gm, "b")[1] == 8
    # The zero filters of 'a' are a candidate the pass looked at and kept: the report must say why.
    assert any(
        refusal.node in ("a", "b") and refusal.code is RefusalCode.ZERO_CHANNELS_NOT_SHARED for refusal in result.refusals
    ), reasons(result)
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))


class ResidualOverConsumer(nn.Module):
    """x = relu(conv1(x)); x = x + conv2(x): conv2 reads the group's channels and adds its output back to them."""

    def __init__(self, add_first: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 4, 1)
        self.add_first = add_first

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x) + x if not self.add_first else x + self.conv2(x)
        return self.head(F.relu(x))


@pytest.mark.parametrize("add_first", [False, True], ids=["conv-then-add", "add-then-conv"])
def test_dead_channels_before_a_residual_over_a_consumer_are_kept_when_the_consumer_writes_them(add_first):
    """Regression: conv2 joined only as a consumer, its output kept 32 channels, the add got 16 + 32 (traceback)."""
    model = ResidualOverConsumer(add_first)
    zero_channels(model.conv1, list(range(16)))
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert _widths(gm, "conv1")[1] == _widths(gm, "conv2")[1] == 32
    assert any("not zero in conv2" in reason for reason in reasons(result)), reasons(result)
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))


@pytest.mark.parametrize("add_first", [False, True], ids=["conv-then-add", "add-then-conv"])
def test_dead_channels_before_a_residual_over_a_consumer_go_from_its_rows_and_columns(add_first):
    model = ResidualOverConsumer(add_first)
    zero_channels(model.conv1, list(range(16)))
    zero_channels(model.conv2, list(range(16)))
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert _widths(gm, "conv1")[1] == 16
    assert _widths(gm, "conv2") == (16, 16) and _widths(gm, "head")[0] == 16
    assert actions(result) == ["removed 16 of 32 channels from conv1, conv2 (consumers: conv2, head)"]
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))
    assert_onnx_valid(gm, torch.randn(2, 3, 6, 6))


def test_channels_with_a_shift_in_the_group_are_kept():
    model = ConvChain(nn.Conv2d(3, 8, 1), nn.Identity(), nn.Conv2d(8, 2, 1))
    zero_channels(model.first, DEAD)
    example = torch.randn(2, 3, 5, 5)
    gm = prepare(model.eval(), example)
    shift = torch.zeros(8)
    shift[5] = 1.0  # channel 5 is zero before the map and 1 after it
    install_affine(gm, "middle", torch.full((8,), 2.0), shift, 1, example)
    reference = ConvChain(model.first, copy.deepcopy(gm.get_submodule("middle")), model.second).eval()
    result = apply(EliminateDeadChannels(alignment=UNALIGNED), gm, example)

    assert _widths(gm, "first")[1] == 7 and gm.get_submodule("middle").scale.numel() == 7
    assert actions(result) == ["removed 1 of 8 channels from first (consumers: second)"]
    assert_same_function(reference, gm, torch.randn(3, 3, 5, 5))


def test_a_fully_dead_layer_keeps_one_channel():
    model = ConvChain(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    zero_channels(model.first, [0, 1, 2, 3])
    gm, _ = _eliminate(model, torch.randn(2, 3, 5, 5))

    assert _widths(gm, "first")[1] == 1 and _widths(gm, "second")[0] == 1
    assert_same_function(model, gm, torch.randn(3, 3, 5, 5))


def test_zero_filter_with_a_bias_is_not_dead():
    model = ConvChain(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    zero_channels(model.first, DEAD)
    with torch.no_grad():
        model.first.bias[DEAD] = 0.5
    gm, result = _eliminate(model, torch.randn(2, 3, 5, 5))

    assert not result.modified and _widths(gm, "first")[1] == 8


def test_onnx_export_after_elimination_is_valid():
    model = PoolFlattenLinear(nn.Flatten(), pool=True)
    zero_channels(model.conv, DEAD)
    gm, result = _eliminate(model, torch.randn(2, 3, 6, 6))

    assert result.modified
    onnx_model = assert_onnx_valid(gm, torch.randn(2, 3, 6, 6))
    conv_weight = next(init for init in onnx_model.graph.initializer if list(init.dims)[:1] == [6])
    assert list(conv_weight.dims)[0] == 6


# Refusals: one test per reason --------------------------------------------------------


class ToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(y), y


def test_channels_reaching_the_output_are_refused():
    model = ToOutput()
    zero_channels(model.a, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "channels reach 'output'")


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


def test_concat_is_refused():
    model = Concat()
    zero_channels(model.a, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "channels reach 'cat'")


def test_grouped_consumer_is_refused():
    model = ConvChain(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
    zero_channels(model.first, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "consumer 'second' is a grouped convolution")


class SharedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.shared(self.shared(self.a(x)))


def test_shared_consumer_is_refused():
    model = SharedConsumer()
    zero_channels(model.a, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "consumer 'shared' is shared by several call sites")


class SharedProducer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.shared(F.relu(self.shared(x)))))


def test_shared_producer_is_refused():
    model = SharedProducer()
    zero_channels(model.shared, [1])
    _refused(model, torch.randn(2, 4, 5, 5), "shared")


class LinearOverWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):  # the Linear mixes the width, not the channels
        return self.fc(self.conv(x))


def test_consumer_reading_another_axis_is_refused():
    model = LinearOverWidth()
    zero_channels(model.conv, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "'fc' reads a different axis than the channel axis")


class FlattenThenActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(F.relu(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)))


def test_flatten_feeding_something_else_is_refused():
    model = FlattenThenActivation()
    zero_channels(model.conv, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "feeds something other than unshared linear layers")


class InputShortcut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.a(x) + x)


def test_residual_operand_from_the_input_is_refused():
    model = InputShortcut()
    zero_channels(model.a, DEAD)
    _refused(model, torch.randn(2, 8, 5, 5), "residual operand 'x' is not produced by a prunable conv/linear")


class MixedLayouts(nn.Module):
    """[B, 4, 4, 4]: a conv's channels added to a Linear's last axis (same shape, different meaning)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.conv(x) + self.fc(x))


def test_residual_operand_with_another_layout_is_refused():
    model = MixedLayouts()
    zero_channels(model.conv, [1])
    _refused(model, torch.randn(2, 4, 4, 4), "residual operand 'fc' has a different channel layout")


@pytest.mark.parametrize(
    "middle",
    [nn.Hardsigmoid(), nn.PReLU(8), nn.Sigmoid(), nn.BatchNorm2d(8)],
    ids=["hardsigmoid", "prelu-per-channel", "sigmoid", "batchnorm"],
)
def test_ops_that_do_not_keep_zero_channels_zero_are_refused(middle):
    # Hardsigmoid(0) = 0.5, sigmoid(0) = 0.5, BatchNorm shifts; PReLU(C) has per-channel state to slice.
    model = ConvChain(nn.Conv2d(3, 8, 1), middle, nn.Conv2d(8, 2, 1))
    zero_channels(model.first, DEAD)
    _refused(model, torch.randn(2, 3, 5, 5), "channels reach 'middle' (call_module middle)")


# Found by these tests: ops the group walk treats as zero-preserving although they are not. ----


class AddConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.a(x) + 0.5)  # a zero channel becomes 0.5


def test_adding_a_constant_does_not_keep_channels_dead():
    model = AddConstant()
    zero_channels(model.a, DEAD)
    gm, _ = _eliminate(model, torch.randn(2, 3, 5, 5))

    assert_same_function(model, gm, torch.randn(3, 3, 5, 5))


class PartialFlatten(nn.Module):
    def __init__(self, flatten) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.flatten = flatten
        self.fc = nn.Linear(25, 2)

    def forward(self, x):  # [B, 4, 5, 5] -> [B, 4, 25] -> Linear over the 25 positions
        return self.fc(self.flatten(self.a(x)))


@pytest.mark.parametrize(
    "flatten", [nn.Flatten(start_dim=2), nn.Flatten(1, 2)], ids=["nn.Flatten(2)", "nn.Flatten(1,2)"]
)
def test_flatten_that_does_not_end_in_the_channel_block_is_refused(flatten):
    model = PartialFlatten(flatten)
    if flatten.start_dim == 1:
        model.fc = nn.Linear(5, 2)  # [B, 4*5, 5]: the Linear mixes the width
    zero_channels(model.a, [1])
    gm, result = _eliminate(model, torch.randn(2, 3, 5, 5))

    assert not result.modified
    assert_same_function(model, gm, torch.randn(3, 3, 5, 5))


class ConsumerByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(input=F.relu(self.a(x)))


def test_consumer_called_with_a_keyword_argument():
    model = ConsumerByKeyword()
    zero_channels(model.a, DEAD)
    gm, _ = _eliminate(model, torch.randn(4, 6))

    assert_same_function(model, gm, torch.randn(5, 6))


@pytest.mark.parametrize(("dead", "kept"), [(5, 64), (8, 56), (37, 32), (60, 8)])
def test_kept_channel_counts_are_rounded_up_to_the_alignment(dead, kept):
    """ONNX Runtime's blocked kernels: 59 channels ran at 0.70x of 64 (see CHANNEL_ALIGNMENT)."""
    model = ConvChain(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 3, padding=1))
    zero_channels(model.first, list(range(dead)))
    example = torch.randn(2, 3, 6, 6)
    gm = prepare(model.eval(), example)
    result = apply(EliminateDeadChannels(alignment=8), gm, example)

    assert _widths(gm, "first")[1] == kept
    if kept == 64:
        assert any("multiple of 8" in r for r in reasons(result))
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))
