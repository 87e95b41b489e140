"""TensorRT engines: the fp16 graph conversion and the missing-TensorRT errors run everywhere; engine builds
run only where ``tensorrt`` imports and a CUDA device is present, and skip with that reason elsewhere."""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from egp_export.analysis.numerics import compare
from egp_export.cli.perf import main
from egp_export.export.onnx import ort_session, run_onnx
from egp_export.runtime.backends import BackendError, get_backend
from egp_export.runtime.engines import build_engine
from egp_export.runtime.tensorrt import TRT_FP16_RTOL, TRT_FP32_RTOL, convert_to_fp16, tensorrt_unavailable_reason
from tests.perf_models import SMALL_SAMPLE_SHAPE, export_model

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()
_MISSING = [what for what, ok in (("the tensorrt Python package", HAS_TENSORRT), ("a CUDA device", HAS_CUDA)) if not ok]


def requires_tensorrt(test):
    """Marks a test tensorrt + gpu and skips it, naming what is missing, where either is absent."""
    reason = f"needs {' and '.join(_MISSING)} to build TensorRT engines" if _MISSING else ""
    for mark in (pytest.mark.tensorrt, pytest.mark.gpu, pytest.mark.skipif(bool(_MISSING), reason=reason)):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    return export_model("small", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory):
    """A real architecture (residual adds, BN folded by onnxsim, pooling, Gemm) for the fp16 conversion."""
    import torchvision

    from egp_export.export.onnx import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return export_onnx(model, example, tmp_path_factory.mktemp("resnet") / "resnet18.onnx", exporter="torchscript").path


# fp16 in the ONNX graph (TensorRT 11's way; checked with ONNX Runtime here) ----------------------


