"""numerics.compare: every output tensor on its own scale, every sample on its own (floored) scale."""

from __future__ import annotations

import math

import pytest
import torch

from egp_export.analysis.numerics import SAMPLE_SCALE_FLOOR, ErrorAccumulator, compare


def _boxes_and_scores(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    boxes = 1000 + 2000 * torch.rand(8, 4, generator=generator)
    scores = torch.rand(8, 3, generator=generator)
    return boxes, scores


def test_each_output_is_judged_on_its_own_scale():
    boxes, scores = _boxes_and_scores(torch.Generator().manual_seed(0))
    wrong_scores = scores.clone()
    wrong_scores[2, 1] += 3.5e-3  # 3.5e-3 relative to scores near 1; old code divided by the boxes' ~3000

    error = compare((boxes, scores), (boxes.clone(), wrong_scores))

    assert not error.within(1e-5)
    assert error.worst_output == "output[1]"
    assert error.max_rel == pytest.approx(3.5e-3 / scores.abs().max().item(), rel=1e-3)
    assert [output.output for output in error.outputs] == ["output[0]", "output[1]"]
    assert error.outputs[0].max_rel == 0.0
    assert "output[1]" in error.describe()


def test_dict_and_nested_leaves_are_named_by_their_path():
    boxes, scores = _boxes_and_scores(torch.Generator().manual_seed(1))
    reference = [{"boxes": boxes, "scores": scores}, boxes[:, :1]]
    candidate = [{"boxes": boxes.clone(), "scores": scores + 1e-3}, boxes[:, :1].clone()]

    error = compare(reference, candidate)

    assert [o.output for o in error.outputs] == ["output[0]['boxes']", "output[0]['scores']", "output[1]"]
    assert error.worst_output == "output[0]['scores']" and not error.within(1e-5)


def test_a_few_large_samples_do_not_hide_an_error_on_a_typical_one():
    reference = torch.ones(20, 5)
    reference[0] = 100.0  # one sample 100x the others
    candidate = reference.clone()
    candidate[3, 2] += 5e-4  # 5e-4 on a sample of scale 1: 5e-6 of the output's scale, which old code passed

    error = compare(reference, candidate)

    assert error.max_rel == pytest.approx(5e-6, rel=1e-3)  # fp32 rounding of 1 + 5e-4
    # Judged against max(1, 0.1 x 100) = 10: 5e-5.
    assert error.max_sample_rel == pytest.approx(5e-4 / (SAMPLE_SCALE_FLOOR * 100.0), rel=1e-3)
    assert not error.within(1e-5) and error.within(1e-4)
    assert "per-sample" in error.describe()


def test_near_zero_samples_are_judged_against_the_floor_not_their_own_scale():
    reference = torch.ones(4, 3)
    reference[1] = 1e-9  # a near-zero sample: an fp32 rounding of 1e-7 must not read as a relative error of 100
    candidate = reference.clone()
    candidate[1, 0] += 1e-7

    error = compare(reference, candidate)

    assert error.max_sample_rel == pytest.approx(1e-7 / SAMPLE_SCALE_FLOOR, rel=1e-3)
    assert error.within(1e-5)


def test_an_all_zero_output_fails_on_any_difference():
    reference = (torch.zeros(4, 3), torch.ones(4, 2))
    candidate = (torch.full((4, 3), 1e-12), torch.ones(4, 2))

    error = compare(reference, candidate)

    assert error.worst_output == "output[0]" and math.isinf(error.max_rel) and not error.within(1e30)
    assert compare(reference, (torch.zeros(4, 3), torch.ones(4, 2))).within(0.0)


def test_several_outputs_over_batches_equal_the_whole():
    generator = torch.Generator().manual_seed(2)
    big = torch.randn(23, 4, generator=generator) * torch.linspace(1.0, 50.0, 23)[:, None]
    small = torch.randn(23, 2, 3, generator=generator)
    constant = torch.randn(5, generator=generator)  # not batched: judged per output only
    noisy = (big + 1e-4 * torch.randn(23, 4, generator=generator), small + 1e-5 * torch.randn(23, 2, 3, generator=generator))
    errors = ErrorAccumulator()
    for start in range(0, 23, 7):
        part = slice(start, start + 7)
        errors.add({"big": big[part], "small": small[part], "fixed": constant},
                   [noisy[0][part], constant, noisy[1][part]])  # a candidate as a flat list: sorted keys' order

    whole = compare({"big": big, "small": small, "fixed": constant}, [noisy[0], constant, noisy[1]])

    assert errors.result() == whole
    assert errors.samples == 23 and whole.worst_output in ("output['big']", "output['small']")


def test_the_candidate_must_have_the_references_outputs():
    with pytest.raises(ValueError, match="output count differs"):
        compare((torch.ones(2, 2), torch.ones(2, 1)), (torch.ones(2, 2),))
    with pytest.raises(ValueError, match=r"shape differs at output\[1\]"):
        compare((torch.ones(2, 2), torch.ones(2, 1)), (torch.ones(2, 2), torch.ones(2, 3)))


# Task-level agreement: top-1 / top-5 per class-score output, cosine per output ------------------------------------


def test_top1_and_top5_agreement_count_the_changed_predictions():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 10, generator=generator)
    candidate = logits.clone()
    # Samples 0..3: the reference's winner demoted below the candidate's top 5; samples 4..5: swapped with the second.
    for sample in range(4):
        candidate[sample, logits[sample].argmax()] = -100.0
    for sample in (4, 5):
        first, second = logits[sample].topk(2).indices.tolist()
        candidate[sample, first], candidate[sample, second] = logits[sample, second], logits[sample, first]

    error = compare(logits, candidate)

    assert error.top1_agreement == pytest.approx(34 / 40) and error.top5_agreement == pytest.approx(36 / 40)
    assert error.outputs[0].predictions == 40 and error.samples == 40
    assert error.agreement("held-out").startswith("top-1 agreement 85.00% on 40 held-out samples, top-5 90.00%")
    fields = error.to_dict()
    assert fields["top1_agreement"] == pytest.approx(0.85) and fields["outputs"][0]["cosine_min"] < 1.0


