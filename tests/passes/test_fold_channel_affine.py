"""Tests for FoldChannelAffine: per-neuron affine maps fold into the producing or the consuming layers.

The maps are installed where a test model holds an ``nn.Identity`` (what
BatchNorm folding and linearization leave behind); the reference is the same
model with the ChannelAffine in eager mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from egp_export.passes import FoldChannelAffine
from egp_export.passes.modules import ChannelAffine
from tests.conftest import (
    CONV_IDS,
    CONV_VARIANTS,
    IN_CHANNELS,
    OUT_CHANNELS,
    ConvVariant,
    actions,
    affines,
    apply,
    assert_onnx_valid,
    assert_same_function,
    install_affine,
    modules_of_type,
    prepare,
    reasons,
)


def _random_map(neurons: int, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.empty(neurons).uniform_(0.5, 2.0) * torch.where(torch.rand(neurons) < 0.3, -1.0, 1.0)
    scale[0] = 0.0  # an OFF neuron
    offset = torch.randn(neurons) if shift else torch.zeros(neurons)
    return scale, offset


def _with_affine(model: nn.Module, slot: str, scale, shift, dim: int, example: torch.Tensor):
    """(reference with the map in eager mode, traced module with the map installed)."""
    model = model.eval()
    reference = copy.deepcopy(model)
    setattr(reference, slot, ChannelAffine(torch.as_tensor(scale), torch.as_tensor(shift), dim))
    gm = prepare(model, example)
    install_affine(gm, slot, scale, shift, dim, example)
    return reference, gm


def _fold(model, slot, scale, shift, dim, example):
    reference, gm = _with_affine(model, slot, scale, shift, dim, example)
    return reference, gm, apply(FoldChannelAffine(), gm, example)


# Producer side: a W x + a b + c, exact with any padding. -------------------------------


@pytest.mark.parametrize("variant", CONV_VARIANTS, ids=CONV_IDS)
def test_map_after_a_conv_folds_into_it(variant: ConvVariant):
    model = nn.Sequential(variant.make(), nn.Identity(), nn.ReLU())
    scale, shift = _random_map(OUT_CHANNELS)
    reference, gm, result = _fold(model, "1", scale, shift, 1, variant.input())

    assert affines(gm) == []
    (conv,) = modules_of_type(gm, variant.cls)
    assert conv.weight.shape == model[0].weight.shape and conv.bias is not None
    assert actions(result) == ["affine map folded into '0'"]
    assert bool((conv.weight[0] == 0).all())  # scale 0 zeroes the filter: a dead channel for the next pass
    assert_same_function(reference, gm, variant.input())


@pytest.mark.parametrize(
    ("shape", "dim"),
    [((5, 6), -1), ((5, 6), 1), ((2, 4, 6), -1), ((2, 3, 4, 6), -1)],
    ids=["BC-dim-1", "BC-dim1", "BNC", "BHWC"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_map_after_a_linear_folds_into_it(shape, dim, bias):
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Identity())
    scale, shift = _random_map(5)
    reference, gm, result = _fold(model, "1", scale, shift, dim, torch.randn(shape))

    assert affines(gm) == []
    (fc,) = modules_of_type(gm, nn.Linear)
    assert fc.weight.shape == (5, 6)
    assert result.modified
    assert_same_function(reference, gm, torch.randn(shape))


def test_identity_map_is_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity())
    reference, gm, result = _fold(model, "1", torch.ones(4), torch.zeros(4), 1, torch.randn(2, 3, 6, 6))

    assert affines(gm) == []
    assert actions(result) == ["identity map removed"]
    torch.testing.assert_close(gm.get_submodule("0").weight, model[0].weight, rtol=0, atol=0)
    assert_same_function(reference, gm, torch.randn(2, 3, 6, 6))


# Consumer side: W (a x + c) + b = (W a) x + (W c + b), exact unless c != 0 meets zero padding. ----


@pytest.mark.parametrize("variant", CONV_VARIANTS, ids=CONV_IDS)
@pytest.mark.parametrize("with_shift", [False, True], ids=["scale", "scale+shift"])
def test_map_before_a_conv_folds_into_it_unless_the_border_is_zero_padded(variant: ConvVariant, with_shift: bool):
    # The map reads the model input: nothing to fold backwards into.
    model = nn.Sequential(nn.Identity(), variant.make())
    scale, shift = _random_map(IN_CHANNELS, shift=with_shift)
    reference, gm, result = _fold(model, "0", scale, shift, 1, variant.input())

    zero_padded = variant.padded and variant.kwargs.get("padding_mode", "zeros") == "zeros"
    (conv,) = modules_of_type(gm, variant.cls)
    assert conv.weight.shape == model[1].weight.shape
    if with_shift and zero_padded:
        assert len(affines(gm)) == 1 and not result.modified
        (reason,) = reasons(result)
        assert "border" in reason and "not a conv/linear layer" in reason  # both directions explained
    else:
        assert affines(gm) == [] and actions(result) == ["affine map folded into '1'"]
    assert_same_function(reference, gm, variant.input())


@pytest.mark.parametrize(("shape", "dim"), [((5, 6), -1), ((2, 4, 6), -1)], ids=["BC", "BNC"])
def test_map_before_a_linear_folds_into_it(shape, dim):
    model = nn.Sequential(nn.Identity(), nn.Linear(6, 3, bias=False))
    scale, shift = _random_map(6)
    reference, gm, result = _fold(model, "0", scale, shift, dim, torch.randn(shape))

    assert affines(gm) == []
    (fc,) = modules_of_type(gm, nn.Linear)
    assert fc.weight.shape == (3, 6) and fc.bias is not None  # the shift became a bias
    assert_same_function(reference, gm, torch.randn(shape))


class TwoConsumers(nn.Module):
    def __init__(self, padding_b: int = 0) -> None:
        super().__init__()
        self.affine = nn.Identity()
        self.a = nn.Conv2d(4, 3, 3)
        self.b = nn.Conv2d(4, 3, 3, padding=padding_b)

    def forward(self, x):
        y = self.affine(x)
        return self.a(y), self.b(y)


def test_map_folds_into_every_consumer():
    scale, shift = _random_map(4)
    reference, gm, result = _fold(TwoConsumers(), "affine", scale, shift, 1, torch.randn(2, 4, 6, 6))

    assert affines(gm) == []
    assert actions(result) == ["affine map folded into 'a', 'b'"]
    assert_same_function(reference, gm, torch.randn(3, 4, 6, 6))


def test_one_refusing_consumer_keeps_the_map_for_all():
    scale, shift = _random_map(4)
    reference, gm, result = _fold(TwoConsumers(padding_b=1), "affine", scale, shift, 1, torch.randn(2, 4, 6, 6))

    assert len(affines(gm)) == 1
    assert "a shift before zero-padded 'b' would be wrong on the border" in reasons(result)[0]
    torch.testing.assert_close(gm.get_submodule("a").weight, reference.a.weight, rtol=0, atol=0)  # untouched
    assert_same_function(reference, gm, torch.randn(3, 4, 6, 6))


class ProducerWithTwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.affine = nn.Identity()
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv1(x)
        return self.conv2(self.affine(y)), y


def test_map_goes_forward_when_the_producer_output_is_read_elsewhere():
    scale, shift = _random_map(4)
    reference, gm, result = _fold(ProducerWithTwoUsers(), "affine", scale, shift, 1, torch.randn(2, 3, 6, 6))

    assert affines(gm) == []
    assert actions(result) == ["affine map folded into 'conv2'"]
    torch.testing.assert_close(gm.get_submodule("conv1").weight, reference.conv1.weight, rtol=0, atol=0)
    assert_same_function(reference, gm, torch.randn(3, 3, 6, 6))


@pytest.mark.parametrize("groups", [2, 4], ids=["groups2", "depthwise"])
@pytest.mark.parametrize("padding", [0, 1], ids=["unpadded", "padded"])
def test_map_before_a_grouped_conv_scales_the_right_columns(groups: int, padding: int):
    model = nn.Sequential(nn.Identity(), nn.Conv2d(4, 8, 3, groups=groups, padding=padding))
    scale, shift = _random_map(4, shift=padding == 0)  # a shift only where no zero padding meets it
    reference, gm, result = _fold(model, "0", scale, shift, 1, torch.randn(2, 4, 6, 6))

    assert affines(gm) == []
    (conv,) = modules_of_type(gm, nn.Conv2d)
    assert conv.groups == groups and conv.weight.shape == (8, 4 // groups, 3, 3)
    assert_same_function(reference, gm, torch.randn(3, 4, 6, 6))


def test_onnx_export_after_folding_is_valid():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.ReLU(), nn.Identity(), nn.Conv2d(4, 2, 1))
    scale, shift = _random_map(4)
    _, gm = _with_affine(model, "1", scale, shift, 1, torch.randn(2, 3, 6, 6))
    install_affine(gm, "3", *_random_map(4), 1, torch.randn(2, 3, 6, 6))
    apply(FoldChannelAffine(), gm, torch.randn(2, 3, 6, 6))

    assert affines(gm) == []
    assert_onnx_valid(gm, torch.randn(2, 3, 6, 6))


# Refusals ---------------------------------------------------------------------------


def _refused(model, slot, dim, example, fresh, reason):
    scale, shift = _random_map(example.shape[dim] if dim >= 0 else example.shape[-1])
    reference, gm, result = _fold(model, slot, scale, shift, dim, example)

    assert len(affines(gm)) == 1 and not result.modified
    assert any(reason in r for r in reasons(result)), reasons(result)
    assert_same_function(reference, gm, fresh)


def test_map_between_non_layers_is_kept():
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    _refused(model, "0", 1, torch.randn(2, 4, 5, 5), torch.randn(3, 4, 5, 5), "'_1' is not a conv/linear layer")


class SharedConsumer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = nn.Identity()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.conv(self.affine(x)))


def test_shared_consumer_is_refused():
    _refused(SharedConsumer(), "affine", 1, torch.randn(2, 4, 5, 5), torch.randn(3, 4, 5, 5), "shared by 2 call sites")


def test_consumer_reading_another_axis_is_refused():
    # [B, C=3, L=5] with the map on the channels, a Linear mixing the length.
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 2))
    _refused(model, "0", 1, torch.randn(2, 3, 5), torch.randn(4, 3, 5), "neuron axis 1 is not the input-channel axis")


def test_producer_reading_another_axis_is_refused():
    model = nn.Sequential(nn.Linear(5, 5), nn.Identity(), nn.ReLU())
    _refused(model, "1", 1, torch.randn(2, 3, 5), torch.randn(4, 3, 5), "neuron axis 1 is not the output-channel axis")


class ConsumerByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = nn.Identity()
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv(input=self.affine(x))


def test_consumer_called_with_a_keyword_argument_folds():
    """trace() turns conv(input=x) into conv(x), so keyword calls fold like positional ones."""
    scale, shift = _random_map(4)
    reference, gm, result = _fold(ConsumerByKeyword(), "affine", scale, shift, 1, torch.randn(2, 4, 5, 5))
    assert result.modified and affines(gm) == []
    assert_same_function(reference, gm, torch.randn(3, 4, 5, 5))


def test_same_padding_string_counts_as_zero_padding():
    model = nn.Sequential(nn.Identity(), nn.Conv1d(4, 2, 3, padding="same"))
    _refused(model, "0", 1, torch.randn(2, 4, 9), torch.randn(3, 4, 9), "would be wrong on the border")


class UnusedMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = nn.Identity()
        self.conv = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        self.affine(x)  # traced, never read: dead code until finalize removes it
        return self.conv(x)


def test_map_without_consumers_is_refused_and_then_removed_as_dead_code():
    reference, gm, result = _fold(UnusedMap(), "affine", *_random_map(4), 1, torch.randn(2, 4, 5, 5))

    assert any("forwards (no consumers)" in r for r in reasons(result)), reasons(result)
    assert affines(gm) == []  # finalize's dead-code elimination
    assert_same_function(reference, gm, torch.randn(3, 4, 5, 5))
