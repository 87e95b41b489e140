"""EGP / NEPENTHE / EASIER: the budget formula by hand, masks, site-to-layer mapping, the loop, resume, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from egp_export.analysis.activations import binary_entropy
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.errors import CheckpointError, OutputError
from egp_export.io.checkpoint import apply_state_dict, load_state_dict
from egp_export.prune.pruning import (
    allocate_budgets,
    egp_importance,
    load_pruned,
    make_permanent,
    masks_of,
    nepenthe_importance,
    prune,
    prune_smallest,
    replace_with_identity,
    site_layers,
    softmax_shares,
)
from egp_export.prune.training import METRICS_LOG, PLOTS, OptimConfig, as_dataset, read_metrics, train

# One intra-op thread and a seeded RNG per test (conftest): tiny models, loaded 2-core runners.
pytestmark = pytest.mark.usefixtures("tiny_model_runtime")

# Budget: hand-computed cases ----------------------------------------------------------------


def test_budget_splits_by_softmax_of_sum_over_importance():
    # S = 3, R = (3, 1.5), softmax_a = 1 / (1 + e^-1.5) = 0.8176 -> 40.88 of 50 -> 41 and 9.
    assert allocate_budgets({"a": 1.0, "b": 2.0}, {"a": 100, "b": 100}, 50) == {"a": 41, "b": 9}


def test_budget_caps_a_layer_and_gives_the_excess_to_the_others():
    # a wants 40.88 but has 10: it loses all 10, b takes the other 40.
    assert allocate_budgets({"a": 1.0, "b": 2.0}, {"a": 10, "b": 100}, 50) == {"a": 10, "b": 40}


def test_budget_redistributes_iteratively_until_nothing_is_capped():
    # S = 7, R = (7, 3.5, 1.75). Round 1: a wants 57.9 of 60 > 5 -> capped, 55 left.
    # Round 2 over (b, c): b wants 0.852 * 55 = 46.9 > 10 -> capped, 45 left. Round 3: c takes 45.
    assert allocate_budgets({"a": 1.0, "b": 2.0, "c": 4.0}, {"a": 5, "b": 10, "c": 100}, 60) == {"a": 5, "b": 10, "c": 45}


def test_budget_redistribution_keeps_the_sum_over_all_eligible_layers():
    # S = 4 over all three layers, R = (4, 4, 2). a is capped at 10; the 90 left split by softmax(4, 2):
    # b = 0.8808 * 90 = 79.27, c = 10.73 -> largest remainder gives c the last one: (79, 11).
    # (Recomputing S over b and c alone would give R = (3, 1.5) and b = 73.6.)
    assert allocate_budgets({"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 10, "b": 1000, "c": 1000}, 100) == {
        "a": 10, "b": 79, "c": 11,
    }


def test_budget_never_exceeds_what_is_left():
    assert allocate_budgets({"a": 1.0, "b": 3.0}, {"a": 7, "b": 5}, 1000) == {"a": 7, "b": 5}


def test_budget_ties_go_to_the_earlier_layer():
    assert allocate_budgets({"a": 1.0, "b": 1.0}, {"a": 10, "b": 10}, 5) == {"a": 3, "b": 2}


def test_zero_importance_is_infinite_ratio_and_takes_the_budget_first():
    assert allocate_budgets({"a": 0.0, "b": 1.0}, {"a": 10, "b": 10}, 5) == {"a": 5, "b": 0}
    assert allocate_budgets({"a": 0.0, "b": 1.0}, {"a": 10, "b": 10}, 15) == {"a": 10, "b": 5}
    assert allocate_budgets({"a": 0.0, "b": 0.0}, {"a": 10, "b": 10}, 6) == {"a": 3, "b": 3}


def test_huge_ratios_do_not_overflow():
    # I = 1e-300 makes R ~ 1e300: exp(R - max R) stays finite; the tiny layer takes everything it has.
    budgets = allocate_budgets({"a": 1e-300, "b": 1.0, "c": 2.0}, {"a": 4, "b": 100, "c": 100}, 50)
    assert budgets["a"] == 4 and sum(budgets.values()) == 50
    shares = softmax_shares(torch.tensor([1e300, 1.0, torch.inf], dtype=torch.float64))
    assert shares.tolist() == [0.0, 0.0, 1.0]
    assert softmax_shares(torch.tensor([1e308, 1e308, -1e308], dtype=torch.float64)).tolist() == [0.5, 0.5, 0.0]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(0, 500)), min_size=1, max_size=6),
    st.integers(0, 3000),
)
def test_budgets_add_up_and_respect_caps(layers, amount):
    importance = {f"l{i}": value for i, (value, _) in enumerate(layers)}
    remaining = {f"l{i}": left for i, (_, left) in enumerate(layers)}
    budgets = allocate_budgets(importance, remaining, amount)
    assert sum(budgets.values()) == min(amount, sum(remaining.values()))
    assert all(0 <= budgets[name] <= remaining[name] for name in budgets)


# Importance ------------------------------------------------------------------------------


def test_entropy_limits_are_zero_not_nan():
    assert binary_entropy(torch.tensor([0.0, 1.0, 0.5])).tolist() == [0.0, 0.0, 1.0]


def test_egp_importance_is_layer_entropy_times_mean_abs_nonzero_weight():
    weight = torch.tensor([[0.0, 2.0], [-4.0, 0.0]])
    entropy, importance = egp_importance([torch.tensor([1.0, 0.5])], weight)
    assert entropy == 0.75 and importance == pytest.approx(0.75 * 3.0)


def test_layer_feeding_two_sites_pools_their_neurons():
    weight = torch.ones(2, 3)
    entropy, _ = egp_importance([torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])], weight)
    assert entropy == pytest.approx(0.5)


def test_nepenthe_weights_each_neuron_entropy_by_its_own_weights():
    # Neuron 0: h = 1, mean |w| = 1; neuron 1: h = 0, mean |w| = 10 (constant, adds nothing); row 2 empty.
    weight = torch.tensor([[1.0, -1.0], [10.0, 0.0], [0.0, 0.0]])
    entropies = torch.tensor([1.0, 0.0, 0.5])
    entropy, importance = nepenthe_importance([entropies], weight)
    assert entropy == pytest.approx(0.5)
    assert importance == pytest.approx((1.0 * 1.0 + 0.0 * 10.0 + 0.5 * 0.0) / 3)
    # EGP on the same layer counts the constant neuron's large weights: a different ranking.
    assert egp_importance([entropies], weight)[1] == pytest.approx(0.5 * 4.0)


# Masks -------------------------------------------------------------------------------------


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


# Sites and their layers ----------------------------------------------------------------------


class SharedAndFunctional(nn.Module):
    """One nn.ReLU called at two sites, a functional relu, a method relu, a residual add, a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.drop = nn.Dropout(0.1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))  # site 1 of the shared module
        b = self.relu(self.drop(self.conv2(a)) + a)  # site 2: through a residual add (skip is not a layer)
        c = F.relu(self.conv3(b))  # functional
        d = torch.cat([c, b], dim=1).relu()  # method call after a concat: no layer
        return self.fc(d.mean((2, 3)))


