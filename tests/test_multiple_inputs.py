"""Models of several inputs: positional tensors, keyword tensors (int64 token ids, a mask, a float input), and a
named dynamic sequence dimension. They compile, verify on fresh inputs and export to ONNX with named inputs,
verified in ONNX Runtime at two sequence lengths; calibration comes as one dict, a .npz or .pt dict, a Dataset of
dicts or a list of dicts (analysis/inputs.py, analysis/batches.py, export/onnx.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

import egp_export
from egp_export.analysis import inputs
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.errors import CalibrationError, ExportError
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.io.datasets import load_calibration

VOCABULARY, SEQUENCE, FEATURES = 50, 8, 6


class KeywordNet(nn.Module):
    """Token ids and a mask (int64) and a float input; fc1's bias keeps every ReLU neuron on: a linear site."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCABULARY, 16)
        self.proj = nn.Linear(FEATURES, 16)
        self.gate = nn.ReLU()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 5)
        with torch.no_grad():
            self.fc1.weight.mul_(0.1)
            self.fc1.bias.fill_(5.0)

    def forward(self, input_ids, attention_mask, features):
        tokens = self.embed(input_ids) * attention_mask.unsqueeze(-1) + self.proj(features).unsqueeze(1)
        return self.fc2(self.relu(self.fc1(self.gate(tokens))))


class InPlaceKeywordNet(KeywordNet):
    """Writes into two of its inputs: the caller's tensors must not change."""

    def forward(self, input_ids, attention_mask, features):
        features.mul_(2.0)
        attention_mask.clamp_(max=1)
        return super().forward(input_ids, attention_mask, features)


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 16), nn.Linear(3, 16)
        self.relu = nn.ReLU()
        self.out = nn.Linear(16, 2)
        with torch.no_grad():
            self.a.weight.mul_(0.1)
            self.b.weight.mul_(0.1)
            self.a.bias.fill_(3.0)

    def forward(self, x, y):
        return self.out(self.relu(self.a(x) + self.b(y)))


def tokens(samples: int, sequence: int = SEQUENCE, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, VOCABULARY, (samples, sequence), generator=generator),
        "attention_mask": (torch.rand(samples, sequence, generator=generator) > 0.2).long(),
        "features": torch.randn(samples, FEATURES, generator=generator),
    }


@pytest.fixture(scope="module")
def compiled():
    model = KeywordNet().eval()
    return model, egp_export.compile(model, tokens(300))


