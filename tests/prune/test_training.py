"""The entropy samples' batches: every rank holds its share of every batch, together exactly one process's batches."""

from __future__ import annotations

import pytest
import torch

from egp_export.distributed import Runtime
from egp_export.errors import CalibrationError
from egp_export.prune.training import as_dataset, input_batches


class Rank(Runtime):
    """One rank of a pretend two-process job (only sharding is exercised)."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank


def test_ranks_share_every_batch_and_together_hold_the_single_process_batches():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    dataset = as_dataset((x, torch.zeros(10).long()), "x")
    single = input_batches(dataset, 9, batch_size=4)
    assert [batch.flatten().tolist() for batch in single] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    shares = [input_batches(dataset, 9, runtime=Rank(rank), batch_size=4) for rank in (0, 1)]
    assert [len(share) for share in shares] == [3, 3]  # one entry per batch on every rank, even when empty
    for index, batch in enumerate(single):
        together = torch.cat([shares[0][index], shares[1][index]]).flatten().sort().values
        assert together.tolist() == batch.flatten().tolist()
    assert shares[1][2].shape == (0, 1)  # the short last batch leaves rank 1 an empty share of the right shape


def test_too_few_samples_for_the_processes_are_refused():
    dataset = as_dataset((torch.randn(1, 3), torch.zeros(1).long()), "x")
    with pytest.raises(CalibrationError, match="1 sample\\(s\\) in batches of 128 .* cannot be shared by 2 processes"):
        input_batches(dataset, None, runtime=Rank(0), batch_size=128)
