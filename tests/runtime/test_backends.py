"""Backends: the registry, availability (with reasons), input specs, and ort-cpu running real models."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from egp_export.export.onnx import ort_session, run_onnx
from egp_export.runtime import backends
from egp_export.runtime.backends import (
    BACKENDS,
    Backend,
    BackendError,
    InputSpec,
    OrtCpuBackend,
    OrtCudaBackend,
    TensorRTBackend,
    TensorRTRtxBackend,
    TorchCudaBackend,
    available_backends,
    backend_availability,
    get_backend,
    onnx_input_spec,
    parse_ort_profile,
)
from tests.perf_models import SMALL_SAMPLE_SHAPE, export_model

HAS_CUDA = torch.cuda.is_available()
HAS_ORT_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    return export_model("small", tmp_path_factory.mktemp("models"))


# Registry and availability -------------------------------------------------------------------


def test_registry_names_match_classes():
    assert list(BACKENDS) == ["ort-cpu", "ort-cuda", "torch-cuda", "torch-cuda-graph", "tensorrt", "tensorrt-rtx"]
    for name, cls in BACKENDS.items():
        assert cls.name == name
        assert issubclass(cls, Backend)
        assert cls.accepts in ("onnx", "module")


def test_every_backend_reports_availability_with_a_reason():
    for name, (ok, reason) in backend_availability().items():
        assert isinstance(ok, bool), name
        assert isinstance(reason, str) and reason, name


def test_ort_cpu_is_always_available():
    ok, reason = OrtCpuBackend.available()
    assert ok
    assert "CPUExecutionProvider" in reason
    assert available_backends()[0] == "ort-cpu"


@pytest.mark.skipif(HAS_ORT_CUDA, reason="onnxruntime-gpu is installed here: ort-cuda is available")
def test_ort_cuda_says_what_to_install():
    ok, reason = OrtCudaBackend.available()
    assert not ok
    assert "CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason
    assert "ort-cuda" not in available_backends()


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present: torch-cuda is available")
def test_torch_cuda_says_there_is_no_gpu():
    for cls in (TorchCudaBackend, backends.TorchCudaGraphBackend):
        ok, reason = cls.available()
        assert not ok
        assert "torch.cuda.is_available() is False" in reason


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_says_how_to_install_it():
    ok, reason = TensorRTBackend.available()
    assert not ok
    assert "TensorRT is not installed" in reason and "egp-export[tensorrt]" in reason


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is not None, reason="TensorRT-RTX is installed here")
def test_tensorrt_rtx_says_how_to_install_it():
    ok, reason = TensorRTRtxBackend.available()
    assert not ok
    assert "tensorrt-rtx-cu13" in reason


def test_availability_follows_the_cuda_provider(monkeypatch):
    """The guard can fire both ways: with the provider listed, ort-cuda reports itself available."""
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ok, reason = OrtCudaBackend.available()
    assert ok and "CUDAExecutionProvider" in reason
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert not OrtCudaBackend.available()[0]


def test_torch_cuda_availability_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    ok, reason = TorchCudaBackend.available()
    assert ok and "Fake GPU" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not TorchCudaBackend.available()[0]


def test_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(BackendError, match="unknown backend 'onnx-gpu'.*ort-cpu"):
        get_backend("onnx-gpu")


@pytest.mark.skipif(HAS_TENSORRT and HAS_CUDA, reason="TensorRT can run here")
def test_unavailable_backend_is_refused_with_the_reason():
    with pytest.raises(BackendError, match="tensorrt backend is not available here: .*not installed"):
        get_backend("tensorrt")


def test_threads_go_to_onnx_runtime_only():
    backend = get_backend("ort-cpu", threads=3)
    assert isinstance(backend, OrtCpuBackend) and backend.threads == 3
    with pytest.raises(BackendError, match="threads"):
        get_backend("ort-cpu", threads=0)


# Input specs ---------------------------------------------------------------------------------


def test_input_spec_from_an_exported_model(small_onnx):
    spec = onnx_input_spec(small_onnx)
    assert spec == InputSpec("input", SMALL_SAMPLE_SHAPE, np.dtype(np.float32), None)
    batch = spec.random_batch(4, seed=1)
    assert batch.shape == (4, *SMALL_SAMPLE_SHAPE) and batch.dtype == np.float32
    assert np.array_equal(batch, spec.random_batch(4, seed=1))


def _model_with_input(dims) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    return helper.make_model(graph)


def test_fixed_batch_is_enforced():
    spec = onnx_input_spec(_model_with_input([2, 3, 4]))
    assert spec.fixed_batch == 2
    spec.check_batch(2)
    with pytest.raises(BackendError, match="fixed batch size of 2"):
        spec.check_batch(4)


def test_dynamic_sample_dimensions_need_an_input_shape():
    model = _model_with_input(["batch", 3, "height", "width"])
    with pytest.raises(BackendError, match="--input-shape"):
        onnx_input_spec(model)
    assert onnx_input_spec(model, (3, 10, 12)).sample_shape == (3, 10, 12)
    with pytest.raises(BackendError, match="does not fit"):
        onnx_input_spec(model, (4, 10, 12))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        onnx_input_spec(tmp_path / "nope.onnx")
    backend = get_backend("ort-cpu")
    with pytest.raises(BackendError, match="does not exist"):
        backend.prepare(tmp_path / "nope.onnx")


def test_ort_cpu_refuses_a_module():
    with pytest.raises(BackendError, match="runs ONNX files"):
        get_backend("ort-cpu").prepare(torch.nn.ReLU())


# ort-cpu on a real model -----------------------------------------------------------------------


def test_ort_cpu_runs_like_onnx_export_session(small_onnx):
    backend = get_backend("ort-cpu")
    backend.prepare(small_onnx, batch_sizes=(1, 5))
    inputs = backend.input_spec.random_batch(5, seed=2)
    (output,) = backend.run(inputs)
    (expected,) = run_onnx(ort_session(small_onnx), inputs)
    np.testing.assert_array_equal(output, expected)
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert backend.describe() == {"backend": "ort-cpu", "threads": 1, "execution": "sequential"}


def test_bound_batch_times_with_the_host_clock(small_onnx):
    backend = get_backend("ort-cpu")
    backend.prepare(small_onnx)
    bound = backend.bind(backend.input_spec.random_batch(1))
    timings = backend.clock().measure(bound, 5)
    assert timings.shape == (5,) and (timings > 0).all() and (timings < 1000).all()
    assert bound.outputs()[0].shape == (1, 8, *SMALL_SAMPLE_SHAPE[1:])


def test_unprepared_backend_says_so():
    with pytest.raises(BackendError, match="prepare"):
        get_backend("ort-cpu").bind(np.zeros((1, 3), np.float32))


def test_ort_cpu_layer_times_name_the_nodes(small_onnx):
    backend = get_backend("ort-cpu")
    backend.prepare(small_onnx)
    layers = backend.layer_times(backend.input_spec.random_batch(1), iterations=5)
    assert layers, "ONNX Runtime's profiler reported no nodes"
    assert [layer.ms for layer in layers] == sorted((layer.ms for layer in layers), reverse=True)
    assert {layer.kind for layer in layers} >= {"Conv"}


def test_ort_profile_parsing_skips_warmup_runs():
    def run(ts):
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": 50}

    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 999},
        run(100),
        node("conv", "Conv", 101, 900),
        node("relu", "Relu", 140, 900),  # warm-up: slow, skipped
        run(200),
        node("conv", "Conv", 201, 30),
        node("relu", "Relu", 240, 10),
        {"cat": "Node", "name": "conv_fence_before", "ts": 202, "dur": 5},  # not a kernel time
        run(300),
        node("conv", "Conv", 301, 50),
        node("relu", "Relu", 340, 10),
    ]
    layers = parse_ort_profile(events, skip_runs=1)
    assert [(layer.name, layer.kind) for layer in layers] == [("conv", "Conv"), ("relu", "Relu")]
    assert layers[0].ms == pytest.approx(0.040)  # (30 + 50) µs / 2 runs
    assert layers[1].ms == pytest.approx(0.010)
    assert parse_ort_profile(events[:1], skip_runs=1) == []


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("name", ["torch-cuda", "torch-cuda-graph"])
def test_torch_cuda_matches_cpu(name):
    from tests.perf_models import conv_stack

    module = conv_stack(2)
    backend = get_backend(name)
    backend.prepare(module, input_shape=SMALL_SAMPLE_SHAPE, batch_sizes=(2,))
    inputs = backend.input_spec.random_batch(2)
    (output,) = backend.run(inputs)
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(output, expected, rtol=1e-3, atol=1e-4)  # TF32 convolutions allowed
    bound = backend.bind(inputs)
    timings = backend.clock().measure(bound, 5)
    assert (timings > 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_ORT_CUDA, reason="needs onnxruntime-gpu (no CUDAExecutionProvider in this onnxruntime)")
def test_ort_cuda_matches_ort_cpu(small_onnx):
    gpu, cpu = get_backend("ort-cuda"), get_backend("ort-cpu")
    for backend in (gpu, cpu):
        backend.prepare(small_onnx, batch_sizes=(2,))
    inputs = cpu.input_spec.random_batch(2)
    np.testing.assert_allclose(gpu.run(inputs)[0], cpu.run(inputs)[0], rtol=1e-3, atol=1e-4)