def test_each_call_site_maps_to_the_layer_that_feeds_it():
    gm = trace(SharedAndFunctional().eval())
    sites = calibrate(gm, [torch.randn(8, 2, 5, 5)])
    mapping = site_layers(gm, sites)
    assert list(mapping.values()) == [("conv1",), ("conv2",), ("conv3",), ()]
    assert len(mapping) == 4  # the shared nn.ReLU is two sites


def test_replace_with_identity_rewrites_one_call_of_a_shared_module():
    model = SharedAndFunctional().eval()
    gm = trace(model)
    first = next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu")
    rewritten = replace_with_identity(model, [first])
    assert sum(1 for n in rewritten.graph.nodes if n.op == "call_module" and n.target == "relu") == 1
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        a = model.bn1(model.conv1(x))  # no relu at the first site now
        b = model.relu(model.conv2(a) + a)
        c = F.relu(model.conv3(b))
        expected = model.fc(torch.cat([c, b], 1).relu().mean((2, 3)))
        assert torch.allclose(rewritten(x), expected, atol=1e-6)
    assert isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule)  # the input is untouched
    with pytest.raises(ValueError, match="no activation call site"):
        replace_with_identity(model, ["nope"])


# The loop ------------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """conv-ReLU, a residual conv block, and a Linear-ReLU-Linear head on 1x6x6 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(8, 16)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x) + x)
        return self.fc2(self.relu3(self.fc1(x.mean((2, 3)))))


def _data(samples: int = 96, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 6, 6, generator=generator)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


def _tiny(seed: int = 0) -> Tiny:
    """A Tiny trained to well above chance (so that pruning everything visibly costs accuracy)."""
    torch.manual_seed(seed)
    model = Tiny()
    train(model, as_dataset(_data(256, 2), "tiny"), OptimConfig(epochs=15, optimizer="adam", lr=0.01, batch_size=32), seed=seed)
    return model.eval()


def _comparable(history: list[dict]) -> str:
    return json.dumps([{k: v for k, v in record.items() if k != "seconds"} for record in history])  # NaN == NaN here


FAST = {"epochs_per_iteration": 1, "batch_size": 32, "lr": 0.01, "progress": False}


