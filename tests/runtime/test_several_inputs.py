"""The runtime on models of several named inputs: a keyword model (int64 token ids indexing an embedding, an
attention mask that feeds no Gather, a float input; a dynamic ``seq`` axis) and a two-input float model, compiled
and exported as tests/test_multiple_inputs.py does. Every backend call takes a feed (input name -> array); the
numeric check runs per output on a user's dict of arrays or on random inputs drawn per input; ``seq`` is sized by
the data or by ``dims``, and refused, named, without either (runtime/inputs.py)."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import egp_export
from egp_export.analysis import inputs
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.runtime.backends import BackendError, get_backend
from egp_export.runtime.engines import build_engine
from egp_export.runtime.gate import check_numerics, gate
from egp_export.runtime.inputs import onnx_inputs
from egp_export.runtime.profiler import compare, profile
from egp_export.runtime.tensorrt import RUNTIMES, build_serialized_engine
from tests.test_multiple_inputs import FEATURES, VOCABULARY, TwoInputNet, tokens

FAST_KW = {"rounds": 2, "iterations": 2, "warmup": 1}
SEQ_DIMS = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}


class KeywordNet(nn.Module):
    """Token ids and a mask (int64) and a float input; fc1's bias keeps every ReLU neuron on: a linear site."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCABULARY, 16)
        self.proj = nn.Linear(FEATURES, 16)
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 5)
        with torch.no_grad():
            self.fc1.weight.mul_(0.1)
            self.fc1.bias.fill_(5.0)

    def forward(self, input_ids, attention_mask, features):
        tokens = self.embed(input_ids) * attention_mask.unsqueeze(-1) + self.proj(features).unsqueeze(1)
        return self.fc2(self.relu(self.fc1(tokens))).mean(1), tokens.sum(-1)  # two outputs, each checked


@pytest.fixture(scope="module")
def keyword(tmp_path_factory):
    """original.onnx, compiled.onnx and wrong.onnx (fc2 perturbed) of KeywordNet with a dynamic seq; held-out .npz."""
    folder = tmp_path_factory.mktemp("keyword")
    model = KeywordNet().eval()
    result = egp_export.compile(model, tokens(300), min_observations=100)
    assert result.report["activations_linearized"] >= 1
    wrong = KeywordNet().eval()
    with torch.no_grad():
        wrong.fc2.bias.add_(0.5)
    example = inputs.take(tokens(2, seed=9), slice(0, 2))
    paths = {
        name: export_onnx(module, example, folder / f"{name}.onnx", exporter="torchscript", dynamic_dims=SEQ_DIMS).path
        for name, module in (("original", model), ("compiled", result.module), ("wrong", wrong))
    }
    held_out = {name: value.numpy() for name, value in tokens(40, sequence=10, seed=3).items()}  # fresh, seq 10
    np.savez(folder / "held_out.npz", **held_out)
    paths["held_out"] = folder / "held_out.npz"
    return paths, held_out


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two")
    model = TwoInputNet().eval()
    generator = torch.Generator().manual_seed(1)
    calibration = (torch.randn(600, 4, generator=generator), torch.randn(600, 3, generator=generator))
    result = egp_export.compile(model, calibration, min_observations=100)
    assert result.report["activations_linearized"] == 1
    example = (calibration[0][:2], calibration[1][:2])
    paths = {name: export_onnx(module, example, folder / f"{name}.onnx", exporter="torchscript").path
             for name, module in (("original", model), ("compiled", result.module))}  # fmt: skip
    fresh = {"x": torch.randn(30, 4, generator=generator).numpy(), "y": torch.randn(30, 3, generator=generator).numpy()}
    return paths, fresh


def test_every_input_is_read_from_the_file_with_its_embedding_rows_and_its_named_dimension(keyword):
    paths, _ = keyword
    with pytest.raises(BackendError, match=r"the input 'input_ids' has the dynamic dimension 'seq' .*--dim seq=SIZE"):
        onnx_inputs(paths["original"])
    model_inputs = onnx_inputs(paths["original"], dims={"seq": 12})
    assert model_inputs.names == ["input_ids", "attention_mask", "features"]
    assert [spec.sample_shape for spec in model_inputs.specs] == [(12,), (12,), (FEATURES,)]
    assert [spec.id_range for spec in model_inputs.specs] == [(0, VOCABULARY), None, None]
    feed = model_inputs.random_batch(64, seed=1)
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < VOCABULARY and len(np.unique(feed["input_ids"])) > 2
    assert set(np.unique(feed["attention_mask"])) == {0, 1}  # a mask: feeds no Gather
    assert feed["features"].dtype == np.float32 and feed["features"].std() > 0.5
    assert "input_ids: integers in [0, 50), the embedding table's rows; attention_mask: integers in [0, 2)" in (
        model_inputs.describe_random())
    with pytest.raises(BackendError, match=r"no dynamic dimension named 'sequence' .*its named dimensions: 'seq'"):
        onnx_inputs(paths["original"], dims={"sequence": 12})


