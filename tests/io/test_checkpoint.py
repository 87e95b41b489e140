"""Tests for egp_export.io.checkpoint: reading checkpoint files and loading them into models."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from egp_export.errors import CheckpointError
from egp_export.io.checkpoint import apply_state_dict, load_state_dict


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


class PickledThing:
    """A class torch.load(weights_only=True) refuses to unpickle."""

    def __init__(self) -> None:
        self.note = "not a tensor"


def test_plain_state_dict_round_trips(tmp_path):
    net = _small_net()
    path = tmp_path / "plain.pt"
    torch.save(net.state_dict(), path)

    loaded = load_state_dict(path)

    _assert_same_tensors(loaded, dict(net.state_dict()))
    fresh = _small_net()
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    apply_state_dict(fresh, loaded)
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("wrapper_key", ["state_dict", "model_state_dict", "model"])
def test_wrapper_is_unwrapped_and_metadata_dropped(tmp_path, wrapper_key):
    net = _small_net()
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper_key: net.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, path)

    loaded = load_state_dict(path)

    _assert_same_tensors(loaded, dict(net.state_dict()))
    assert "epoch" not in loaded


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path, prefix):
    net = _small_net()
    path = tmp_path / "ddp.pt"
    torch.save(OrderedDict((prefix + key, value) for key, value in net.state_dict().items()), path)

    loaded = load_state_dict(path)

    _assert_same_tensors(loaded, dict(net.state_dict()))


def test_prefix_kept_when_not_on_every_key(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"module.weight": torch.ones(2), "bias": torch.zeros(2)}, path)

    assert list(load_state_dict(path)) == ["module.weight", "bias"]


def test_torch_prune_checkpoint_is_folded(tmp_path):
    net = _small_net()
    prune.l1_unstructured(net[0], name="weight", amount=0.5)
    prune.l1_unstructured(net[4], name="bias", amount=0.4)
    saved = net.state_dict()
    assert "0.weight_orig" in saved and "0.weight_mask" in saved
    path = tmp_path / "pruned.pt"
    torch.save(saved, path)

    loaded = load_state_dict(path)

    assert not any(key.endswith(("_orig", "_mask")) for key in loaded)
    torch.testing.assert_close(loaded["0.weight"], saved["0.weight_orig"] * saved["0.weight_mask"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["4.bias"], saved["4.bias_orig"] * saved["4.bias_mask"], rtol=0, atol=0)
    assert int((loaded["0.weight"] == 0).sum()) == saved["0.weight_orig"].numel() // 2 == 54
    # The folded dict loads into the unpruned architecture and reproduces the pruned model.
    plain = _small_net()
    apply_state_dict(plain, loaded)
    net.eval()
    plain.eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(plain(x), net(x), rtol=0, atol=0)


def test_unpaired_mask_buffer_is_kept(tmp_path):
    path = tmp_path / "mask.pt"
    torch.save({"attn_mask": torch.ones(2, 2), "weight": torch.ones(2)}, path)

    assert set(load_state_dict(path)) == {"attn_mask", "weight"}


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist.*--checkpoint"):
        load_state_dict(tmp_path / "nope.pt")


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_state_dict(tmp_path)


def test_random_bytes_are_reported_as_corrupt(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))

    with pytest.raises(CheckpointError, match=r"not a readable PyTorch file.*corrupt") as info:
        load_state_dict(path)
    assert "random.pt" in str(info.value)
    assert "pickled Python objects" not in str(info.value)


@pytest.mark.parametrize("cut", ["truncated", "empty"])
def test_truncated_and_empty_files_are_reported_as_corrupt(tmp_path, cut):
    path = tmp_path / "cut.pt"
    torch.save(_small_net().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "truncated" else b"")

    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_state_dict(path)


def test_pickled_objects_refused_by_default(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": _small_net().state_dict(), "thing": PickledThing()}, path)

    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "pickled Python objects" in message
    assert "PickledThing" in message
    assert "torch.save(model.state_dict()" in message
    assert "--unsafe-pickle" in message


def test_pickled_objects_accepted_with_allow_pickle(tmp_path):
    net = _small_net()
    path = tmp_path / "objects.pt"
    torch.save({"state_dict": net.state_dict(), "thing": PickledThing()}, path)

    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = load_state_dict(path, allow_pickle=True)

    _assert_same_tensors(loaded, dict(net.state_dict()))


@pytest.mark.parametrize("nested", [False, True])
def test_whole_module_needs_allow_pickle(tmp_path, nested):
    net = _small_net()
    path = tmp_path / "module.pt"
    torch.save({"model": net, "epoch": 3} if nested else net, path)

    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_state_dict(path)
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = load_state_dict(path, allow_pickle=True)
    _assert_same_tensors(loaded, dict(net.state_dict()))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (torch.ones(3), "holds a Tensor, not a state dict"),
        ([torch.ones(3)], "holds a list, not a state dict"),
        ({}, "empty dict"),
        ({"weight": torch.ones(2), "epoch": 3}, r"non-tensor entries \(epoch\)"),
    ],
)
def test_content_that_is_not_a_state_dict(tmp_path, content, expected):
    path = tmp_path / "odd.pt"
    torch.save(content, path)

    with pytest.raises(CheckpointError, match=expected):
        load_state_dict(path)


def test_key_mismatch_lists_missing_and_unexpected(tmp_path):
    state = dict(_small_net().state_dict())
    state["extra.weight"] = state.pop("4.weight")

    with pytest.raises(CheckpointError) as info:
        apply_state_dict(_small_net(), state)
    message = str(info.value)
    assert "missing keys (in the model, not in the checkpoint) (1):\n    4.weight" in message
    assert "unexpected keys (in the checkpoint, not in the model) (1):\n    extra.weight" in message
    assert "shape mismatches" not in message
    assert "--arch / --arch-kwargs" in message


def test_shape_mismatch_names_both_shapes_and_leaves_model_untouched():
    model = _small_net()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    state = dict(_small_net().state_dict())
    state["4.weight"] = torch.zeros(7, 4 * 6 * 6)
    state["4.bias"] = torch.zeros(7)

    with pytest.raises(CheckpointError) as info:
        apply_state_dict(model, state)
    message = str(info.value)
    assert "shape mismatches (2):" in message
    assert "4.weight: checkpoint (7, 144) vs model (5, 144)" in message
    assert "4.bias: checkpoint (7,) vs model (5,)" in message
    assert "missing keys" not in message
    _assert_same_tensors(dict(model.state_dict()), before)


def test_long_mismatch_lists_are_cut_with_a_count():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])  # 12 keys

    with pytest.raises(CheckpointError) as info:
        apply_state_dict(model, {"other": torch.ones(1)})
    message = str(info.value)
    assert "missing keys (in the model, not in the checkpoint) (12):" in message
    assert "... and 4 more" in message
    assert "5.bias" not in message


def test_missing_num_batches_tracked_is_tolerated():
    source = _small_net()
    state = {key: value for key, value in source.state_dict().items() if not key.endswith("num_batches_tracked")}
    target = _small_net()
    with torch.no_grad():
        target[1].running_mean.fill_(5.0)

    apply_state_dict(target, state)

    torch.testing.assert_close(target[1].running_mean, source[1].running_mean, rtol=0, atol=0)
    assert "1.num_batches_tracked" not in state


_SCRIPT_SAVING_A_HOOKED_MODEL = '''
import sys

import torch
import torch.nn as nn


class Hook:  # as in EGP's reference training script: a forward hook whose class lives in __main__
    def __init__(self, module):
        self.handle = module.register_forward_hook(self.record)

    def record(self, module, inputs, output):
        self.output = inputs[0]


model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
hooks = {"1": Hook(model[1])}
torch.save(model, sys.argv[1])
'''


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_whole_module_pickled_with_hooks_from_main_says_how_to_resave(tmp_path, allow_pickle):
    script, path = tmp_path / "train.py", tmp_path / "whole.pt"
    script.write_text(_SCRIPT_SAVING_A_HOOKED_MODEL)
    subprocess.run([sys.executable, str(script), str(path)], check=True, capture_output=True, timeout=120)
    with pytest.warns(UserWarning) if allow_pickle else contextlib.nullcontext():
        with pytest.raises(CheckpointError) as raised:
            load_state_dict(path, allow_pickle=allow_pickle)
    message = str(raised.value)
    assert "whole model pickled by its training script" in message and "__main__.Hook" in message
    assert "torch.save(model.state_dict(), path)" in message and "install" not in message