def test_fp16_graph_keeps_fp32_io_and_halves_the_weights(resnet_onnx):
    original = onnx.load(str(resnet_onnx))
    before = original.SerializeToString()
    converted = convert_to_fp16(original)
    assert original.SerializeToString() == before, "the input model was modified"
    onnx.checker.check_model(converted, full_check=True)
    floats = [init for init in converted.graph.initializer if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(init.data_type == TensorProto.FLOAT16 for init in floats)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    casts = [node for node in converted.graph.node if node.op_type == "Cast"]
    assert casts[0].input[0] == converted.graph.input[0].name
    assert converted.graph.node[-1].op_type == "Cast" and converted.graph.node[-1].output[0] == converted.graph.output[0].name


def test_fp16_graph_matches_fp32_within_the_fp16_tolerance(resnet_onnx, tmp_path):
    converted = convert_to_fp16(onnx.load(str(resnet_onnx)))
    path = tmp_path / "resnet18_fp16.onnx"
    onnx.save(converted, str(path))
    inputs = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    reference = run_onnx(ort_session(resnet_onnx), inputs)
    half = run_onnx(ort_session(path), inputs)
    assert half[0].dtype == np.float32
    error = compare(reference, half)
    assert 0 < error.max_rel <= TRT_FP16_RTOL, error


def test_fp16_refuses_weights_beyond_its_range(small_onnx):
    model = onnx.load(str(small_onnx))
    weight = model.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = 1e6
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    with pytest.raises(BackendError, match="beyond fp16's range"):
        convert_to_fp16(model)


# Without TensorRT ----------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_says_how_to_install_it(small_onnx, tmp_path):
    out = tmp_path / "model.engine"
    with pytest.raises(BackendError, match=r"TensorRT is not installed \(pip install 'egp-export\[tensorrt\]'"):
        build_engine(small_onnx, out)
    assert not out.exists()
    assert "No module named 'tensorrt'" in tensorrt_unavailable_reason("tensorrt")


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_engine_command_without_tensorrt_is_a_clean_error(small_onnx, tmp_path, capsys):
    code = main(["engine", str(small_onnx), "--out", str(tmp_path / "model.engine"), "--fp16"])
    captured = capsys.readouterr()
    assert code == BackendError.exit_code
    assert captured.err.startswith("egp-export: error: TensorRT is not installed")
    assert "Traceback" not in captured.err


def test_engine_arguments_are_checked_before_building(small_onnx, tmp_path):
    existing = tmp_path / "model.engine"
    existing.write_bytes(b"keep me")
    from egp_export.errors import OutputError

    with pytest.raises(OutputError, match="already exists"):
        build_engine(small_onnx, existing)
    with pytest.raises(BackendError, match="unknown TensorRT runtime"):
        build_engine(small_onnx, tmp_path / "other.engine", runtime="tensorrt-lean")
    with pytest.raises(BackendError, match="no DLA"):
        build_engine(small_onnx, tmp_path / "other.engine", runtime="tensorrt-rtx", dla_core=0, fp16=True)
    assert existing.read_bytes() == b"keep me"


# With TensorRT and a GPU ------------------------------------------------------------------------------


@requires_tensorrt
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_engine_matches_onnx_runtime(small_onnx, tmp_path, fp16):
    result = build_engine(small_onnx, tmp_path / "model.engine", fp16=fp16, max_batch=4)
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.error is not None and result.error.max_rel <= (TRT_FP16_RTOL if fp16 else TRT_FP32_RTOL)
    assert (result.fp16 is not None) == fp16  # "builder-flag" on TensorRT 10, "onnx-graph" on 11
    assert result.batch_range == (1, 1, 4)


@requires_tensorrt
def test_engine_file_runs_in_the_backend_over_its_batch_range(small_onnx, tmp_path):
    engine = build_engine(small_onnx, tmp_path / "model.engine", min_batch=1, opt_batch=2, max_batch=4).path
    backend = get_backend("tensorrt")
    backend.prepare(engine, batch_sizes=(1, 4))
    reference = get_backend("ort-cpu")
    reference.prepare(small_onnx, batch_sizes=(4,))
    inputs = reference.input_spec.random_batch(4, seed=3)
    assert compare(reference.run(inputs), backend.run(inputs)).max_rel <= TRT_FP32_RTOL
    assert backend.input_spec.sample_shape == SMALL_SAMPLE_SHAPE
    timings = backend.clock().measure(backend.bind(inputs[:1]), 10)
    assert timings.shape == (10,) and (timings > 0).all()
    layers = backend.layer_times(inputs[:1], iterations=5)
    assert layers and all(layer.ms >= 0 for layer in layers)
    with pytest.raises(BackendError, match="optimisation profile"):
        backend.bind(np.concatenate([inputs, inputs]))


@requires_tensorrt
def test_timing_cache_is_written_and_reused(small_onnx, tmp_path):
    cache = tmp_path / "timing.cache"
    build_engine(small_onnx, tmp_path / "a.engine", timing_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    first = cache.read_bytes()
    build_engine(small_onnx, tmp_path / "b.engine", timing_cache=cache)
    assert len(cache.read_bytes()) >= len(first)


@requires_tensorrt
def test_gate_runs_on_tensorrt(tmp_path):
    from egp_export.runtime.gate import gate

    shallow, deep = export_model("shallow", tmp_path), export_model("deep", tmp_path)
    result = gate(deep, shallow, min_speedup=1.0, max_rel_error=TRT_FP32_RTOL, backend="tensorrt", rounds=5, iterations=10)
    assert result.comparison.clock == "cuda-events"
    assert result.numeric.passed


# The build logic against a recording stand-in of TensorRT's Python API ------------------------------------
# These check egp-export's side of the calls (flags chosen per TensorRT version, profile shapes, DLA and
# timing-cache handling, error reporting) where no TensorRT is installed; they cannot check TensorRT itself.


class _Recorder:
    """A stand-in ``tensorrt`` module: the API surface build_serialized_engine uses, recording each call."""

    def __init__(
        self, *, has_fp16_flag: bool, dla_cores: int = 0, parse_ok: bool = True, build_ok: bool = True,
        accepted_caches: tuple[bytes, ...] | None = None,
    ):
        calls = self.calls = {"flags": set(), "cleared": set(), "profiles": [], "parsed": None, "cache_in": None}
        flags = ["TF32", "GPU_FALLBACK"] + (["FP16"] if has_fp16_flag else [])
        module = types.ModuleType("tensorrt")
        module.__version__ = "10.99-standin" if has_fp16_flag else "11.99-standin"
        module.BuilderFlag = types.SimpleNamespace(**{flag: flag for flag in flags})
        module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
        module.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED")
        module.DeviceType = types.SimpleNamespace(GPU="GPU", DLA="DLA")

        class ILogger:
            Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

            def __init__(self):
                pass

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self):
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, index):
                return self.inputs[index]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.num_errors = 0 if parse_ok else 1

            def parse_from_file(self, path):
                model = onnx.load(path)
                calls["parsed"] = model
                value = model.graph.input[0]
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(value.name, dims))
                return parse_ok

            def get_error(self, index):
                return "In node 0 (Conv): unsupported padding mode"

        class Cache:
            def serialize(self):
                return b"timing-cache-v2"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls["workspace"] = (pool, size)

            def set_flag(self, flag):
                calls["flags"].add(flag)

            def clear_flag(self, flag):
                calls["cleared"].add(flag)

            def add_optimization_profile(self, profile):
                calls["profiles"].append(profile.shapes)

            def create_timing_cache(self, data):
                calls["cache_in"] = bytes(data)
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                # TensorRT returns False (and keeps no cache) for one from another version or GPU.
                calls["ignore_mismatch"] = ignore_mismatch
                calls["cache_set"] = accepted_caches is None or calls["cache_in"] in accepted_caches
                return calls["cache_set"]

            def get_timing_cache(self):
                return Cache() if calls["cache_set"] else None

            def __setattr__(self, name, value):
                calls[name] = value

        class Profile:
            def set_shape(self, name, low, opt, high):
                self.shapes = (name, low, opt, high)

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger):
                self.logger = logger

            def create_network(self, flags):
                calls["network_flags"] = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if not build_ok:
                    self.logger.log(ILogger.Severity.ERROR, "no implementation for node Conv_0")
                    return None
                return b"serialized-engine"

        module.ILogger, module.OnnxParser, module.Builder = ILogger, OnnxParser, Builder
        self.module = module


