"""The three-way split of calibration samples: decide, validate, verify; disjoint, seeded, never empty; every batch a
fresh copy gathered by index."""

from __future__ import annotations

import pytest
import torch

from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.errors import CalibrationError


def test_the_three_parts_are_disjoint_cover_every_sample_and_are_each_read_in_index_order():
    samples = torch.arange(50, dtype=torch.float32)[:, None]
    split = split_holdout(list(torch.split(samples, 16)), holdout=0.2, validation=0.2)

    assert (split.decide_samples, split.validation_samples, split.holdout_samples) == (30, 10, 10)
    assert split.calibration_samples == 40
    parts = [torch.cat(list(split.calibrate)), torch.cat(list(split.validate)), torch.cat(list(split.holdout))]
    assert torch.equal(torch.cat(parts).flatten().sort().values, samples.flatten())
    for part, batches in zip(parts, (split.calibrate, split.validate, split.holdout)):
        assert torch.equal(part.flatten(), batches.indices.to(torch.float32))  # each part in index order
        assert torch.equal(batches.indices, batches.indices.sort().values)
    assert max(len(b) for b in [*split.calibrate, *split.validate, *split.holdout]) <= 16  # batches stay bounded


def test_the_split_is_a_seeded_permutation_not_the_tail():
    samples = torch.arange(100, dtype=torch.float32)[:, None]
    first, again = (split_holdout(as_batches(samples), holdout=0.2, validation=0.2) for _ in range(2))
    other = split_holdout(as_batches(samples), holdout=0.2, validation=0.2, seed=1)
    assert first.seed == 0 and other.seed == 1
    for name in ("decide", "validate", "holdout"):
        assert torch.equal(getattr(first.indices(), name), getattr(again.indices(), name))  # reproducible
    assert not torch.equal(first.indices().holdout, other.indices().holdout)  # the seed decides
    assert not torch.equal(first.indices().holdout, torch.arange(80, 100))  # not the last samples
    # "Two classes" stored in order (70 then 30): the tail held out the second class only; every part has both now.
    for part in (first.calibrate, first.validate, first.holdout):
        assert (part.indices < 70).any() and (part.indices >= 70).any()


def test_without_validation_and_holdout_everything_decides_and_verifies():
    samples = torch.randn(10, 3)
    split = split_holdout([samples], holdout=0.0)
    assert len(split.validate) == 0 and split.holdout is split.calibrate and split.decide_samples == 10


@pytest.mark.parametrize(
    ("total", "holdout", "validation", "message"),
    [
        (2, 0.2, 0.2, "too few to keep 20% for verification and 20% for validation"),
        (10, 0.2, 1.0, r"validation fraction must be in \[0, 1\)"),
        (10, -0.1, 0.2, r"holdout fraction must be in \[0, 1\)"),
    ],
)
def test_impossible_splits_are_calibration_errors(total, holdout, validation, message):
    with pytest.raises(CalibrationError, match=message):
        split_holdout([torch.randn(total, 3)], holdout=holdout, validation=validation)


