"""LayerMerge's padding relocation: the plan makes border-approximate chains exact after the move."""

from __future__ import annotations

import copy

import torch
import torchvision

import egp_export
from egp_export.analysis.numerics import compare
from egp_export.padding import apply_padding_plan, load_plan, padding_plan, save_plan
from egp_export.testing import recalibrate_batchnorm
from egp_export.testing import set_parameter as _set


def _resnet_with_linear_inner_relu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _set(model.layer1[0].bn1.bias, 10.0)
    return recalibrate_batchnorm(model, (3, 32, 32), seed=1)


def test_plan_moves_the_padding_of_the_linear_basic_block_to_its_first_conv():
    model = _resnet_with_linear_inner_relu()
    calibration = torch.randn(32, 3, 32, 32)
    moves = padding_plan(model, calibration)
    assert [m.convs for m in moves] == [("layer1.0.conv1", "layer1.0.conv2")]
    assert moves[0].before == ((1, 1), (1, 1)) and moves[0].after == ((2, 2), (0, 0))
    assert load_plan(save_plan(moves)) == moves


def test_applied_plan_changes_only_the_border_and_then_merges_exactly():
    model = _resnet_with_linear_inner_relu()
    calibration = torch.randn(48, 3, 32, 32)
    moves = padding_plan(model, calibration)
    relocated = apply_padding_plan(copy.deepcopy(model), moves, example=calibration[:2])
    assert relocated.layer1[0].conv1.padding == (2, 2) and relocated.layer1[0].conv2.padding == (0, 0)
    with torch.no_grad():
        assert compare(model(calibration[:4]), relocated(calibration[:4])).max_rel > 1e-4  # the function changed
    # After the move (and the fine-tuning a user would do) the chain is exact: compile merges or at least no
    # longer refuses it for its border.
    result = egp_export.compile(relocated, calibration)
    reasons = [r["reason"] for r in result.report["refusals"] if "layer1_0_conv1 -> layer1_0_conv2" in r["reason"]]
    merged = [r for r in result.report["rewrites"] if r["pass"] == "merge_conv_chains" and "layer1_0_conv1" in r["action"]]
    assert merged or (reasons and "border not exact" not in reasons[0])