def test_keyword_inputs_compile_with_the_site_linearized_and_verify_on_fresh_inputs(compiled):
    model, result = compiled
    assert result.report["calibration"]["sample_shape"] == {"input_ids": [8], "attention_mask": [8], "features": [6]}
    linearized = [row["name"] for row in result.report["analysis"]["sites"] if row["linearized"]]
    assert linearized == ["relu"]
    placeholders = [node.target for node in result.module.graph.nodes if node.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask", "features"]
    with torch.no_grad():
        for sequence in (SEQUENCE, 12):  # fresh inputs, and a sequence length the compile never saw
            fresh = tokens(40, sequence, seed=sequence)
            torch.testing.assert_close(result.module(**fresh), model(**fresh), rtol=1e-5, atol=1e-5)
    search = result.report["guarantee"]["perturbation_search"]
    assert search["samples"] > 0 and search["unsearched_inputs"] == ["input_ids (int64)", "attention_mask (int64)"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_keyword_inputs_export_with_a_dynamic_sequence_verified_at_two_lengths(compiled, tmp_path, exporter):
    model, result = compiled
    fresh = tokens(24, seed=7)
    path = tmp_path / "model.onnx"
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    exported = export_onnx(result.module, inputs.take(fresh, slice(0, 1)), path, verify_inputs=fresh,
                           exporter=exporter, dynamic_dims=dims)
    assert exported.exporter == exporter and exported.input_names == ["input_ids", "attention_mask", "features"]
    assert exported.verified_dim_sizes == {"seq": [4, 8]}
    graph_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                    for i in onnx.load(path).graph.input}
    assert graph_inputs == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "features": ["batch", 6]}
    session = ort_session(path)
    for sequence in (5, 11):  # against the original model, at lengths the export never saw
        batch = tokens(3, sequence, seed=sequence)
        with torch.no_grad():
            expected = model(**batch)
        np.testing.assert_allclose(run_onnx(session, batch)[0], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_a_dimension_not_declared_dynamic_is_caught_at_the_second_length(compiled, tmp_path):
    """The guard: a named dimension must be dynamic in the file (TorchScript bakes a literal, dynamo refuses it)."""

    class FixedSequence(nn.Module):
        def forward(self, input_ids, attention_mask, features):
            return input_ids.float().reshape(input_ids.shape[0], SEQUENCE) + features[:, :1]

    batch = tokens(4)
    with pytest.raises(egp_export.errors.EgpExportError, match="seq=4"):
        export_onnx(FixedSequence().eval(), batch, tmp_path / "m.onnx", exporter="torchscript",
                    dynamic_dims={"input_ids": {1: "seq"}})
    for dims, message in [({"token_type_ids": {1: "seq"}}, "inputs are 'input_ids', 'attention_mask', 'features'"),
                          ({"input_ids": {0: "seq"}}, "axis 0 is the batch"),
                          ({"input_ids": {1: "seq"}, "features": {1: "seq"}}, "one name is one size")]:
        with pytest.raises(ExportError, match=message):
            export_onnx(compiled[1].module, batch, tmp_path / "m.onnx", dynamic_dims=dims)
    assert not any(tmp_path.iterdir())


def test_two_positional_inputs_compile_verify_and_export(tmp_path):
    model = TwoInputNet().eval()
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(600, 4, generator=generator), torch.randn(600, 3, generator=generator)
    labels = torch.zeros(600, dtype=torch.int64)
    for calibration in ((x, y), [(x[i : i + 50], y[i : i + 50], labels[i : i + 50]) for i in range(0, 600, 50)]):
        result = egp_export.compile(model, calibration, min_observations=100)
        assert result.report["activations_linearized"] == 1
        assert result.report["calibration"]["sample_shape"] == [[4], [3]]
    fresh = (torch.randn(30, 4), torch.randn(30, 3))
    with torch.no_grad():
        torch.testing.assert_close(result.module(*fresh), model(*fresh), rtol=1e-5, atol=1e-5)
    exported = export_onnx(result.module, inputs.take(fresh, slice(0, 1)), tmp_path / "m.onnx", verify_inputs=fresh,
                           exporter="torchscript")
    assert exported.input_names == ["x", "y"] and exported.verified_batch_sizes == [1, 30]


class _Dicts(Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {"labels": index % 3, **{key: value[index] for key, value in self.data.items()}}


class _Pairs(_Dicts):
    """(inputs, label) items whose inputs are Python lists, as a tokenizer without return_tensors gives them."""

    def __getitem__(self, index: int) -> tuple:
        item = super().__getitem__(index)
        return {key: value.tolist() for key, value in item.items() if key != "labels"}, item["labels"]


def test_calibration_as_files_datasets_and_lists_of_dicts_gives_the_same_batches(tmp_path):
    data = tokens(20)
    signature = inputs.signature(KeywordNet())
    np.savez(tmp_path / "tokens.npz", labels=np.zeros(20), **{key: value.numpy() for key, value in data.items()})
    torch.save({"labels": torch.zeros(20), **data}, tmp_path / "tokens.pt")
    notes: list[str] = []
    sources = [
        load_calibration(str(tmp_path / "tokens.npz"), signature=signature, notes=notes),
        load_calibration(str(tmp_path / "tokens.pt"), signature=signature),
        _Dicts(data),
        DataLoader(_Dicts(data), batch_size=6),
        _Pairs(data),
        iter([_Pairs(data)[i] for i in range(20)]),  # lists of numbers: one sample per item
        [inputs.take(data, slice(first, first + 7)) for first in range(0, 20, 7)],
        iter([{**inputs.take(data, slice(first, first + 5)), "labels": torch.zeros(5)} for first in range(0, 20, 5)]),
    ]
    for source in sources:
        batches = as_batches(source, batch_size=8, signature=signature)
        got = inputs.concat(list(batches))
        assert list(got) == ["input_ids", "attention_mask", "features"], type(source).__name__
        assert all(torch.equal(got[key], data[key]) for key in data), type(source).__name__
    assert "holds the model's keyword inputs input_ids, attention_mask, features (left out: labels" in notes[0]
    # Without the model's signature a file is read as one input, as before: the keys are ambiguous.
    with pytest.raises(CalibrationError, match="has the keys 'labels', 'input_ids'"):
        load_calibration(str(tmp_path / "tokens.npz"))


def test_keys_the_forward_does_not_take_are_refused_naming_them(tmp_path):
    model = KeywordNet().eval()
    extra = {**tokens(20), "token_type_ids": torch.zeros(20, SEQUENCE, dtype=torch.int64)}
    with pytest.raises(CalibrationError, match=r"has the keys 'input_ids', 'attention_mask', 'features', "
                       r"'token_type_ids' and the model's forward takes 'input_ids', 'attention_mask', 'features': "
                       r"'token_type_ids' names none of its inputs"):
        egp_export.compile(model, extra)
    missing = {key: value for key, value in tokens(20).items() if key != "features"}
    with pytest.raises(CalibrationError, match="'features' \\(no default\\) is missing"):
        egp_export.compile(model, [missing])
    np.savez(tmp_path / "extra.npz", **{key: value.numpy() for key, value in extra.items()})
    with pytest.raises(CalibrationError, match="extra.npz has the keys .*'token_type_ids' names none of its inputs"):
        load_calibration(str(tmp_path / "extra.npz"), signature=inputs.signature(model))


def test_inputs_of_one_batch_with_different_lengths_are_refused(tmp_path):
    data = tokens(20)
    data["features"] = data["features"][:19]
    with pytest.raises(CalibrationError, match=r"different lengths along dim 0 \(input_ids 20, attention_mask 20, "
                                               r"features 19\)"):
        egp_export.compile(KeywordNet().eval(), data)
    np.savez(tmp_path / "ragged.npz", **{key: value.numpy() for key, value in data.items()})
    with pytest.raises(CalibrationError, match="different lengths"):
        load_calibration(str(tmp_path / "ragged.npz"), signature=inputs.signature(KeywordNet()))


def test_duplicated_samples_and_the_seeded_split_work_on_keyword_batches():
    unique = tokens(40)
    repeated = inputs.concat([unique, inputs.take(unique, slice(0, 20))])  # 60 samples, 40 distinct
    signature = inputs.signature(KeywordNet())
    split = split_holdout(as_batches(repeated, batch_size=16, signature=signature), 0.2, 0.2, seed=3)
    plain = split_holdout(as_batches(torch.zeros(60, 1)), 0.2, 0.2, seed=3)  # the split depends on count and seed
    assert torch.equal(split.indices().holdout, plain.indices().holdout)
    held = inputs.concat(list(split.holdout))
    assert all(torch.equal(held[key], repeated[key][split.indices().holdout]) for key in repeated)
    decide = split.decide_samples
    expected = len({tuple(repeated["input_ids"][i].tolist()) for i in split.indices().decide.tolist()})
    assert split.distinct_decide_samples() == expected < decide
    # A sample differing in one input only is another sample.
    changed = inputs.clone(repeated)
    changed["features"][40:] += 1.0
    assert split_holdout(as_batches(changed, signature=signature), 0.2, seed=3).distinct_decide_samples() == 48


def test_the_callers_tensors_are_bit_identical_after_compiling_an_in_place_model():
    data = tokens(300)
    data["attention_mask"][:, 0] = 3  # clamp_ writes here
    before = inputs.clone(data)
    model = InPlaceKeywordNet().eval()
    result = egp_export.compile(model, data)
    assert all(torch.equal(data[key], before[key]) for key in data)
    fresh = tokens(10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(result.module(**inputs.clone(fresh)), model(**inputs.clone(fresh)))
