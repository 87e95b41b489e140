"""EASIER's step: replace one activation call site by the identity, as a graph pass.

EASIER (Quétu, Liao, Tartaglione, ECML PKDD 2024) prunes no weights: every
iteration it replaces the activation site of lowest *positive* entropy by the
identity, then retrains. The rewrite is per call site in the traced
``GraphModule``, so a shared module keeps its other calls. EASIER's released
code also turns every zero-entropy site into the identity; here those are
left to the compiler, which replaces them *exactly* by their per-neuron
ON/OFF map (the identity would switch their OFF neurons on). EASIER measures
the entropy in training mode while training; here it is the eval-mode pooled
measurement (``SiteStats.entropy``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.activations import activation_spec
from egp_export.analysis.ops import named_modules
from egp_export.analysis.stats import SiteStats
from egp_export.analysis.trace import trace
from egp_export.passes.base import GraphPass, Recorder, finalize
from egp_export.prune.masks import copy_model
from egp_export.records import Reason, RefusalCode, RewriteKind
from egp_export.report.messages import describe_refusal


class ReplaceSitesWithIdentity(GraphPass):
    """Replace each named activation call site by its input: ``act(z) -> z``."""

    name = "replace_sites_with_identity"

    def __init__(self, sites: Sequence[str]) -> None:
        self.sites = list(sites)

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        nodes = {node.name: node for node in gm.graph.nodes}
        modules = named_modules(gm)
        for name in self.sites:
            node = nodes.get(name)
            if node is None:
                record.refuse(name, Reason(RefusalCode.NO_SUCH_SITE, {"site": name}))
                continue
            if activation_spec(node, modules) is None or not node.args or not isinstance(node.args[0], fx.Node):
                record.refuse(node, Reason(RefusalCode.NOT_AN_ACTIVATION, {"node": node.format_node()}))
                continue
            # act(z) -> z
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            record.rewrote(RewriteKind.SITE_TO_IDENTITY, [name])


def replace_with_identity(model: nn.Module, sites: Sequence[str]) -> fx.GraphModule:
    """``model`` as a GraphModule with the activation call sites ``sites`` (node names) replaced by the identity.

    A GraphModule is rewritten in place; any other module is traced first (a
    copy, in eval mode). Raises ValueError when a name is not an activation
    call site of the model (the other names are rewritten).
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(copy_model(model).eval())
    result = ReplaceSitesWithIdentity(sites)(gm)
    if result.modified:
        finalize(gm)
    if result.refusals:
        refused = "; ".join(f"{refusal.node!r}: {describe_refusal(refusal)}" for refusal in result.refusals)
        raise ValueError(f"cannot replace these by the identity: {refused}")
    return gm


def lowest_positive_entropy_site(sites: Sequence[SiteStats]) -> SiteStats | None:
    """EASIER's choice: the site of lowest positive entropy (ties: first in graph order); None if all are constant."""
    candidates = [site for site in sites if site.entropy > 0.0]
    return min(candidates, key=lambda site: site.entropy) if candidates else None
