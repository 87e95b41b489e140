"""The prune loop through its API: exclusions, targets, rejection, EASIER, resume, outputs, defaults, the CLI."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.cli.prune import _training_options, build_parser
from egp_export.errors import CheckpointError, OutputError
from egp_export.io.checkpoint import apply_state_dict, load_state_dict
from egp_export.prune.api import DEFAULT_ENTROPY, load_pruned, prune
from egp_export.prune.training import METRICS_LOG, OptimConfig, build_optimizer, read_metrics
from egp_export.report.prune_plots import PLOTS
from tests.prune.subjects import FAST, DownsampleBlock, SharedAndFunctional, Tiny, data, tiny

# One intra-op thread and a seeded RNG per test (conftest): tiny models, loaded 2-core runners.
pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def _comparable(history: list[dict]) -> str:
    return json.dumps([{k: v for k, v in record.items() if k != "seconds"} for record in history])  # NaN == NaN here




def test_zero_entropy_layers_are_left_alone():
    model = tiny()
    with torch.no_grad():
        model.fc1.bias.fill_(100.0)  # relu3 always ON: zero entropy
    train, held = data(), data(32, 1)
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
    model = tiny()
    with torch.no_grad():
        model.conv2.weight.zero_()  # relu2 still varies through the residual: entropy > 0, nothing left to prune
    result = prune(model, data(), data(32, 1), iterations=1, **{**FAST, "epochs_per_iteration": 0})
    rows = {row["layer"]: row for row in result.history[1]["layers"]}
    assert rows["conv2"]["entropy"] > 0 and rows["conv2"]["excluded"] == "no weights left"
    assert rows["conv2"]["budget"] == 0


def test_prune_does_not_touch_the_input_model_and_returns_permanent_masks():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, data(), data(32, 1), iterations=2, **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(k.endswith("_mask") for k in result.model.state_dict())
    for name, mask in result.masks.items():
        assert torch.equal(result.model.get_submodule(name).weight != 0, mask)
    assert result.history[-1]["sparsity"] > result.history[1]["sparsity"] > 0


def test_target_sparsity_is_hit_exactly():
    result = prune(tiny(), data(), data(32, 1), iterations=5, target_sparsity=0.6, **{**FAST, "epochs_per_iteration": 0})
    assert result.stop_reason.startswith("target_sparsity")
    remaining = result.final["remaining_weights"]
    total = sum(row["size"] for row in result.history[0]["layers"])
    assert total - remaining == math.ceil(0.6 * total)


def test_accuracy_drop_rejects_then_recovers_then_stops():
    # rate 1 empties every eligible layer at once: accuracy falls; no fine-tuning can bring it back.
    result = prune(tiny(), data(), data(32, 1), iterations=5, rate=1.0, max_accuracy_drop=0.0,
                   **{**FAST, "epochs_per_iteration": 0})
    flags = [(record["accepted"], record["recovery"]) for record in result.history]
    assert flags[1:] == [(False, False), (False, True)]
    assert result.stop_reason.startswith("max_accuracy_drop")
    assert result.final["iteration"] == 0 and result.masks == {}  # the result is the last accepted model


def test_loss_increase_rejects_a_step_the_accuracy_bound_lets_through():
    # rate 1 empties every eligible layer at once: the eval loss jumps; max_accuracy_drop=1 accepts any accuracy.
    settings = {"iterations": 5, "rate": 1.0, "max_accuracy_drop": 1.0, **FAST, "epochs_per_iteration": 0}
    unguarded = prune(tiny(), data(), data(32, 1), **settings)
    assert unguarded.history[1]["accepted"] and unguarded.final["iteration"] > 0
    rise = unguarded.history[1]["eval_loss"] - unguarded.history[0]["eval_loss"]
    assert rise > 0.01
    guarded = prune(tiny(), data(), data(32, 1), max_loss_increase=0.01, **settings)
    flags = [(record["accepted"], record["recovery"]) for record in guarded.history]
    assert flags[1:] == [(False, False), (False, True)]
    assert guarded.stop_reason.startswith("max_loss_increase") and "the result is iteration 0" in guarded.stop_reason
    assert guarded.final["iteration"] == 0 and guarded.masks == {}
    # A bound above the rise lets the step through: the guard compares against the dense model's loss.
    loose = prune(tiny(), data(), data(32, 1), max_loss_increase=rise + 0.01, **{**settings, "iterations": 1})
    assert loose.history[1]["accepted"] and loose.final["iteration"] == 1


def test_eval_loss_is_the_mean_cross_entropy_on_the_eval_data():
    model, held = tiny(), data(32, 1)
    result = prune(model, data(), held, iterations=0, **FAST)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(held[0]), held[1]))
    assert result.history[0]["eval_loss"] == pytest.approx(expected, rel=1e-6)


def test_select_best_returns_the_lowest_loss_iteration_among_the_most_linear(tmp_path):
    # Without fine-tuning every pruning step raises the loss: after 2 steps no site is linear yet, so "best" is
    # the model as given, where "last" is iteration 2.
    settings = {"iterations": 2, **FAST, "epochs_per_iteration": 0}
    last = prune(tiny(), data(), data(32, 1), **settings)
    best = prune(tiny(), data(), data(32, 1), select="best", out_dir=tmp_path, **settings)
    assert _comparable(last.history) == _comparable(best.history)  # select chooses the result, not the run
    assert last.final["iteration"] == 2 and last.masks
    assert [record["linear_sites"] for record in best.history] == [0, 0, 0]
    assert best.history[0]["eval_loss"] < min(record["eval_loss"] for record in best.history[1:])
    assert best.final["iteration"] == best.result_iteration == 0 and best.masks == {}
    # The model and pruned.pt are that iteration's, not the last one's.
    assert all(torch.equal(v, best.model.state_dict()[k]) for k, v in tiny().state_dict().items())
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert saved["egp_prune"]["iteration"] == 0
    fresh = Tiny()
    apply_state_dict(fresh, load_state_dict(tmp_path / "pruned.pt"))
    assert all(torch.equal(v, best.model.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_select_best_prefers_more_linear_sites_to_a_lower_loss():
    # The third step makes relu3 linear at a higher loss than every earlier iteration: it is still the result.
    best = prune(tiny(), data(), data(32, 1), select="best", iterations=3, **{**FAST, "epochs_per_iteration": 0})
    assert [record["linear_sites"] for record in best.history] == [0, 0, 0, 1]
    assert best.final["iteration"] == 3
    assert best.final["eval_loss"] > max(record["eval_loss"] for record in best.history[:3])


def test_select_best_survives_resume(tmp_path):
    settings = {"select": "best", **FAST, "epochs_per_iteration": 0}
    whole = prune(tiny(), data(), data(32, 1), iterations=3, **settings)
    prune(tiny(), data(), data(32, 1), iterations=1, out_dir=tmp_path, **settings)
    resumed = prune(tiny(), data(), data(32, 1), iterations=3, out_dir=tmp_path, resume=True, **settings)
    assert resumed.final["iteration"] == whole.final["iteration"]
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    with pytest.raises(CheckpointError, match="select: 'best' then, 'last' now"):
        prune(tiny(), data(), data(32, 1), iterations=4, out_dir=tmp_path, resume=True, **{**settings, "select": "last"})


def test_new_options_are_checked():
    with pytest.raises(ValueError, match="select must be one of last, best"):
        prune(tiny(), data(), data(32, 1), select="first", iterations=0, progress=False)
    with pytest.raises(ValueError, match="max_loss_increase must be non-negative"):
        prune(tiny(), data(), data(32, 1), max_loss_increase=-0.1, iterations=0, progress=False)


def test_target_linear_sites_stops_and_nepenthe_runs():
    result = prune(tiny(), data(), data(32, 1), "nepenthe", iterations=8, target_linear_sites=1, **FAST)
    assert result.stop_reason.startswith("target_linear_sites")
    assert result.final["linear_sites"] >= 1


def test_easier_replaces_the_lowest_positive_entropy_site_each_iteration():
    model = tiny()
    with torch.no_grad():
        model.fc1.bias.fill_(100.0)  # relu3 has zero entropy: left to the compiler, never chosen
    result = prune(model, data(), data(32, 1), "easier", iterations=2, **{**FAST, "epochs_per_iteration": 0})
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
    train, held = data(), data(32, 1)
    from_tensors = prune(tiny(), train, held, iterations=1, **FAST)
    loader = torch.utils.data.DataLoader(Pairs(*train), batch_size=7, shuffle=True)
    from_loader = prune(tiny(), loader, Pairs(*held), iterations=1, **FAST)
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
    train, held = data(), data(32, 1)
    whole = prune(tiny(), train, held, iterations=3, out_dir=tmp_path / "whole", **FAST)
    prune(tiny(), train, held, iterations=1, out_dir=tmp_path / "split", **FAST)
    resumed = prune(tiny(), train, held, iterations=3, out_dir=tmp_path / "split", resume=True, **FAST)
    assert whole.masks.keys() == resumed.masks.keys()
    assert all(torch.equal(whole.masks[k], resumed.masks[k]) for k in whole.masks)
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in whole.model.state_dict().items())
    assert _comparable(whole.history) == _comparable(resumed.history)
    assert len(read_metrics(tmp_path / "split" / METRICS_LOG)) == 4


def test_resume_refuses_other_settings(tmp_path):
    prune(tiny(), data(), data(32, 1), iterations=1, out_dir=tmp_path, **FAST)
    with pytest.raises(CheckpointError, match="rate: 0.5 then, 0.25 now"):
        prune(tiny(), data(), data(32, 1), iterations=2, rate=0.25, out_dir=tmp_path, resume=True, **FAST)


def test_outputs_are_compile_ready_and_never_overwritten_silently(tmp_path):
    result = prune(tiny(), data(), data(32, 1), iterations=2, out_dir=tmp_path, **FAST)
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
        prune(tiny(), data(), data(32, 1), iterations=1, out_dir=tmp_path, **FAST)


def test_load_pruned_restores_easier_identity_sites(tmp_path):
    result = prune(tiny(), data(), data(32, 1), "easier", iterations=1, out_dir=tmp_path, **FAST)
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


# Following EGP's reference code by default ----------------------------------------------------------


def test_defaults_are_the_reference_recipe():
    defaults = {name: p.default for name, p in inspect.signature(prune).parameters.items()}
    assert defaults["method"] == "egp" and DEFAULT_ENTROPY["egp"] == "reference" and defaults["entropy"] is None
    assert defaults["prune_shortcuts"] is False
    assert (defaults["optimizer"], defaults["lr"], defaults["momentum"], defaults["weight_decay"]) == ("sgd", 0.1, 0.9, 1e-4)
    assert (defaults["scheduler"], defaults["batch_size"], defaults["rate"]) == ("multistep", 128, 0.5)
    # The result is the last accepted iteration and no loss bound applies, as in the reference's loop.
    assert (defaults["select"], defaults["max_loss_increase"], defaults["max_accuracy_drop"]) == ("last", None, None)
    assert defaults["distill_weight"] == 0.0  # fine-tuning is plain cross-entropy
    optimizer = build_optimizer(nn.Linear(2, 2).parameters(), OptimConfig(epochs=1))
    assert isinstance(optimizer, torch.optim.SGD)
    assert {key: optimizer.defaults[key] for key in ("lr", "momentum", "weight_decay")} == {
        "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
    }
    # The CLI passes only what the user gave, so each method (egp's above, sap/energy/itpruner theirs) keeps its recipe.
    args = build_parser().parse_args(["prune", "--arch", "a:b", "--data", "builtin:digits", "--out", "o"])
    assert (args.entropy, args.prune_shortcuts, args.method) == (None, False, "egp")
    assert _training_options(args) == {} and args.momentum is None and args.epochs_per_iteration is None


def test_entropy_definitions_are_checked():
    with pytest.raises(ValueError, match="entropy must be one of reference, pooled"):
        prune(tiny(), data(), data(32, 1), entropy="batch", iterations=0, progress=False)
    with pytest.raises(ValueError, match="NEPENTHE uses the pooled"):
        prune(tiny(), data(), data(32, 1), "nepenthe", entropy="reference", iterations=0, progress=False)


def test_shortcut_convs_are_never_pruned_nor_counted_unless_asked():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 6, 6)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = DownsampleBlock().eval()
    result = prune(model, (x, y), (x, y), iterations=1, epochs_per_iteration=0, progress=False)
    rows = {row["layer"]: row for row in result.history[1]["layers"]}
    assert list(rows) == ["conv1", "conv2"] and "downsample.0" not in result.masks
    assert torch.equal(result.model.downsample[0].weight, model.downsample[0].weight)
    eligible = sum(row["remaining"] for row in rows.values() if row["excluded"] is None)
    assert result.history[1]["pruned"] == math.floor(0.5 * eligible + 0.5)  # N counts conv1 and conv2 only
    assert result.history[0]["remaining_weights"] == model.conv1.weight.numel() + model.conv2.weight.numel()

    with_shortcuts = prune(model, (x, y), (x, y), prune_shortcuts=True, iterations=1, epochs_per_iteration=0,
                           progress=False)
    assert [row["layer"] for row in with_shortcuts.history[1]["layers"]] == ["conv1", "conv2", "downsample.0"]
    assert with_shortcuts.history[0]["remaining_weights"] == result.history[0]["remaining_weights"] + 4 * 2


def test_cli_passes_entropy_and_shortcut_flags(tmp_path):
    run = _cli("prune", *ARCH, "--data", "builtin:digits", "--out", str(tmp_path / "out"), "--iterations", "0",
               "--entropy", "pooled", "--prune-shortcuts", "--entropy-samples", "128", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    state = torch.load(tmp_path / "out" / "state.pt", weights_only=True)
    assert state["settings"]["entropy"] == "pooled" and state["settings"]["prune_shortcuts"] is True
    run = _cli("prune", *ARCH, "--data", "builtin:digits", "--out", str(tmp_path / "bad"), "--method", "easier",
               "--entropy", "reference", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("egp-export: error: --entropy reference is EGP's") and not (tmp_path / "bad").exists()
