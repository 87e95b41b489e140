"""Keyword inputs on the command line: a tokenised .npz compiles, exports with named inputs and a --dynamic-dim
sequence verified at two lengths; a bad --dynamic-dim is one error line (exit 2). In-process through ``cli.main``."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from egp_export.cli import main as cli

MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TokenPair(nn.Module):
        # Token ids and an attention mask -> embedding -> Linear -> ReLU that never switches off -> Linear.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 8)
            self.relu = nn.ReLU()
            self.head = nn.Linear(8, 3)
            with torch.no_grad():
                self.fc.bias.fill_(50.0)

        def forward(self, input_ids, attention_mask):
            return self.head(self.relu(self.fc(self.embed(input_ids) * attention_mask.unsqueeze(-1))))
    """
)


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``egp-export ARGS`` in this process, with MODELS importable as keyword_models."""
    (tmp_path / "keyword_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def main(*args):
        code = cli.main([str(arg) for arg in args])
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err
        return code, captured.out, captured.err

    yield main
    sys.modules.pop("keyword_models", None)


@pytest.fixture
def tokens(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tokens.npz"
    np.savez(path, input_ids=rng.integers(0, 50, size=(120, 6)).astype(np.int32),
             attention_mask=(rng.random((120, 6)) > 0.2).astype(np.int64), labels=np.zeros(120))
    return path


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_tokenised_npz_compiles_and_exports_with_a_dynamic_sequence(run, tmp_path, tokens, frontend):
    """Through torch.export too: the sequence named by --dynamic-dim stays symbolic in the captured graph."""
    out = tmp_path / "out"
    code, stdout, err = run(
        "compile", "--arch", "keyword_models:TokenPair", "--calibration", tokens, "--min-observations", 100,
        "--exporter", "torchscript", "--dynamic-dim", "input_ids:1=seq", "--dynamic-dim", "attention_mask:1=seq",
        "--frontend", frontend, "--out", out,
    )
    assert code == 0, err
    assert "holds the model's keyword inputs input_ids, attention_mask (left out: labels" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["activations_linearized"] == 1
    assert report["calibration"]["sample_shape"] == {"input_ids": [6], "attention_mask": [6]}
    assert report["onnx"]["input_names"] == ["input_ids", "attention_mask"]
    assert report["onnx"]["dynamic_dims"] == {"input_ids": {"1": "seq"}, "attention_mask": {"1": "seq"}}
    assert report["onnx"]["verified_dim_sizes"] == {"seq": [3, 6]}
    assert report["trace"]["frontend"] == frontend


def test_a_malformed_dynamic_dim_is_refused_by_the_parser(run, tmp_path, tokens, capsys):
    with pytest.raises(SystemExit) as refused:
        cli.main(["compile", "--arch", "keyword_models:TokenPair", "--calibration", str(tokens), "--dynamic-dim",
                  "input_ids=seq", "--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    assert "--dynamic-dim: must be INPUT:AXIS=NAME, e.g. input_ids:1=seq" in capsys.readouterr().err


def test_a_dynamic_dim_naming_no_input_is_one_error_line(run, tmp_path, tokens):
    code, _, err = run("compile", "--arch", "keyword_models:TokenPair", "--calibration", tokens, "--min-observations",
                       100, "--exporter", "torchscript", "--dynamic-dim", "token_type_ids:1=seq", "--out", tmp_path / "out")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("egp-export: error: --dynamic-dim names the input 'token_type_ids', but the model's inputs "
                           "are 'input_ids', 'attention_mask'"), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_latency_of_a_model_with_a_dynamic_sequence_is_timed_on_held_out_tokens(run, tmp_path, tokens):
    """--measure-latency timed random inputs, which cannot size a dynamic sequence: it times a held-out sample."""
    out = tmp_path / "out"
    code, stdout, err = run(
        "compile", "--arch", "keyword_models:TokenPair", "--calibration", tokens, "--min-observations", 100,
        "--exporter", "torchscript", "--dynamic-dim", "input_ids:1=seq", "--dynamic-dim", "attention_mask:1=seq",
        "--measure-latency", "--out", out,
    )
    assert code == 0, err
    latency = json.loads((out / "report.json").read_text())["measured_latency"]
    assert latency["original_ms"] > 0 and latency["compiled_ms"] > 0
