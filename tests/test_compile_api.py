"""egp_export.compile as a library call: inputs it accepts, inputs it refuses, and what it never touches."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

import egp_export
from egp_export.analysis.numerics import compare
from egp_export.analysis.trace import trace
from egp_export.errors import CalibrationError, TraceError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():
        net[1].bias.fill_(10.0)  # first ReLU always ON
    return net.eval()


def _data(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: list(torch.split(x, 7)),
        lambda x: [(b, torch.zeros(len(b))) for b in torch.split(x, 9)],
        lambda x: DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=8),
        lambda x: DataLoader(TensorDataset(x), batch_size=8, collate_fn=lambda items: torch.stack([i[0] for i in items])),
        lambda x: TensorDataset(x, torch.zeros(len(x))),
        lambda x: (b for b in torch.split(x, 5)),
    ],
    ids=["tensor", "list-of-tensors", "input-target-tuples", "dataloader", "dataloader-own-collate", "dataset",
         "generator"],
)
def test_every_calibration_form_compiles_to_the_same_function(make):
    model = _net()
    result = egp_export.compile(model, make(_data()))
    assert result.report["activations_linearized"] == 1
    fresh = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert compare(model(fresh), result.module(fresh)).max_rel <= 1e-5


def test_the_users_model_is_never_mutated_even_in_training_mode():
    model = _net().train()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="training mode"):
        egp_export.compile(model, _data())
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_model_pruned_in_memory_with_torch_prune_compiles_and_keeps_its_masks():
    model = _net()
    prune.l1_unstructured(model[3], "weight", amount=0.5)
    result = egp_export.compile(model, _data())
    assert hasattr(model[3], "weight_mask")  # the user's masks stay
    fresh = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert compare(model(fresh), result.module(fresh)).max_rel <= 1e-5


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.empty(0, 1, 6, 6), "empty"),
        (torch.full((8, 1, 6, 6), float("nan")), "NaN"),
        (torch.randn(8, 3, 6, 6), "rejects calibration samples"),
        ([torch.randn(4, 1, 6, 6), torch.randn(4, 1, 5, 5)], "share one shape"),
        ("data.npy", "not a path"),
    ],
    ids=["empty", "nan", "wrong-channels", "mixed-shapes", "path"],
)
def test_bad_calibration_is_a_calibration_error(data, message):
    with pytest.raises(CalibrationError, match=message):
        egp_export.compile(_net(), data)


def test_untraceable_model_names_where_tracing_failed():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Conv2d(1, 2, 1))
            self.inner.register_module("gate", _Gate())

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(TraceError, match="inner.gate"):
        trace(Branchy().eval(), automatic_leaves=False)
    # By default the untraceable submodule becomes a leaf (run as is) and the report names it.
    result = egp_export.compile(Branchy().eval(), _data())
    (leaf,) = result.report["trace"]["leaf_modules"]
    assert leaf["name"] == "inner.gate" and leaf["reason"].startswith("untraceable")


class _Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


def test_no_warnings_for_a_clean_eval_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        egp_export.compile(_net(), _data())


COMPILE_STAGES = ("prepare", "capture", "calibrate", "decide", "rewrite", "verify", "report")


def test_each_stage_is_announced_and_timed_in_order():
    from egp_export.compiler import StageEvent

    events: list[StageEvent] = []
    result = egp_export.compile(_net(), _data(), on_stage=events.append)
    assert [(e.stage, e.done) for e in events] == [
        (name, done) for name in COMPILE_STAGES for done in (False, True)
    ]
    done = {e.stage: e for e in events if e.done}
    # The report's timings are the events' seconds, one per stage, and nothing else.
    assert result.report["seconds"] == {e.stage: round(e.seconds, 3) for e in events if e.done}
    assert result.report["compile_seconds"] == round(sum(result.report["seconds"].values()), 3)
    assert done["calibrate"].facts == {"samples": result.report["calibration"]["decide_samples"], "sites": 2}
    assert done["verify"].facts["max_rel"] == result.report["verification"]["pytorch"]["max_rel"]
    assert done["rewrite"].facts["rewrites"] == len(result.report["rewrites"])
    assert all(e.seconds >= 0 for e in events) and all(e.seconds == 0 and not e.facts for e in events if not e.done)
