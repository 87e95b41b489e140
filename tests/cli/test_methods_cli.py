"""The seeds' other methods through the command line: analyze --measure, prune --method energy, and a compile
that rebuilds the pruned architecture from the checkpoint alone."""

from __future__ import annotations

import json

import pytest
import torch

from egp_export.cli.main import main
from egp_export.errors import CheckpointError
from egp_export.io.checkpoint import PRUNE_METADATA_KEY, read_checkpoint

ARCH = ["--arch", "egp_export.demo.digits:digits_resnet", "--arch-kwargs", "width=8", "expansion=2", "stages=(2,)"]


def test_analyze_measures_pqi_energy_and_nhsic(tmp_path):
    out = tmp_path / "analysis"
    code = main(
        ["analyze", *ARCH, "--calibration", "builtin:digits", "--calibration-limit", "256",
         "--measure", "entropy", "pqi", "energy", "nhsic", "--out", str(out), "--quiet"]
    )

    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["measures"]) == {"pqi", "energy", "nhsic"}
    assert {row["name"] for row in report["measures"]["energy"]} == {"block1_1", "block1_2"}
    assert all(row["value"] >= 0 for row in report["measures"]["energy"])
    assert "## Layer measure: energy" in (out / "report.md").read_text()


def test_energy_needs_labels_unless_the_data_has_them(tmp_path, capsys):
    calibration = tmp_path / "x.pt"
    torch.save(torch.rand(64, 1, 8, 8), calibration)
    code = main(["analyze", *ARCH, "--calibration", str(calibration), "--measure", "energy", "--out", str(tmp_path / "o")])

    assert code == 2
    assert "--labels-from" in capsys.readouterr().err


def test_energy_pruning_removes_units_and_compile_rebuilds_the_shallower_network(tmp_path):
    pruned = tmp_path / "pruned"
    code = main(
        ["prune", *ARCH, "--data", "builtin:digits", "--method", "energy", "--stages", "1", "--epochs-per-iteration", "1",
         "--out", str(pruned), "--quiet"]
    )
    assert code == 0
    checkpoint = read_checkpoint(pruned / "pruned.pt")
    removed = checkpoint.arch_kwargs["removed_blocks"]
    assert len(removed) >= 1

    compiled = tmp_path / "compiled"
    # No --arch-kwargs for the removed units: the checkpoint says which architecture it holds.
    code = main(
        ["compile", *ARCH, "--checkpoint", str(pruned / "pruned.pt"), "--calibration", "builtin:digits",
         "--calibration-limit", "300", "--out", str(compiled), "--quiet", "--exporter", "torchscript"]
    )
    assert code == 0
    report = json.loads((compiled / "report.json").read_text())
    dense_layers = 1 + 2 * 2 + 1  # stem, two convs per unit, classifier
    assert report["before"]["layers"] == dense_layers - 2 * len(removed)


def test_a_damaged_arch_kwargs_entry_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": {}, PRUNE_METADATA_KEY: {"arch_kwargs": ["not", "a", "dict"]}}, path)
    with pytest.raises(CheckpointError, match="arch_kwargs"):
        read_checkpoint(path)


def test_leaf_module_hides_a_block_from_the_analysis_and_the_compile(tmp_path):
    common = [*ARCH, "--calibration", "builtin:digits", "--calibration-limit", "300", "--quiet"]
    assert main(["analyze", *common, "--out", str(tmp_path / "all")]) == 0
    assert main(["analyze", *common, "--leaf-module", "block1_1", "--out", str(tmp_path / "leaf")]) == 0
    sites = {
        name: {site["name"] for site in json.loads((tmp_path / name / "report.json").read_text())["analysis"]["sites"]}
        for name in ("all", "leaf")
    }
    assert sites["leaf"] < sites["all"] and not any(name.startswith("block1_1") for name in sites["leaf"])

    assert main(["compile", *common, "--leaf-module", "block1_1", "--exporter", "torchscript",
                 "--out", str(tmp_path / "compiled")]) == 0
    report = json.loads((tmp_path / "compiled" / "report.json").read_text())
    assert [leaf["name"] for leaf in report["trace"]["leaf_modules"]] == ["block1_1"]


@pytest.mark.parametrize(
    ("method", "option", "value", "users"),
    [
        ("sap", "--beta", "2", "itpruner"),
        ("egp", "--stages", "3", "energy"),
        ("energy", "--iterations", "3", "egp, nepenthe, easier, sap"),
        ("itpruner", "--rate", "0.25", "egp, nepenthe, easier"),
        ("nepenthe", "--rewind", "pre_prune", "sap"),
        ("sap", "--resume", None, "egp, nepenthe, easier"),
        ("sap", "--distill-weight", "0.5", "egp, nepenthe, easier"),
        ("energy", "--select", "best", "egp, nepenthe, easier"),
        ("itpruner", "--max-loss-increase", "0.05", "egp, nepenthe, easier"),
    ],
)
def test_an_option_the_method_does_not_use_is_refused_not_ignored(tmp_path, capsys, method, option, value, users):
    """Regression: every method-specific prune option was accepted with every method and silently ignored."""
    out = tmp_path / "out"
    code = main(["prune", *ARCH, "--data", "builtin:digits", "--method", method, option, *([value] if value else []),
                 "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"egp-export: error: --method {method} does not use {option} ({users})"), err
    assert not out.exists()


@pytest.mark.parametrize(("arch", "measure"), [
    ("torchvision:mobilenet_v2", "nhsic"),  # one MobileNetV2 row: its analysis takes seconds
    *(("tests.measures.subjects:plain_cnn", measure) for measure in ("nhsic", "energy", "dcor")),
])
def test_a_unit_measure_on_a_model_without_residual_units_is_one_error_line(tmp_path, capsys, measure, arch):
    # MobileNetV2's InvertedResidual is a residual unit of no registered type; the plain CNN has none at all.
    calibration, labelled = tmp_path / "x.pt", tmp_path / "labelled.pt"
    torch.save(torch.rand(8, 3, 32, 32), calibration)
    torch.save({"inputs": torch.rand(16, 3, 32, 32), "targets": torch.arange(16) % 2}, labelled)
    code = main(["analyze", "--arch", arch, "--calibration", str(calibration), "--labels-from", str(labelled),
                 "--measure", measure, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"egp-export: error: the {measure} measure scores residual units" in err
    assert "the measures that work on any model are entropy (analyze's default) and pqi" in err
    assert not (tmp_path / "o").exists()


def test_the_demo_recipe_options_reach_prune(tmp_path, monkeypatch):
    """--distill-weight/--distill-temperature/--max-loss-increase/--select reach prune() (they were Python-only)."""
    import egp_export.prune.api as api

    seen = {}

    def fake_prune(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)  # stop before any training: only the options are under test

    monkeypatch.setattr(api, "prune", fake_prune)
    with pytest.raises(SystemExit):
        main(["prune", *ARCH, "--data", "builtin:digits", "--method", "egp", "--distill-weight", "0.5",
              "--distill-temperature", "2", "--max-loss-increase", "0.05", "--select", "best",
              "--out", str(tmp_path / "out")])  # fmt: skip
    assert (seen["distill_weight"], seen["distill_temperature"]) == (0.5, 2.0)
    assert (seen["max_loss_increase"], seen["select"]) == (0.05, "best")