class _CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset that records which items were read (and how many at once are alive)."""

    def __init__(self, samples: torch.Tensor) -> None:
        self.samples, self.reads = samples, []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        self.reads.append(index)
        return self.samples[index], index % 3


def test_a_tensor_is_gathered_a_batch_at_a_time_and_writing_into_a_batch_never_changes_it():
    samples = torch.randn(50, 3)
    kept = samples.clone()
    split = split_holdout(as_batches(samples, batch_size=16), holdout=0.2, validation=0.2)
    for batch in [*split.calibrate, *split.validate, *split.holdout]:
        assert len(batch) <= 16 and batch.untyped_storage().data_ptr() != samples.untyped_storage().data_ptr()
        batch.sub_(100.0)  # what a model normalising its input in place does
    assert torch.equal(samples, kept)
    assert torch.equal(split.holdout[0], samples[split.holdout.indices[:16]])


def test_batches_of_an_iterable_spanning_two_items_are_joined():
    samples = torch.arange(10, dtype=torch.float32)[:, None]
    batches = as_batches(iter([samples[:3], samples[3:7], samples[7:]]), batch_size=4)
    assert [b.flatten().tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [b.flatten().tolist() for b in batches.part(2, 9)] == [[2, 3, 4, 5], [6, 7, 8]]


def test_a_dataset_is_read_a_batch_at_a_time_in_index_order():
    dataset = _CountingDataset(torch.randn(40, 2, 3))
    batches = as_batches(dataset, batch_size=8)
    assert dataset.reads == [0]  # only the first item, for the sample shape
    split = split_holdout(batches, holdout=0.25)
    dataset.reads.clear()
    first = split.holdout[0]
    held = split.holdout.indices
    assert dataset.reads == held[:8].tolist() and torch.equal(first, dataset.samples[held[:8]])  # only those items
    assert torch.equal(torch.cat(list(split.calibrate)), dataset.samples[split.calibrate.indices])


def test_a_plain_dataloader_is_read_through_its_dataset():
    dataset = _CountingDataset(torch.randn(20, 3))
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=True)
    batches = as_batches(loader, batch_size=8)
    assert batches.samples == 20 and torch.equal(torch.cat(list(batches)), dataset.samples)  # index order, no shuffle


def test_a_dataset_sample_with_nan_or_another_shape_is_refused_when_read():
    samples = torch.randn(12, 3)
    samples[9, 1] = float("nan")
    batches = as_batches(_CountingDataset(samples), batch_size=4)
    assert torch.equal(batches[0], samples[:4])
    with pytest.raises(CalibrationError, match=r"calibration samples 8..11 has 1 NaN/Inf"):
        batches[2]

    class Ragged(_CountingDataset):
        def __getitem__(self, index):
            return torch.zeros(3 if index < 5 else 4)

    with pytest.raises(CalibrationError, match=r"calibration sample 5 has shape \(4,\)"):
        list(as_batches(Ragged(samples), batch_size=4))

    class Mixed(_CountingDataset):
        def __getitem__(self, index):
            return torch.zeros(3, dtype=torch.float32 if index < 6 else torch.float64)

    with pytest.raises(CalibrationError, match=r"calibration sample 6 has shape \(3,\) and dtype torch.float64"):
        list(as_batches(Mixed(samples), batch_size=4))


def test_empty_data_is_refused():
    with pytest.raises(CalibrationError, match="empty"):
        as_batches(torch.zeros(0, 3))
    with pytest.raises(CalibrationError, match="empty"):
        as_batches(_CountingDataset(torch.zeros(0, 3)))


def test_a_loader_that_picks_its_samples_is_read_as_it_iterates():
    dataset = _CountingDataset(torch.randn(20, 3))
    subset = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=[3, 1, 7])
    assert torch.equal(torch.cat(list(as_batches(subset))), dataset.samples[[3, 1, 7]])
    dropping = torch.utils.data.DataLoader(dataset, batch_size=8, drop_last=True)
    assert as_batches(dropping).samples == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int16, torch.bool])
def test_repeated_samples_share_a_digest_and_unread_ones_are_read_when_asked(dtype):
    distinct = (10 * torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))).to(dtype)
    samples = torch.cat([distinct, distinct[:2]]) if dtype is not torch.bool else torch.cat([distinct, distinct])
    dataset = _CountingDataset(samples)
    split = split_holdout(as_batches(dataset, batch_size=3), holdout=0.25)
    dataset.reads.clear()
    digests = split.digests.of(split.calibrate)  # nothing read yet: every batch of the part is read now, once
    assert sorted(dataset.reads) == split.calibrate.indices.tolist() and bool((digests != 0).all())
    split.digests.of(split.calibrate)
    assert sorted(dataset.reads) == split.calibrate.indices.tolist()  # hashed once
    unique = {tuple(samples[i].flatten().float().tolist()) for i in split.calibrate.indices.tolist()}
    assert split.distinct_decide_samples() == len(unique)