def test_the_cpu_backend_runs_a_feed_as_onnx_runtime_does(keyword):
    paths, held_out = keyword
    backend = get_backend("ort-cpu")
    backend.prepare(paths["original"], input_shape={"input_ids": (10,), "attention_mask": (10,)}, batch_sizes=(40,))
    outputs = backend.run(held_out)
    expected = run_onnx(ort_session(paths["original"]), {k: torch.from_numpy(v) for k, v in held_out.items()})
    assert len(outputs) == 2
    for got, want in zip(outputs, expected):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(BackendError, match="takes 3 inputs"):
        _ = backend.input_spec
    with pytest.raises(BackendError, match="'features' is missing"):
        backend.run({k: v for k, v in held_out.items() if k != "features"})
    backend.close()


def test_a_correct_compile_passes_on_held_out_data_and_a_wrong_model_fails(keyword):
    paths, held_out = keyword
    check = check_numerics(paths["original"], paths["compiled"], max_rel_error=1e-5, inputs=held_out,
                           inputs_source="held_out.npz")  # fmt: skip
    assert check.passed and check.real_data and check.samples == 40
    assert len(check.error.outputs) == 2  # per output
    wrong = check_numerics(paths["original"], paths["wrong"], max_rel_error=1e-5, inputs=held_out)
    assert not wrong.passed and wrong.error.max_rel > 1e-3


def test_random_inputs_need_the_sequence_size_and_say_they_are_not_real_data(keyword):
    paths, _ = keyword
    with pytest.raises(BackendError, match="dynamic dimension 'seq'"):
        check_numerics(paths["original"], paths["compiled"], max_rel_error=1e-4)
    check = check_numerics(paths["original"], paths["compiled"], max_rel_error=1e-4, dims={"seq": 12})
    assert not check.real_data and "not real data" in check.describe()
    assert check.error is not None and check.samples == 8
    with pytest.raises(BackendError, match=r"--dim seq=12 and the input 'input_ids' given with seq = 10"):
        check_numerics(paths["original"], paths["compiled"], inputs=keyword[1], dims={"seq": 12})


def test_gate_and_profile_time_the_given_inputs_or_random_ones(keyword):
    paths, held_out = keyword
    result = gate(paths["original"], paths["compiled"], min_speedup=0.01, max_rel_error=1e-5, inputs=held_out,
                  inputs_source="held_out.npz", batch_size=4, **FAST_KW)  # fmt: skip
    assert result.passed, result.verdict()
    assert result.comparison.input_shapes == {"input_ids": (4, 10), "attention_mask": (4, 10), "features": (4, 6)}
    assert "of held_out.npz" in result.verdict()
    timed = profile(paths["compiled"], batch_sizes=(1, 2), iterations=3, warmup=1, dims={"seq": 12})
    assert [b.input_shapes["input_ids"] for b in timed.batches] == [(1, 12), (2, 12)]
    assert "input_ids 2x12, attention_mask 2x12, features 2x6" in timed.format_table()
    assert timed.inputs.startswith("random input_ids: integers in [0, 50)")
    on_data = profile(paths["compiled"], batch_sizes=(3,), iterations=2, warmup=0, inputs=held_out, inputs_source="h",
                      layers=True)  # fmt: skip
    assert on_data.inputs == "h" and on_data.batches[0].input_shapes["attention_mask"] == (3, 10)
    assert {layer.kind for layer in on_data.batches[0].layers} >= {"Gather", "Mul"}  # ORT's profiler, on the feed


def test_names_that_do_not_match_the_file_are_refused_naming_its_inputs(keyword):
    paths, held_out = keyword
    extra = {**held_out, "token_type_ids": held_out["input_ids"]}
    names = r"the model's inputs are 'input_ids', 'attention_mask', 'features': "
    with pytest.raises(BackendError, match=names + "'token_type_ids' is not among them"):
        check_numerics(paths["original"], paths["compiled"], inputs=extra)
    missing = {k: v for k, v in held_out.items() if k != "features"}
    for call in (lambda: check_numerics(paths["original"], paths["compiled"], inputs=missing),
                 lambda: profile(paths["original"], iterations=1, warmup=0, inputs=missing)):  # fmt: skip
        with pytest.raises(BackendError, match=r"the model's inputs are 'input_ids', 'attention_mask', 'features': "
                                               r"'features' is missing"):
            call()
    uneven = {**held_out, "features": held_out["features"][:5]}
    with pytest.raises(BackendError, match=r"inputs of different lengths \(input_ids 40, attention_mask 40, features 5\)"):
        check_numerics(paths["original"], paths["compiled"], inputs=uneven)
    with pytest.raises(BackendError, match=r"ids outside \[0, 50\)"):
        check_numerics(paths["original"], paths["compiled"], inputs={**held_out, "input_ids": held_out["input_ids"] + 50})


