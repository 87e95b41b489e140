"""Masks: the smallest weights go first, one reparametrization per layer, permanent copies leave the original."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from egp_export.prune.masks import attach_masks, copy_model, make_permanent, masks_of, prune_smallest

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def test_prune_smallest_respects_the_count_and_prefers_lower_indices_on_ties():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -0.1, 0.1], [0.3, 0.1, -2.0]]))
    assert prune_smallest(layer, 2) == 4
    assert layer.weight_mask.tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert prune_smallest(layer, 2) == 2  # on top of the existing mask: 0.1 (index 4), then 0.3
    assert layer.weight_mask.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert set(dict(layer.named_parameters())) == {"weight_orig"}
    assert sum(1 for hook in layer._forward_pre_hooks.values()) == 1  # one reparametrization, updated in place
    with pytest.raises(ValueError):
        prune_smallest(layer, 3)


def test_exact_zeros_count_as_pruned():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.0, 3.0, 0.0, 1.0]]))
    assert prune_smallest(layer, 1) == 1
    assert layer.weight_mask.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_make_permanent_folds_masks_and_leaves_the_original():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    prune_smallest(model[0], 6)
    model(torch.randn(2, 4)).sum().backward()  # leaves a non-leaf weight, which deepcopy refuses
    permanent = make_permanent(model)
    assert "0.weight_mask" not in permanent.state_dict() and "0.weight_mask" in model.state_dict()
    assert int((permanent[0].weight == 0).sum()) == 6
    assert masks_of(model)["0"].sum() == 10


def test_attach_masks_lets_a_fresh_copy_load_a_masked_state_dict():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prune_smallest(model[0], 5)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    attach_masks(fresh, model.state_dict())
    fresh.load_state_dict(copy_model(model).state_dict(), strict=True)
    assert set(masks_of(fresh)) == {"0"} and torch.equal(masks_of(fresh)["0"], masks_of(model)["0"])
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
