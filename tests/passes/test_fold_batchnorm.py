"""Tests for FoldBatchNorm: eval-mode BatchNorm folds into the producing conv/linear, else becomes a ChannelAffine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from egp_export.passes import FoldBatchNorm
from egp_export.passes.fold_batchnorm import batchnorm_affine
from egp_export.passes.modules import ChannelAffine
from egp_export.records import RewriteKind
from tests.conftest import (
    CONV_IDS,
    CONV_VARIANTS,
    ConvVariant,
    affines,
    apply,
    assert_onnx_valid,
    assert_same_function,
    count_calls,
    modules_of_type,
    prepare,
    randomize_batchnorm,
    reasons,
)

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn(cls: type, channels: int, **kwargs) -> nn.Module:
    bn = cls(channels, **kwargs)
    if bn.running_mean is not None:
        randomize_batchnorm(bn)
    return bn


def _fold(model: nn.Module, example: torch.Tensor):
    model = model.eval()
    gm = prepare(model, example)
    return gm, apply(FoldBatchNorm(), gm, example)


def test_batchnorm_affine_is_the_eval_mode_map():
    bn = _bn(nn.BatchNorm1d, 5).eval()
    x = torch.randn(7, 5)
    a, c = batchnorm_affine(bn)

    torch.testing.assert_close((a * x.double() + c).float(), bn(x))


@pytest.mark.parametrize("variant", CONV_VARIANTS, ids=CONV_IDS)
def test_conv_batchnorm_folds_into_the_conv(variant: ConvVariant):
    model = nn.Sequential(variant.make(), _bn(variant.batchnorm, 8), nn.ReLU())
    gm, result = _fold(model, variant.input())

    assert count_calls(gm, *BN_TYPES) == 0
    assert affines(gm) == []
    (conv,) = modules_of_type(gm, variant.cls)
    assert conv.bias is not None and conv.weight.shape == model[0].weight.shape
    assert conv.groups == model[0].groups
    assert len(result.rewrites) == 1 and result.refusals == []
    assert_same_function(model, gm, variant.input())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["bn-affine", "bn-plain"])
def test_linear_batchnorm1d_folds_into_the_linear(bias: bool, affine: bool):
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), _bn(nn.BatchNorm1d, 5, affine=affine))
    gm, result = _fold(model, torch.randn(4, 6))

    assert count_calls(gm, *BN_TYPES) == 0 and affines(gm) == []
    (fc,) = modules_of_type(gm, nn.Linear)
    assert fc.weight.shape == (5, 6) and fc.bias is not None
    assert_same_function(model, gm, torch.randn(9, 6))


def test_the_input_model_is_not_mutated():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _bn(nn.BatchNorm2d, 4)).eval()
    before = copy.deepcopy(model.state_dict())
    _fold(model, torch.randn(2, 3, 6, 6))

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_onnx_export_after_folding_is_valid():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _bn(nn.BatchNorm2d, 4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    gm, _ = _fold(model, torch.randn(2, 3, 6, 6))

    onnx_model = assert_onnx_valid(gm, torch.randn(2, 3, 6, 6))
    assert "BatchNormalization" not in {node.op_type for node in onnx_model.graph.node}


# Refusals: the BatchNorm stays as a per-channel affine map, with the reason recorded. -------


def _kept_as_affine(model: nn.Module, example: torch.Tensor, fresh: torch.Tensor, reason: str) -> None:
    gm, result = _fold(model, example)

    assert count_calls(gm, *BN_TYPES) == 0
    (affine,) = affines(gm)
    assert isinstance(affine, ChannelAffine) and affine.dim == 1
    assert any(reason in r for r in reasons(result)), reasons(result)
    assert any(r.kind is RewriteKind.BN_TO_AFFINE for r in result.rewrites)
    assert_same_function(model, gm, fresh)


def test_batchnorm_on_the_input_is_kept_as_an_affine_map():
    _kept_as_affine(
        nn.Sequential(_bn(nn.BatchNorm2d, 3), nn.Conv2d(3, 4, 3)),
        torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6),
        "is not a conv/linear layer",
    )


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _bn(nn.BatchNorm2d, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_producer_with_other_users_is_not_folded():
    _kept_as_affine(TwoUsers(), torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6), "has 2 users")


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = _bn(nn.BatchNorm2d, 3)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_shared_producer_is_not_folded():
    _kept_as_affine(SharedConv(), torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6), "shared by 2 call sites")


class LinearOverLength(nn.Module):
    """BatchNorm1d normalises dim 1 (channels) of a Linear applied along the last dim (length)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.bn = _bn(nn.BatchNorm1d, 3)

    def forward(self, x):  # x: [B, 3, 5]
        return self.bn(self.fc(x))


def test_axis_mismatch_is_not_folded():
    _kept_as_affine(
        LinearOverLength(), torch.randn(2, 3, 5), torch.randn(4, 3, 5), "neuron axis 1 is not the output-channel axis"
    )


def test_batchnorm_without_running_statistics_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    example = torch.randn(4, 3, 6, 6)
    gm, result = _fold(model, example)

    assert count_calls(gm, nn.BatchNorm2d) == 1 and affines(gm) == []
    assert not result.modified
    assert any("running statistics" in r for r in reasons(result))
    assert_same_function(model, gm, torch.randn(4, 3, 6, 6))


class BatchNormByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _bn(nn.BatchNorm2d, 4)

    def forward(self, x):
        return self.bn(input=self.conv(x))


def test_batchnorm_called_with_a_keyword_argument():
    # fx records `self.bn(input=y)` with empty args; the pass must fold or refuse, not crash.
    model = BatchNormByKeyword()
    gm, _ = _fold(model, torch.randn(2, 3, 6, 6))

    assert count_calls(gm, *BN_TYPES) + len(affines(gm)) <= 1
    assert_same_function(model, gm, torch.randn(3, 3, 6, 6))
