"""Turn functional conv / linear / batch-norm calls with constant parameters into module calls (exact).

timm's ``StdConv2d`` and ``BatchNormAct2d`` trace as ``F.conv2d(x, w, ...)``
and ``F.batch_norm(x, running_mean, ...)``; ``torch.export`` graphs hold
``aten.conv2d`` / ``aten.linear`` / ``aten.batch_norm`` calls (the capture
seam binds those already). Such a call with constant parameters computes
exactly what a module with those tensors computes (the algebra and the
binding are in analysis/bound_layers.py), so it becomes that module's call:
folding and merging passes then treat it like any other layer.
"""

from __future__ import annotations

import torch.fx as fx

from egp_export.analysis.bound_layers import bind_constant_layers
from egp_export.analysis.provenance import absorb
from egp_export.passes.base import Fact, GraphPass, Recorder
from egp_export.records import RewriteKind


class BindFunctionalLayers(GraphPass):
    name = "bind_functional_layers"
    requires = frozenset({Fact.SHAPES})

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        # the compiler withdrew the rewrites around a withheld call
        for bound in bind_constant_layers(gm, skip=lambda node: record.is_withheld([node])):
            absorb(bound.call, [bound.source], RewriteKind.FUNCTIONAL_LAYER_BOUND)
            record.rewrote(
                RewriteKind.FUNCTIONAL_LAYER_BOUND, [bound.node], function=bound.function, module=str(bound.call.target)
            )
