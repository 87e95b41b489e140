"""Merge chains of convolutions into as few convs as pays, exactly unless told otherwise.

A chain is a maximal run of unshared conv layers, each the only reader of the
one before (eval-mode identities between are skipped): what is left between
two convs once their activations became linear and folded. For a chain
L1..Ln the pass chooses split points by dynamic programming over the
predicted latency of each segment (LayerMerge's formulation over a latency
table):

    best[0] = 0
    best[i] = min_{j < i} best[j] + cost(merge(L_{j+1} .. L_i))

where a single layer costs what it costs, and a multi-layer segment costs its
merged conv (plus a constant bias-map add where the merge needs one) if the
merge is allowed, else infinity. Allowed: EXACT and EXACT_BIAS_MAP merges
always (see convchain.py); BORDER_APPROXIMATE ones only with
``approximate=True``. Every multi-layer segment is reported: merged, or
refused with the reason (border not exact, strides misaligned, predicted
latency grows, a better split exists).

``plan="all"`` merges every chain whole whatever it costs and however
inexact (the Layer-Folding baseline the benchmark compares against).
"""

from __future__ import annotations

import math
from collections import Counter

import torch.fx as fx

from egp_export.algebra.convchain import ChainClass, ConvLayer, explicit_padding, merge_chain
from egp_export.algebra.costmodel import AnalyticCost
from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import follow_identities, is_conv_module, module_of, named_modules
from egp_export.analysis.provenance import absorb
from egp_export.passes.base import Fact, GraphPass, Recorder
from egp_export.passes.modules import ConstantAdd, weight_dtype
from egp_export.records import Reason, RefusalCode, RewriteKind

_MERGE_KINDS = {
    ChainClass.EXACT: RewriteKind.MERGED_EXACT,
    ChainClass.EXACT_BIAS_MAP: RewriteKind.MERGED_BIAS_MAP,
    ChainClass.BORDER_APPROXIMATE: RewriteKind.MERGED_BORDER_APPROXIMATE,
}


class MergeConvChains(GraphPass):
    name = "merge_conv_chains"
    requires = frozenset({Fact.SHAPES})

    def __init__(self, *, approximate: bool = False, cost=None, plan: str = "cost") -> None:
        if plan not in ("cost", "all"):
            raise ValueError(f"plan must be 'cost' or 'all', got {plan!r}")
        self.approximate = approximate or plan == "all"
        self.cost = cost if cost is not None else AnalyticCost()
        self.plan = plan

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        _ChainRun(self, gm, record).merge_chains()