def test_zero_entropy_layers_are_left_alone():
    model = _tiny()
    with torch.no_grad():
        model.fc1.bias.fill_(100.0)  # relu3 always ON: zero entropy
    train, held = _data(), _data(32, 1)
    result = prune(model, train, held, iterations=1, **{**FAST, "epochs_per_iteration": 0})
    step = result.history[1]
    rows = {row["layer"]: row for row in step["layers"]}
    assert rows["fc1"]["excluded"] == "zero entropy" and rows["fc1"]["budget"] == 0
    assert "fc1" not in result.masks
    assert torch.equal(result.model.fc1.weight, model.fc1.weight)
    assert step["pruned"] == math.floor(0.5 * sum(r["remaining"] for r in rows.values() if r["excluded"] is None) + 0.5)
    for name, row in rows.items():
        if row["budget"]:
            assert int((~result.masks[name]).sum()) == row["budget"]  # the masks hold exactly the budget


def test_fully_pruned_layers_are_excluded():
    model = _tiny()
    with torch.no_grad():
        model.conv2.weight.zero_()  # relu2 still varies through the residual: entropy > 0, nothing left to prune
    result = prune(model, _data(), _data(32, 1), iterations=1, **{**FAST, "epochs_per_iteration": 0})
    rows = {row["layer"]: row for row in result.history[1]["layers"]}
    assert rows["conv2"]["entropy"] > 0 and rows["conv2"]["excluded"] == "no weights left"
    assert rows["conv2"]["budget"] == 0


def test_prune_does_not_touch_the_input_model_and_returns_permanent_masks():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, _data(), _data(32, 1), iterations=2, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(k.endswith("_mask") for k in result.model.state_dict())
    for name, mask in result.masks.items():
        assert torch.equal(result.model.get_submodule(name).weight != 0, mask)
    assert result.history[-1]["sparsity"] > result.history[1]["sparsity"] > 0


def test_target_sparsity_is_hit_exactly():
    result = prune(_tiny(), _data(), _data(32, 1), iterations=5, target_sparsity=0.6, **{**FAST, "epochs_per_iteration": 0})
    assert result.stop_reason.startswith("target_sparsity")
    remaining = result.final["remaining_weights"]
    total = sum(row["size"] for row in result.history[0]["layers"])
    assert total - remaining == math.ceil(0.6 * total)


def test_accuracy_drop_rejects_then_recovers_then_stops():
    # rate 1 empties every eligible layer at once: accuracy falls; no fine-tuning can bring it back.
    result = prune(_tiny(), _data(), _data(32, 1), iterations=5, rate=1.0, max_accuracy_drop=0.0,
                   **{**FAST, "epochs_per_iteration": 0})
    flags = [(record["accepted"], record["recovery"]) for record in result.history]
    assert flags[1:] == [(False, False), (False, True)]
    assert result.stop_reason.startswith("max_accuracy_drop")
    assert result.final["iteration"] == 0 and result.masks == {}  # the result is the last accepted model


def test_target_linear_sites_stops_and_nepenthe_runs():
    result = prune(_tiny(), _data(), _data(32, 1), "nepenthe", iterations=8, target_linear_sites=1, **FAST)
    assert result.stop_reason.startswith("target_linear_sites")
    assert result.final["linear_sites"] >= 1


def test_easier_replaces_the_lowest_positive_entropy_site_each_iteration():
    model = _tiny()
    with torch.no_grad():
        model.fc1.bias.fill_(100.0)  # relu3 has zero entropy: left to the compiler, never chosen
    result = prune(model, _data(), _data(32, 1), "easier", iterations=2, **{**FAST, "epochs_per_iteration": 0})
    first, second = result.history[1], result.history[2]
    entropies = result.history[0]["entropies"]
    positive = {name: value for name, value in entropies.items() if value > 0}
    assert first["removed_site"] == min(positive, key=positive.get)
    assert second["removed_site"] != "relu3" and result.identity_sites == [first["removed_site"], second["removed_site"]]
    assert isinstance(result.model, fx.GraphModule) and result.masks == {}
    assert result.final["linear_sites"] >= 3  # two identities and the constant relu3


