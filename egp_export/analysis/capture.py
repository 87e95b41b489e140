"""The capture seam: a user's model becomes the eval-mode torch.fx GraphModule every analysis and pass reads.

Every graph the compile works on comes from ``capture``: the graph that is
rewritten, the reference graphs calibrated on validation and held-out data,
and the fresh graphs of a back-off. Front ends: "fx" (torch.fx symbolic
tracing, analysis/trace.py). The front end used, and why, is recorded in the
graph's trace facts (``trace_facts(gm)``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.inputs import Batch
from egp_export.analysis.trace import LeafSpec, trace

FRONTENDS = ("fx",)


def capture(
    model: nn.Module, example: Batch | None = None, *, frontend: str = "fx", leaf_modules: Iterable[LeafSpec] = ()
) -> fx.GraphModule:
    """An eval-mode GraphModule of a copy of ``model`` (never touched), captured by ``frontend``.

    ``example`` is one batch the model accepts (front ends that run the model
    to capture it need it; fx tracing does not).
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    return trace(model, leaf_modules=leaf_modules)