class _ChainRun:
    """One run of the pass over one graph: the graph's modules, call-site counts and the recorder."""

    def __init__(self, config: MergeConvChains, gm: fx.GraphModule, record: Recorder) -> None:
        self.approximate, self.cost, self.plan = config.approximate, config.cost, config.plan
        self.gm = gm
        self.record = record
        self.modules = named_modules(gm)
        self.sites = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")

    def chains(self) -> list[tuple[list[fx.Node], list[list[fx.Node]]]]:
        """Every maximal chain (convs, identities between consecutive convs), in graph order."""
        successor: dict[fx.Node, tuple[list[fx.Node], fx.Node]] = {}
        for node in self.gm.graph.nodes:
            link = self._link(node)
            if link is not None:
                successor[node] = link
        heads = [n for n in successor if n not in {nxt for _, nxt in successor.values()}]
        found = []
        for head in heads:
            chain, between = [head], []
            while chain[-1] in successor:
                gap, nxt = successor[chain[-1]]
                between.append(gap)
                chain.append(nxt)
            found.append((chain, between))
        return found

    def merge_chains(self) -> None:
        for chain, between in self.chains():
            self._plan_chain(chain, between)

    # Finding chains ------------------------------------------------------

    def _mergeable_conv(self, node: fx.Node) -> bool:
        module = module_of(node, self.modules)
        if not is_conv_module(module) or self.sites[str(node.target)] != 1 or shape_of(node.args[0]) is None:
            return False
        try:
            explicit_padding(module)
        except ValueError:
            return False  # reflect/circular or asymmetric padding: no conv algebra for it
        return True

    def _link(self, node: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
        """(identities, next conv) when ``node``'s output only feeds another mergeable conv."""
        if not self._mergeable_conv(node):
            return None
        gap, user = follow_identities(node, self.modules)
        current = gap[-1] if gap else node
        if self.record is not None and self.record.is_withheld([node, *gap, *([user] if user else [])]):
            return None  # a merge the compiler withdrew
        if user is not None and self._mergeable_conv(user) and user.args[0] is current:
            same_rank = type(self.modules[str(user.target)]) is type(self.modules[str(node.target)])
            return (gap, user) if same_rank else None
        return None
        return None

    # Planning ------------------------------------------------------------

    def _plan_chain(self, chain: list[fx.Node], between: list[list[fx.Node]]) -> None:
        layers = [ConvLayer.from_module(self.modules[str(n.target)]) for n in chain]
        sizes = [tuple(shape_of(n.args[0])[2:]) for n in chain]
        single = [self.cost.conv_seconds(layer, size) for layer, size in zip(layers, sizes)]
        n = len(chain)
        segments: dict[tuple[int, int], tuple[float, object, Reason | None]] = {}
        for j in range(n):
            for i in range(j + 2, n + 1):
                segments[(j, i)] = self._segment(layers[j:i], sizes[j], sum(single[j:i]))
        if self.plan == "all":
            whole = segments.get((0, n))
            choice = [(0, n)] if whole is not None and whole[2] is None else [(k, k + 1) for k in range(n)]
        else:
            choice = self._best_split(n, single, segments)
        chosen = {seg for seg in choice if seg[1] - seg[0] > 1}
        names = [node.name for node in chain]
        for (j, i), (seconds, _merged, reason) in segments.items():
            if (j, i) in chosen:
                continue
            if reason is None:
                reason = Reason(RefusalCode.BETTER_SPLIT, {"predicted_us": round(seconds * 1e6, 2)})
            self.record.refuse(chain[i - 1], reason, what="conv_merge", chain=names[j:i])
        for j, i in sorted(chosen, reverse=True):
            seconds, merged, _ = segments[(j, i)]
            self._rewrite(chain[j:i], between[j : i - 1], merged, seconds, sum(single[j:i]))

    def _segment(self, layers: list[ConvLayer], size: tuple[int, ...], split_seconds: float):
        """(predicted seconds, MergedChain or None, refusal reason or None) for one segment."""
        try:
            merged = merge_chain(layers, size)
        except ValueError as error:
            return math.inf, None, Reason(RefusalCode.NOT_COMPOSABLE, {"why": str(error)})
        if merged.chain_class is ChainClass.BORDER_APPROXIMATE and not self.approximate:
            return math.inf, merged, Reason(RefusalCode.BORDER_NOT_EXACT)
        seconds = self.cost.conv_seconds(merged.conv, size)
        if merged.bias_map is not None:
            seconds += self.cost.add_seconds(merged.bias_map.numel())
        if self.plan == "cost" and seconds >= split_seconds:
            detail = {"merged_us": seconds * 1e6, "split_us": split_seconds * 1e6, "cost_model": self.cost.name}
            return seconds, merged, Reason(RefusalCode.COST_GROWS, detail)
        return seconds, merged, None

    @staticmethod
    def _best_split(n: int, single: list[float], segments: dict) -> list[tuple[int, int]]:
        best = [0.0] + [math.inf] * n
        back = [0] * (n + 1)
        for i in range(1, n + 1):
            for j in range(i):
                if i - j == 1:
                    seconds = single[j]
                else:
                    seconds, _, reason = segments[(j, i)]
                    if reason is not None:
                        continue
                if best[j] + seconds < best[i]:
                    best[i], back[i] = best[j] + seconds, j
        choice, i = [], n
        while i > 0:
            choice.append((back[i], i))
            i = back[i]
        return choice[::-1]

    # Rewriting -----------------------------------------------------------

    def _rewrite(self, nodes: list[fx.Node], gaps: list[list[fx.Node]], merged, seconds: float, split: float) -> None:
        first, last = nodes[0], nodes[-1]
        module = merged.conv.to_module(self.modules[str(first.target)].weight.dtype).train(self.gm.training)
        self.gm.add_submodule(str(first.target), module)
        self.modules[str(first.target)] = module
        # The first node now computes what the last did: later chains in this run read its shape.
        if "tensor_meta" in last.meta:
            first.meta["tensor_meta"] = last.meta["tensor_meta"]
        # The merged conv computes what the whole segment did, identities between included.
        absorb(first, [*nodes[1:], *(n for gap in gaps for n in gap)], _MERGE_KINDS[merged.chain_class])
        output = first
        if merged.bias_map is not None:
            output = insert_module_call(
                self.gm, last, f"{first.name}_bias_map", ConstantAdd(merged.bias_map, weight_dtype(self.gm)), (first,), like=last
            )
            absorb(output, [first])
        last.replace_all_uses_with(output)
        for node in reversed([n for pair in zip(nodes[1:], gaps) for n in (*pair[1], pair[0])]):
            self.gm.graph.erase_node(node)
        self.record.rewrote(
            _MERGE_KINDS[merged.chain_class],
            [n.name for n in nodes],
            chain=[n.name for n in nodes],
            kernel=list(merged.conv.kernel),
            predicted_us=seconds * 1e6,
            split_us=split * 1e6,
        )


def conv_chains(gm: fx.GraphModule) -> list[tuple[list[fx.Node], list[list[fx.Node]]]]:
    """The conv chains the pass would plan on ``gm`` (shapes must be propagated)."""
    return _ChainRun(MergeConvChains(), gm, None).chains()


def conv_seconds(gm: fx.GraphModule, cost=None) -> float:
    """Predicted latency of every conv layer and bias-map add in ``gm`` (shapes must be propagated)."""
    cost = cost if cost is not None else AnalyticCost()
    modules = named_modules(gm)
    total = 0.0
    for node in gm.graph.nodes:
        module = module_of(node, modules)
        if isinstance(module, ConstantAdd):
            total += cost.add_seconds(module.value.numel())
            continue
        shape = shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if is_conv_module(module) and shape is not None:
            try:
                layer = ConvLayer.shape_of_module(module)
            except ValueError:
                continue
            total += cost.conv_seconds(layer, tuple(shape[2:]))
    return total