@pytest.fixture
def standin(monkeypatch):
    """Install a stand-in TensorRT module (TensorRT 10 or 11 flavour) for the duration of a test."""
    from egp_export.runtime import tensorrt as tensorrt_engine

    def install(**options) -> dict:
        recorder = _Recorder(**options)
        monkeypatch.setitem(sys.modules, "tensorrt", recorder.module)
        monkeypatch.setattr(tensorrt_engine, "_LOGGERS", {})
        return recorder.calls

    return install


def test_tensorrt_10_uses_the_fp16_builder_flag_on_the_fp32_graph(standin, small_onnx):
    from egp_export.runtime.tensorrt import build_serialized_engine

    calls = standin(has_fp16_flag=True)
    built = build_serialized_engine(small_onnx, fp16=True, workspace_mb=256, min_batch=1, opt_batch=2, max_batch=8)
    assert built.fp16 == "builder-flag" and built.data == b"serialized-engine"
    assert calls["network_flags"] == 0  # explicit batch is the only mode
    assert "FP16" in calls["flags"]
    assert calls["parsed"].graph.initializer[0].data_type == TensorProto.FLOAT
    assert calls["workspace"] == ("WORKSPACE", 256 << 20)
    assert calls["profiling_verbosity"] == "DETAILED"
    assert calls["profiles"] == [("input", (1, *SMALL_SAMPLE_SHAPE), (2, *SMALL_SAMPLE_SHAPE), (8, *SMALL_SAMPLE_SHAPE))]
    assert calls["ignore_mismatch"] is False


def test_tensorrt_11_gets_fp16_in_the_onnx_graph(standin, small_onnx):
    from egp_export.runtime.tensorrt import build_serialized_engine

    calls = standin(has_fp16_flag=False)
    built = build_serialized_engine(small_onnx, fp16=True, tf32=False)
    assert built.fp16 == "onnx-graph"
    assert "FP16" not in calls["flags"] and calls["cleared"] == {"TF32"}
    parsed = calls["parsed"]
    assert {init.data_type for init in parsed.graph.initializer} == {TensorProto.FLOAT16}
    assert parsed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_dla_core_selection_and_its_guards(standin, small_onnx):
    from egp_export.runtime.tensorrt import build_serialized_engine

    calls = standin(has_fp16_flag=True, dla_cores=2)
    build_serialized_engine(small_onnx, fp16=True, dla_core=1)
    assert calls["default_device_type"] == "DLA" and calls["DLA_core"] == 1
    assert {"FP16", "GPU_FALLBACK"} <= calls["flags"]
    with pytest.raises(BackendError, match="has 2 DLA cores"):
        build_serialized_engine(small_onnx, fp16=True, dla_core=2)
    with pytest.raises(BackendError, match="fp16 or int8 only"):
        build_serialized_engine(small_onnx, dla_core=0)