def test_agreement_only_where_the_last_dimension_holds_class_scores():
    generator = torch.Generator().manual_seed(4)
    scores, features, ids = torch.randn(6, 3, generator=generator), torch.randn(6, 4, 5, 5, generator=generator), torch.arange(6)
    tokens = torch.randn(6, 7, 12, generator=generator)  # [B, T, C]: one prediction per token

    error = compare((scores, features, ids, tokens), (scores, features, ids, tokens))

    by_name = {output.output: output for output in error.outputs}
    assert by_name["output[0]"].top1_agreement == 1.0 and by_name["output[0]"].top5_agreement is None  # 3 classes
    assert by_name["output[1]"].top1_agreement is None and by_name["output[2]"].top1_agreement is None
    assert by_name["output[3]"].predictions == 42 and by_name["output[3]"].top5_agreement == 1.0
    assert all(output.cosine_min == pytest.approx(1.0) for output in error.outputs)


def test_cosine_is_per_sample_and_zero_outputs_are_handled():
    reference = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    candidate = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [2.0, 2.0]])

    output = compare(reference, candidate).outputs[0]

    # Orthogonal: 0; both zero: 1; only one zero: 0; the same direction: 1.
    assert output.cosine_min == 0.0 and output.cosine_mean == pytest.approx(0.5)
    assert output.top1_agreement == pytest.approx(0.75)  # sample 0 changed class; zeros tie on class 0 in both


def test_agreement_over_batches_equals_the_whole():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(23, 8, generator=generator)
    noisy = logits + 0.5 * torch.randn(23, 8, generator=generator)
    errors = ErrorAccumulator()
    for start in range(0, 23, 7):
        errors.add(logits[start : start + 7], noisy[start : start + 7])

    assert errors.result() == compare(logits, noisy)
    assert errors.result().top1_agreement < 1.0


class _TwoRanks:
    """all_reduce over two ranks holding the two halves of the samples, simulated: sum and max with the other
    rank's (already reduced) contribution."""

    def __init__(self, other: ErrorAccumulator, offset: int) -> None:
        self.other, self.offset = other, offset

    def sum(self, values):
        return values + self._other_like(values, "sum")

    def max(self, values):
        return torch.maximum(values, self._other_like(values, "max"))

    def _other_like(self, values, op):
        other = self.other
        outputs = len(other.names)
        if values.dtype == torch.int64 and values.numel() == 2:
            return torch.tensor([other.mismatches, other.samples])
        if values.shape == other.agreement.shape:
            return torch.from_numpy(other.agreement.copy())
        if values.shape == (2 * outputs + 1,):
            return torch.tensor([*other.max_abs, *other.scale, -math.inf], dtype=torch.float64)
        if values.shape == other.classes.shape:
            return torch.from_numpy(other.classes.copy())
        rows = torch.zeros_like(values)
        mine = torch.from_numpy(other.sample_errors[0])
        rows[self.offset : self.offset + len(mine)] = mine
        return rows


def test_agreement_and_cosine_survive_the_all_reduce_over_ranks():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(10, 6, generator=generator)
    noisy = logits + 0.7 * torch.randn(10, 6, generator=generator)
    first, second = ErrorAccumulator(), ErrorAccumulator()
    first.add(logits[:4], noisy[:4])
    second.add(logits[4:], noisy[4:])

    first.all_reduce(_TwoRanks(second, offset=4), offset=0)

    assert first.result() == compare(logits, noisy)