def test_two_positional_inputs_as_a_dict_a_tuple_or_random(two_inputs):
    paths, fresh = two_inputs
    for given in (fresh, (fresh["x"], fresh["y"]), {"x": torch.from_numpy(fresh["x"]), "y": torch.from_numpy(fresh["y"])}):
        check = check_numerics(paths["original"], paths["compiled"], max_rel_error=1e-5, inputs=given)
        assert check.passed and check.samples == 30, check.describe()
    random = check_numerics(paths["original"], paths["compiled"], max_rel_error=1.0)
    assert "x: N(0, 1); y: N(0, 1) (not real data" in random.describe()
    with pytest.raises(BackendError, match=r"holds one array and the model takes 2 inputs \('x', 'y'\)"):
        check_numerics(paths["original"], paths["compiled"], inputs=fresh["x"])
    swapped = {"x": fresh["y"], "y": fresh["x"]}
    with pytest.raises(BackendError, match=r"entry 'x' holds samples of shape \(3,\); the model's input 'x' takes .*\(4,\)"):
        check_numerics(paths["original"], paths["compiled"], inputs=swapped)
    timing = compare(paths["original"], paths["compiled"], inputs=fresh, batch_size=2, **FAST_KW)
    assert timing.input_shapes == {"x": (2, 4), "y": (2, 3)}


# TensorRT without a GPU: a stand-in module with the builder API build_serialized_engine calls --------------------


class _FakeTensorRT(types.ModuleType):
    """The part of TensorRT's builder API the engine build uses, recording the optimisation profiles it is given."""

    def __init__(self) -> None:
        super().__init__("fake_tensorrt")
        self.__version__ = "0-test"
        self.profiles: list[dict] = []
        recorded = self.profiles

        class ILogger:
            class Severity:
                INTERNAL_ERROR, ERROR, WARNING, INFO = range(4)

            def __init__(self) -> None:
                pass

        class Network:
            def __init__(self) -> None:
                self.inputs: list[types.SimpleNamespace] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, index):
                return self.inputs[index]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:
                self.network = network

            def parse_from_file(self, path: str) -> bool:
                for value in onnx.load(path, load_external_data=False).graph.input:
                    shape = [d.dim_value if d.WhichOneof("value") == "dim_value" else -1
                             for d in value.type.tensor_type.shape.dim]  # fmt: skip
                    self.network.inputs.append(types.SimpleNamespace(name=value.name, shape=shape))
                return True

        class Profile(dict):
            def set_shape(self, name, low, opt, high) -> None:
                self[name] = (tuple(low), tuple(opt), tuple(high))

        class Config:
            profiling_verbosity = None

            def set_memory_pool_limit(self, pool, size) -> None:
                pass

            def set_flag(self, flag) -> None:
                pass

            def clear_flag(self, flag) -> None:
                pass

            def add_optimization_profile(self, profile) -> int:
                recorded.append(dict(profile))
                return len(recorded) - 1

            def create_timing_cache(self, data):
                return data

            def set_timing_cache(self, cache, ignore_mismatch) -> bool:
                return True

        class Builder:
            num_DLA_cores = 0

            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine"

        self.ILogger, self.OnnxParser, self.Builder = ILogger, OnnxParser, Builder
        self.BuilderFlag = types.SimpleNamespace()
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.ProfilingVerbosity = types.SimpleNamespace(DETAILED=0)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    module = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_one_tensorrt_profile_covers_every_input_at_the_sizes_given(keyword, fake_tensorrt, tmp_path):
    paths, held_out = keyword
    with pytest.raises(BackendError, match="dynamic dimension 'seq'"):
        build_serialized_engine(paths["compiled"], module=fake_tensorrt.__name__)
    build_serialized_engine(paths["compiled"], module=fake_tensorrt.__name__, min_batch=1, opt_batch=2, max_batch=4,
                            dims={"seq": 12})  # fmt: skip
    assert fake_tensorrt.profiles == [{
        "input_ids": ((1, 12), (2, 12), (4, 12)),
        "attention_mask": ((1, 12), (2, 12), (4, 12)),
        "features": ((1, FEATURES), (2, FEATURES), (4, FEATURES)),
    }]  # fmt: skip
    # build_engine sizes seq from the user's inputs (seq 10) when they are given
    runtimes = {**RUNTIMES, "fake": fake_tensorrt.__name__}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("egp_export.runtime.engines.RUNTIMES", runtimes)
        result = build_engine(paths["compiled"], tmp_path / "m.engine", runtime="fake", max_batch=8, verify=False,
                              inputs=held_out)  # fmt: skip
    assert result.path.read_bytes() == b"engine"
    assert fake_tensorrt.profiles[-1]["input_ids"] == ((1, 10), (1, 10), (8, 10))
