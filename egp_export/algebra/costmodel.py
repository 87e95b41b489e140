"""Predicting a conv layer's latency: the analytic model (pure arithmetic on layer shapes).

``AnalyticCost``: seconds = MACs / rate + bytes moved / bandwidth +
per-layer launch overhead, with a lower MAC rate for depthwise/grouped convs
(they do little arithmetic per byte and vectorise poorly). The constants are
for ONNX Runtime on one CPU thread, read off single-conv timings
(``python tools/fit_cost_model.py``, results in docs/merge-engine.md): dense
convs ran at 30-57 GMAC/s, depthwise at 15-20 GMAC/s, a tiny conv took ~9 us.
They only need to rank alternatives, not to predict absolute time.

A cost model is any object with ``name``, ``conv_seconds(layer, input_size)``
and ``add_seconds(elements)``; the measured one, which times layers and
caches the table on disk, is ``egp_export.measured_cost.MeasuredCost``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from egp_export.algebra.convchain import ConvLayer

BYTES_PER_VALUE = 4  # fp32


def _moved_bytes(layer: ConvLayer, input_size: tuple[int, ...]) -> int:
    inputs = layer.in_channels * math.prod(input_size)
    outputs = layer.out_channels * math.prod(layer.output_size(input_size))
    return BYTES_PER_VALUE * (inputs + outputs + layer.weight.numel())


@dataclass(frozen=True)
class AnalyticCost:
    """Roofline-style estimate; see the module docstring."""

    dense_macs_per_second: float = 5.0e10
    grouped_macs_per_second: float = 1.5e10
    bytes_per_second: float = 1.2e10
    overhead_seconds: float = 5.0e-6
    name: str = "analytic"

    def conv_seconds(self, layer: ConvLayer, input_size: tuple[int, ...]) -> float:
        rate = self.dense_macs_per_second if layer.groups == 1 else self.grouped_macs_per_second
        return layer.macs(input_size) / rate + _moved_bytes(layer, input_size) / self.bytes_per_second + self.overhead_seconds

    def add_seconds(self, elements: int) -> float:
        """An elementwise add of a constant (a bias map) or a residual."""
        return 3 * BYTES_PER_VALUE * elements / self.bytes_per_second + self.overhead_seconds
