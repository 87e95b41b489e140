"""Measured conv latency: each layer shape timed on ONNX Runtime CPU and cached on disk (the planner's ``measured``
cost model).

Each layer shape is exported as a one-node ONNX model and timed on the
backend (ONNX Runtime CPU; median of repeated runs after warm-up); results are
cached in a JSON table keyed by layer shape and backend, so a shape is timed
once per machine. Shapes the table lacks are timed on first use; ``save``
writes the table. Elementwise adds are not timed: the analytic model
(``egp_export.algebra.costmodel.AnalyticCost``) prices them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from egp_export.algebra.convchain import ConvLayer
from egp_export.algebra.costmodel import AnalyticCost
from egp_export.io.fileio import write_text_atomic


def _layer_key(layer: ConvLayer, input_size: tuple[int, ...]) -> str:
    return json.dumps(
        [layer.rank, layer.in_channels, layer.out_channels, list(layer.kernel), list(layer.stride),
         list(layer.padding), list(layer.dilation), layer.groups, list(input_size)]
    )


def _conv_onnx(layer: ConvLayer, input_size: tuple[int, ...]) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal(tuple(layer.weight.shape)).astype(np.float32)
    bias = rng.standard_normal(layer.out_channels).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"],
        kernel_shape=list(layer.kernel), strides=list(layer.stride), pads=list(layer.padding) * 2,
        dilations=list(layer.dilation), group=layer.groups,
    )
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, layer.in_channels, *input_size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    # IR version 8 (opset 17): every ONNX Runtime this project supports reads it.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


def time_onnx_conv(layer: ConvLayer, input_size: tuple[int, ...], *, threads: int = 1, repeats: int = 30) -> float:
    """Median seconds of one conv of this shape on ONNX Runtime CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(_conv_onnx(layer, input_size), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, layer.in_channels, *input_size)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        session.run(None, {"x": x})
        samples.append(time.perf_counter_ns() - start)
    return float(np.median(samples)) / 1e9


def default_cache_path(backend: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "egp-export"
    return root / f"latency-{backend}.json"


class MeasuredCost:
    """Latency table measured on ONNX Runtime CPU and cached on disk (see the module docstring)."""

    def __init__(self, cache_path: str | os.PathLike | None = None, *, threads: int = 1, repeats: int = 30) -> None:
        self.backend = f"ort-cpu-{threads}t"
        self.name = f"measured:{self.backend}"
        self.cache_path = Path(cache_path) if cache_path is not None else default_cache_path(self.backend)
        self.threads = threads
        self.repeats = repeats
        self.fallback = AnalyticCost()
        try:
            self.table: dict[str, float] = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            self.table = {}
        self.measured = 0

    def conv_seconds(self, layer: ConvLayer, input_size: tuple[int, ...]) -> float:
        key = _layer_key(layer, input_size)
        if key not in self.table:
            self.table[key] = time_onnx_conv(layer, input_size, threads=self.threads, repeats=self.repeats)
            self.measured += 1
        return self.table[key]

    def add_seconds(self, elements: int) -> float:
        return self.fallback.add_seconds(elements)

    def save(self) -> None:
        """Write the table atomically (a cache: overwriting it is its purpose)."""
        write_text_atomic(self.cache_path, json.dumps(self.table, indent=0, sort_keys=True), force=True)
