"""The EGP demo at CI size: real training, EGP pruning, compile, ONNX Runtime checks and timing, in under a minute."""

from __future__ import annotations

import json

import pytest
import torch

from egp_export.demo.digits import DISTILL_WEIGHT, MAX_LOSS_INCREASE, _settings, digits_resnet, run_egp_demo
from egp_export.errors import OutputError
from egp_export.io.checkpoint import apply_state_dict, load_state_dict

REQUIRED = (
    "accuracy_dense", "accuracy_pruned", "accuracy_compiled", "sparsity", "activations_linearized",
    "depth_before", "depth_after", "latency_ratio",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("egp-demo")
    return out, run_egp_demo(out, quick=True, progress=False)


def test_summary_has_the_promised_keys_and_matches_the_file(demo):
    out, summary = demo
    assert all(key in summary for key in REQUIRED)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("model.onnx", "pruned.onnx", "dense.pt", "report.json", "report.md", "entropy.png", "depth.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "prune" / "pruned.pt").exists() and (out / "prune" / "metrics.jsonl").exists()


def test_compiled_is_exactly_as_accurate_and_shallower(demo):
    _, summary = demo
    assert summary["accuracy_compiled"] == summary["accuracy_pruned"]
    assert summary["compiled_predictions_match"]
    assert summary["accuracy_pruned"] == summary["accuracy_pruned_pytorch"]
    assert summary["activations_linearized"] >= 1
    assert summary["depth_after"] < summary["depth_before"]
    assert summary["macs_after"] < summary["macs_before"]
    assert summary["latency_ratio"] > 0  # timed; CI runners are too noisy to assert the speedup itself


def test_pruned_stays_within_a_few_points_of_dense(demo):
    _, summary = demo
    assert summary["accuracy_dense"] > 0.95
    assert summary["accuracy_dense"] - summary["accuracy_pruned"] <= 0.04
    assert 0.0 < summary["sparsity"] < 1.0


def test_pruned_checkpoint_loads_into_the_registered_architecture(demo):
    out, summary = demo
    model = digits_resnet()
    apply_state_dict(model, load_state_dict(out / "prune" / "pruned.pt"))
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert zeros > 0


def test_existing_outputs_are_refused_before_any_work(demo):
    out, _ = demo
    with pytest.raises(OutputError, match="already exists"):
        run_egp_demo(out, quick=True, progress=False)


def test_an_existing_pruning_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "prune").mkdir()
    (tmp_path / "prune" / "pruned.pt").write_bytes(b"an earlier run")
    with pytest.raises(OutputError, match="already exists"):
        run_egp_demo(tmp_path, quick=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune"]  # nothing trained, nothing written


def test_the_demo_prunes_with_distillation_and_the_full_size_with_the_loss_bound(demo):
    _, summary = demo
    assert summary["pruning"]["distill_weight"] == DISTILL_WEIGHT > 0
    full = _settings(quick=False)
    assert full["distill_weight"] == DISTILL_WEIGHT and full["max_loss_increase"] == MAX_LOSS_INCREASE > 0


@pytest.mark.slow
def test_the_full_demo_loses_no_accuracy(tmp_path):
    # Issue 17's bar on the default seed (165 s on 2 shared cores). The latency ratio is in the
    # README's measurements only: shared runners are too noisy to assert it.
    summary = run_egp_demo(tmp_path, progress=False)
    assert summary["accuracy_compiled"] == summary["accuracy_pruned"] and summary["compiled_predictions_match"]
    assert summary["accuracy_dense"] - summary["accuracy_compiled"] <= 0.01
    assert summary["activations_linearized"] >= 2
    assert summary["macs_after"] < summary["macs_before"]
