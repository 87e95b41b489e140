"""What a calibration item may be (as_batches' item contract), the dtype conversions made for the model, and a
rejected sample named."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import egp_export
from egp_export.analysis.batches import as_batches, fitting_conversion
from egp_export.errors import CalibrationError
from tests.analysis.test_integer_inputs import TokenModel, _ids
from tests.conftest import assert_same_function

SEQUENCE = 8


class _TokenLists(Dataset):
    """What a tokenizer gives: each item a Python list of token ids."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[index].tolist()


class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_a_dataset_of_token_id_lists_compiles_on_whole_sequences():
    """Regression: each list was read as (input, target), so every sample became its first id (sample_shape [1])."""
    model = TokenModel().eval()
    result = egp_export.compile(model, _TokenLists(_ids(80, 1)), min_observations=100)
    assert result.report["calibration"]["sample_shape"] == [SEQUENCE]
    assert_same_function(model, result.module, _ids(16, 2))  # fresh sequences of the same length


def test_lists_of_numbers_are_one_sample_in_a_dataset_a_loader_and_an_iterable():
    ids = _ids(10, 3)
    rows = ids.tolist()
    expected = torch.cat(list(as_batches(ids)))
    for source in (_TokenLists(ids), DataLoader(_TokenLists(ids), batch_size=4), iter(rows), rows):
        assert torch.equal(torch.cat(list(as_batches(source))), expected), type(source).__name__
    nested = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]  # nested lists of numbers: one sample [2, 2] each
    assert as_batches(_Items(nested))[0].shape == (2, 2, 2)


def test_tuples_of_tensors_and_dicts_give_their_input():
    x = torch.randn(6, 3)
    pairs = _Items([(x[i], i % 2) for i in range(6)])
    keyed = _Items([{"label": i, "inputs": x[i].numpy()} for i in range(6)])
    batches_of_dicts = [{"x": x[:4], "y": torch.zeros(4)}, {"x": x[4:], "y": torch.zeros(2)}]
    for source in (pairs, keyed, batches_of_dicts, [(x[:3], None), (x[3:], None)]):
        assert torch.equal(torch.cat(list(as_batches(source))), x), type(source).__name__


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([[1, torch.tensor(2)]] * 3, r"mixes numbers, lists and other values.*torch.tensor\(ids\)"),
        ([[torch.tensor(1), torch.tensor(2), torch.tensor(3)]] * 3, r"3 one-number tensors.*torch.stack"),
        ([{"input_ids": torch.zeros(4), "attention_mask": torch.ones(4)}] * 3,
         r"keys 'input_ids', 'attention_mask'.*store the model input under 'inputs'"),
        ([[[1, 2], [3]]] * 3, r"not rectangular.*; pad its rows"),
        ([[]] * 3, "empty list"),
    ],
)
def test_ambiguous_items_are_refused_saying_how_to_wrap_them(items, message):
    for source in (_Items(items), items):
        with pytest.raises(CalibrationError, match=message):
            list(as_batches(source))


def test_a_loader_whose_collate_function_splits_number_lists_is_refused():
    sampled = DataLoader(_TokenLists(_ids(10, 4)), batch_size=4, sampler=list(range(10)))
    with pytest.raises(CalibrationError, match="one tensor per position; pass the Dataset itself"):
        as_batches(sampled)
    stacked = DataLoader(_TokenLists(_ids(10, 4)), batch_size=4, sampler=list(range(10)), collate_fn=torch.tensor)
    assert torch.equal(torch.cat(list(as_batches(stacked))), _ids(10, 4))


def test_big_endian_arrays_in_items_are_read_in_native_order():
    x = np.arange(12, dtype=">f4").reshape(4, 3)
    assert torch.equal(as_batches([x])[0], torch.arange(12, dtype=torch.float32).reshape(4, 3))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32])
def test_narrow_integer_token_ids_are_widened_to_int64_and_said_so(dtype):
    """Regression: an nn.Embedding refuses these dtypes, so the compile was refused (int32 worked)."""
    model = TokenModel().eval()
    with pytest.warns(UserWarning, match=f"holds {str(dtype)[6:]} integers, which the model rejects: widened to int64"):
        result = egp_export.compile(model, _ids(80, 1).to(dtype), min_observations=100)
    assert_same_function(model, result.module, _ids(16, 2))
    with pytest.warns(UserWarning, match="widened to int64"):
        assert egp_export.analyze(model, _ids(20, 3).to(dtype))["num_sites"] == 1


def test_int64_ids_and_floats_are_used_as_they_are():
    model = TokenModel().eval()
    assert fitting_conversion(model, _ids(1, 0)) is None
    assert fitting_conversion(nn.Linear(3, 2), torch.zeros(1, 3, dtype=torch.uint8)) is None  # API: never rescaled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        egp_export.analyze(model, _ids(20, 3))


class _Masked(nn.Module):
    """Takes a bool mask: torch.where refuses a float condition."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.relu = nn.ReLU()

    def forward(self, mask):
        return self.relu(self.fc(torch.where(mask, 1.0, -1.0)))


def test_bool_inputs_reach_the_model_as_bool_and_become_floats_only_when_refused():
    mask = torch.rand(40, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert egp_export.analyze(_Masked().eval(), mask)["num_sites"] == 1
    floats = nn.Sequential(nn.Linear(6, 4), nn.ReLU()).eval()
    with pytest.warns(UserWarning, match="holds bool data, which the model rejects: converted to float32"):
        assert egp_export.analyze(floats, mask)["num_sites"] == 1


@pytest.mark.parametrize("bad", [100, 3])
def test_a_rejected_sample_after_the_first_is_named(bad):
    """Regression: a token id beyond the vocabulary in sample 100 of 200 raised a bare IndexError."""
    ids = _ids(200, 5)
    ids[bad, 3] = 50  # the embedding has 50 rows
    with pytest.raises(CalibrationError, match=rf"rejects calibration sample {bad} \(sample {bad % 64} of calibration "
                                               rf"batch {bad // 64}\).*index out of range.*vocabulary"):
        egp_export.analyze(TokenModel().eval(), ids)
    with pytest.raises(CalibrationError, match=rf"rejects calibration sample {bad} "):
        egp_export.compile(TokenModel().eval(), _TokenLists(ids), min_observations=100)


@pytest.mark.parametrize("part", ["holdout", "validate"])
def test_a_rejected_sample_in_the_held_out_or_validation_part_is_named(part):
    """Regression: a bad sample that lands in the held-out part (first run by the determinism check and the final
    comparison, not by calibration) raised a bare IndexError from compile."""
    from egp_export.analysis.batches import as_batches, split_holdout
    from egp_export.compiler import DEFAULT_VALIDATION

    ids = _ids(200, 5)
    split = split_holdout(as_batches(ids), 0.2, DEFAULT_VALIDATION)
    for position in (0, -1):  # the first held-out batch (determinism check) and the last (final comparison)
        bad = int(getattr(split, part).indices[position])
        broken = ids.clone()
        broken[bad, 3] = 50  # the embedding has 50 rows
        with pytest.raises(CalibrationError, match=rf"rejects calibration sample {bad} .*index out of range"):
            egp_export.compile(TokenModel().eval(), broken, min_observations=100)