def test_timing_cache_is_read_and_written_back(standin, small_onnx, tmp_path):
    from egp_export.runtime.tensorrt import build_serialized_engine

    cache = tmp_path / "trt.cache"
    calls = standin(has_fp16_flag=True)
    build_serialized_engine(small_onnx, timing_cache=cache)
    assert calls["cache_in"] == b"" and cache.read_bytes() == b"timing-cache-v2"
    cache.write_bytes(b"earlier-cache")
    build_serialized_engine(small_onnx, timing_cache=cache)
    assert calls["cache_in"] == b"earlier-cache"


def test_parser_and_builder_failures_quote_tensorrt(standin, small_onnx, tmp_path):
    from egp_export.runtime.tensorrt import build_serialized_engine

    standin(has_fp16_flag=True, parse_ok=False)
    with pytest.raises(BackendError, match="ONNX parser rejected .*unsupported padding mode"):
        build_serialized_engine(small_onnx)
    standin(has_fp16_flag=True, build_ok=False)
    with pytest.raises(BackendError, match="could not build an engine .*no implementation for node Conv_0"):
        build_serialized_engine(small_onnx)
    out = tmp_path / "model.engine"
    with pytest.raises(BackendError):
        build_engine(small_onnx, out, verify=False)
    assert not out.exists()


def test_build_engine_writes_the_serialized_engine(standin, small_onnx, tmp_path):
    standin(has_fp16_flag=False)
    result = build_engine(small_onnx, tmp_path / "model.engine", fp16=True, max_batch=4, verify=False)
    assert result.path.read_bytes() == b"serialized-engine"
    assert result.version == "11.99-standin" and result.fp16 == "onnx-graph" and result.batch_range == (1, 1, 4)
    assert result.error is None and result.rtol == TRT_FP16_RTOL


def test_mismatched_timing_cache_is_replaced_by_a_fresh_one(standin, small_onnx, tmp_path):
    """Regression: set_timing_cache's False was ignored, get_timing_cache() gave None, .serialize() failed after the build."""
    from egp_export.runtime.tensorrt import build_serialized_engine

    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"cache-from-another-gpu")
    standin(has_fp16_flag=False, accepted_caches=(b"",))
    built = build_serialized_engine(small_onnx, timing_cache=cache)
    assert built.data == b"serialized-engine" and built.timing_cache == cache
    assert cache.read_bytes() == b"timing-cache-v2"
    assert any("from another TensorRT version or GPU" in note for note in built.notes), built.notes


def test_engine_is_built_when_tensorrt_keeps_no_timing_cache(standin, small_onnx, tmp_path):
    from egp_export.runtime.tensorrt import build_serialized_engine

    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"cache-from-another-gpu")
    standin(has_fp16_flag=False, accepted_caches=())
    built = build_serialized_engine(small_onnx, timing_cache=cache)
    assert built.data == b"serialized-engine" and built.timing_cache is None
    assert cache.read_bytes() == b"cache-from-another-gpu"
    assert any("built without one" in note for note in built.notes), built.notes


def test_tensorrt_rtx_neither_reads_nor_writes_a_timing_cache(standin, small_onnx, tmp_path, monkeypatch):
    from egp_export.runtime.tensorrt import build_serialized_engine

    calls = standin(has_fp16_flag=False)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", sys.modules["tensorrt"])
    cache = tmp_path / "trt.cache"
    built = build_serialized_engine(small_onnx, module="tensorrt_rtx", timing_cache=cache)
    assert built.data == b"serialized-engine" and built.timing_cache is None
    assert calls["cache_in"] is None and not cache.exists()
    assert any("TensorRT for RTX has no build-time kernel timing" in note for note in built.notes), built.notes