class Pairs(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset (the DataLoader path of the training loop)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


def test_datasets_and_dataloaders_give_the_same_run_as_tensors():
    train, held = _data(), _data(32, 1)
    from_tensors = prune(_tiny(), train, held, iterations=1, **FAST)
    loader = torch.utils.data.DataLoader(Pairs(*train), batch_size=7, shuffle=True)
    from_loader = prune(_tiny(), loader, Pairs(*held), iterations=1, **FAST)
    assert _comparable(from_tensors.history) == _comparable(from_loader.history)


def test_functional_shared_and_layerless_sites_in_the_loop():
    x = torch.randn(64, 2, 5, 5)
    result = prune(SharedAndFunctional().eval(), (x, (x.mean((1, 2, 3)) > 0).long()), (x[:16], torch.zeros(16).long()),
                   iterations=1, **{**FAST, "epochs_per_iteration": 0})
    assert len(result.history[1]["entropies"]) == 4  # the concat site is measured and logged ...
    assert [row["layer"] for row in result.history[1]["layers"]] == ["conv1", "conv2", "conv3"]  # ... but has no layer
    assert result.site_layers[list(result.site_layers)[-1]] == []


class Tokens(nn.Module):
    """Channels-last tokens [B, H, W, C] through a Linear-GELU-Linear MLP (Swin's layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head((x + self.fc2(self.act(self.fc1(x)))).mean((1, 2)))


def test_nepenthe_on_channels_last_tokens():
    x = torch.randn(48, 4, 4, 8)
    y = (x.mean((1, 2, 3)) > 0).long()
    result = prune(Tokens().eval(), (x, y), (x[:16], y[:16]), "nepenthe", iterations=1, **FAST)
    rows = {row["layer"]: row for row in result.history[1]["layers"]}
    assert list(rows) == ["fc1"] and rows["fc1"]["budget"] == 64  # half of fc1's 128 weights
    assert int((~result.masks["fc1"]).sum()) == 64


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    train, held = _data(), _data(32, 1)
    whole = prune(_tiny(), train, held, iterations=3, out_dir=tmp_path / "whole", **FAST)
    prune(_tiny(), train, held, iterations=1, out_dir=tmp_path / "split", **FAST)
    resumed = prune(_tiny(), train, held, iterations=3, out_dir=tmp_path / "split", resume=True, **FAST)
    assert whole.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(whole.masks[k], resumed.masks[k]) for k in whole.masks)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    assert _comparable(whole.history) == _comparable(resumed.history)
    assert len(read_metrics(tmp_path / "split" / METRICS_LOG)) == 4


def test_resume_refuses_other_settings(tmp_path):
    prune(_tiny(), _data(), _data(32, 1), iterations=1, out_dir=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match="rate: 0.5 then, 0.25 now"):
        prune(_tiny(), _data(), _data(32, 1), iterations=2, rate=0.25, out_dir=tmp_path, resume=True, **FAST)


def test_outputs_are_compile_ready_and_never_overwritten_silently(tmp_path):
    result = prune(_tiny(), _data(), _data(32, 1), iterations=2, out_dir=tmp_path, **FAST)
    checkpoint = tmp_path / "pruned.pt"
    raw = torch.load(checkpoint, weights_only=True)
    assert any(key.endswith("weight_orig") for key in raw["state_dict"])
    assert any(key.endswith("weight_mask") for key in raw["state_dict"])
    folded = load_state_dict(checkpoint)  # what `egp-export compile --checkpoint` does
    fresh = Tiny()
    apply_state_dict(fresh, folded)
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert len(read_metrics(tmp_path / METRICS_LOG)) == 3
    assert all((tmp_path / plot).stat().st_size > 0 for plot in PLOTS)
    assert sorted(p.name for p in (tmp_path / "iterations").iterdir()) == [f"iteration_0{i}.pt" for i in range(3)]
    with pytest.raises(OutputError):
        prune(_tiny(), _data(), _data(32, 1), iterations=1, out_dir=tmp_path, **FAST)


def test_load_pruned_restores_easier_identity_sites(tmp_path):
    result = prune(_tiny(), _data(), _data(32, 1), "easier", iterations=1, out_dir=tmp_path, **FAST)
    loaded = load_pruned(Tiny(), tmp_path / "pruned.pt")
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))


# The command line ----------------------------------------------------------------------------------

ARCH = ["--arch", "egp_export.demo.digits:digits_resnet", "--arch-kwargs", "width=8", "expansion=2", "stages=(1,)"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "egp_export.cli.prune", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_cli_prunes_digits_into_a_checkpoint_compile_reads(tmp_path):
    run = _cli("prune", *ARCH, "--data", "builtin:digits", "--out", str(tmp_path / "out"), "--iterations", "1",
               "--epochs-per-iteration", "1", "--batch-size", "64", "--lr", "0.01", "--entropy-samples", "256",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "EGP: 1 iteration(s)" in run.stdout
    compiled = subprocess.run(
        [sys.executable, "-m", "egp_export", "compile", *ARCH, "--checkpoint", str(tmp_path / "out" / "pruned.pt"),
         "--calibration", "builtin:digits", "--out", str(tmp_path / "compiled"), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads((tmp_path / "compiled" / "report.json").read_text())["before"]["depth"] > 0


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    run = _cli("prune", *ARCH, "--data", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith("egp-export: error: cannot read") and "Traceback" not in run.stderr
    torch.save({"inputs": torch.randn(10, 1, 8, 8)}, tmp_path / "unlabelled.pt")
    run = _cli("prune", *ARCH, "--data", str(tmp_path / "unlabelled.pt"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2 and "has no targets" in run.stderr and "Traceback" not in run.stderr
