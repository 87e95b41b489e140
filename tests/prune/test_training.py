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


# Distillation ---------------------------------------------------------------------------------------


def _kl_to(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.kl_div(
            torch.log_softmax(student(x), 1), torch.log_softmax(teacher(x), 1), log_target=True, reduction="batchmean"
        ))


def test_training_loss_is_cross_entropy_without_a_teacher_and_hintons_loss_with_one():
    from egp_export.prune.training import OptimConfig, training_loss

    outputs, teacher, targets = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    plain = torch.nn.functional.cross_entropy(outputs, targets)
    config = OptimConfig(epochs=1, distill_weight=0.25, distill_temperature=2.0)
    assert torch.equal(training_loss(outputs, targets, None, config), plain)
    assert torch.equal(training_loss(outputs, targets, teacher, OptimConfig(epochs=1)), plain)  # weight 0: off
    soft = (torch.softmax(teacher / 2, 1) * (torch.log_softmax(teacher / 2, 1) - torch.log_softmax(outputs / 2, 1))).sum(1)
    expected = 0.75 * plain + 0.25 * 4.0 * soft.mean()
    assert float(training_loss(outputs, targets, teacher, config)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.usefixtures("tiny_model_runtime")
def test_distillation_pulls_the_student_towards_the_teacher():
    from egp_export.prune.training import OptimConfig, train
    from tests.prune.subjects import Tiny, data, tiny

    teacher = tiny()
    x, y = data(128, 3)
    shuffled = y[torch.randperm(len(y))]  # labels that disagree with the teacher
    divergence, agreement = {}, {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        student = Tiny()
        config = OptimConfig(epochs=10, optimizer="adam", lr=0.01, batch_size=32, distill_weight=weight,
                             distill_temperature=1.0)
        train(student, as_dataset((x, shuffled), "shuffled"), config, seed=0, teacher=teacher)
        divergence[weight] = _kl_to(student, teacher, x)
        with torch.no_grad():
            agreement[weight] = float((student(x).argmax(1) == teacher(x).argmax(1)).to(torch.float64).mean())
    # Measured: KL 0.09 vs 0.39, top-1 agreement 0.95 vs 0.55.
    assert divergence[1.0] < 0.5 * divergence[0.0]
    assert agreement[1.0] > 0.9 > 0.7 > agreement[0.0]


def test_distillation_settings_are_checked():
    from egp_export.prune.training import OptimConfig

    with pytest.raises(ValueError, match="distill_weight must be in"):
        OptimConfig(epochs=1, distill_weight=1.5)
    with pytest.raises(ValueError, match="distill_temperature must be positive"):
        OptimConfig(epochs=1, distill_temperature=0.0)
