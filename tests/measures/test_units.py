"""The residual-unit registry: features where the methods expect them, removal that rebuilds from factory kwargs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from egp_export.demo.digits import digits_resnet
from egp_export.io.checkpoint import apply_state_dict
from egp_export.measures.units import remove_units, require_units, residual_units, unit_features
from tests.measures.subjects import trained_digits


def test_digits_units_in_forward_order():
    assert [unit.name for unit in residual_units(digits_resnet())] == ["block1_1", "block1_2", "block2_1", "block2_2"]


def test_branch_feature_is_before_the_add_and_output_after():
    model = trained_digits()
    inputs = torch.randn(6, 1, 8, 8)
    branches, outputs = unit_features(model, inputs, where="branch")
    units, _ = unit_features(model, inputs, where="output")
    block = model.block1_1
    before = model.stem_relu(model.stem_bn(model.stem_conv(inputs)))
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu1(block.conv1(before))))
    assert torch.allclose(branches["block1_1"], branch.reshape(6, -1).double(), atol=1e-6)
    assert torch.allclose(units["block1_1"], torch.relu(branch + before).reshape(6, -1).double(), atol=1e-6)
    assert torch.allclose(outputs, model(inputs).double(), atol=1e-6)
    assert branches["block2_1"].shape == (6, 16 * 4 * 4)
    with pytest.raises(ValueError, match="where"):
        unit_features(model, inputs, where="input")


def test_removed_digits_units_load_into_the_factory_built_architecture():
    model = trained_digits()
    remove_units(model, ["block1_2", "block2_2"])
    assert [unit.name for unit in residual_units(model)] == ["block1_1", "block2_1"]
    rebuilt = digits_resnet(removed_blocks=("block1_2", "block2_2")).eval()
    apply_state_dict(rebuilt, model.state_dict())
    inputs = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt(inputs), model(inputs))
        # a removed unit is relu(x)
        assert torch.equal(model.block1_2(inputs - 0.5), torch.relu(inputs - 0.5))


def test_removed_unit_with_a_downsample_keeps_its_shortcut():
    downsample = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = nn.Sequential(BasicBlock(4, 8, stride=2, downsample=downsample)).eval()
    keys = {key for key in model.state_dict() if ".downsample." in key}
    remove_units(model, ["0"])
    assert set(model.state_dict()) == keys
    inputs = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(model(inputs), torch.relu(downsample(inputs)))


def test_models_without_units_and_unknown_names_are_refused():
    with pytest.raises(ValueError, match="no residual unit of a known type"):
        require_units(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no residual units named block9"):
        remove_units(digits_resnet(), ["block9"])
    with pytest.raises(ValueError, match="has no blocks block9"):
        digits_resnet(removed_blocks=("block9",))


def test_unit_features_of_a_model_writing_into_its_input_leave_the_inputs_as_they_were():
    class NormalisesInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = digits_resnet(width=4).eval()  # its residual units are found by type, anywhere inside

        def forward(self, x):
            return self.net(x.sub_(0.5))

    torch.manual_seed(0)
    model = NormalisesInPlace().eval()
    inputs = torch.rand(10, 1, 8, 8)
    kept = inputs.clone()
    _, outputs = unit_features(model, inputs, batch_size=4)
    assert torch.equal(inputs, kept)  # old code: each batch of the caller's inputs shifted by -0.5
    with torch.no_grad():
        assert torch.allclose(outputs, model.net(kept - 0.5).double())
