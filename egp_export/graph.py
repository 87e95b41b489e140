"""torch.fx plumbing shared by the analyses and passes: tracing, layer kinds, shapes, depth."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .activations import activation_spec
from .errors import TraceError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that are the identity in eval mode.
IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class _PathTracer(fx.Tracer):
    """A Tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.egp_module_path: list[str] = []

    def call_module(self, m, forward, args, kwargs):
        self.egp_module_path.append(self.path_of_module(m) or type(m).__name__)
        result = super().call_module(m, forward, args, kwargs)
        self.egp_module_path.pop()
        return result


def owned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that egp-export may change, with pruning masks made permanent.

    ``torch.nn.utils.prune`` keeps ``weight`` as a computed (non-leaf) tensor,
    which ``copy.deepcopy`` refuses; the copy gets a detached clone of it, and
    then ``prune.remove`` turns the copy's ``weight_orig * weight_mask`` into a
    plain parameter. The user's model keeps its masks.
    """
    from torch.nn.utils import prune

    memo: dict[int, object] = {}
    pruned: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                methods = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else (hook,)
                tensor_name = methods[-1]._tensor_name
                memo[id(getattr(module, tensor_name))] = getattr(module, tensor_name).detach().clone()
                pruned.append((name, tensor_name))
    owned = copy.deepcopy(model, memo)
    for name, tensor_name in pruned:
        prune.remove(owned.get_submodule(name), tensor_name)
    return owned


def trace(model: nn.Module) -> fx.GraphModule:
    """An eval-mode torch.fx GraphModule of a deep copy of ``model`` (which is never touched).

    A model in training mode is traced in eval mode with a warning: BatchNorm
    and Dropout behave differently in training, and deployment means eval.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    if model.training:
        warnings.warn(
            "the model is in training mode; egp-export compiles its eval-mode behaviour "
            "(call model.eval() first to silence this).",
            UserWarning,
            stacklevel=3,
        )
    owned = owned_copy(model).eval()
    if isinstance(owned, fx.GraphModule):
        return owned
    tracer = _PathTracer()
    try:
        graph = tracer.trace(owned)
    except Exception as error:  # fx raises many types; all mean "not traceable"
        where = tracer.egp_module_path[-1] if tracer.egp_module_path else "the top-level forward()"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(
            f"torch.fx cannot trace the model inside '{where}': {first_line}. "
            "Data-dependent Python control flow (if/for on tensor values) cannot be traced; "
            "move it out of forward(), or mark that submodule as a leaf."
        ) from None
    _positional_inputs(graph)
    # GraphModule builds fresh container modules, which start in training mode.
    return fx.GraphModule(tracer.root, graph, type(owned).__name__).eval()


def _positional_inputs(graph: fx.Graph) -> None:
    """``layer(input=x)`` becomes ``layer(x)``: passes read a layer's input as its first argument.

    torch.nn layers and torch.nn.functional name their first parameter
    ``input``, so moving it to the front changes nothing.
    """
    for node in graph.nodes:
        if node.op in ("call_module", "call_function") and not node.args and "input" in node.kwargs:
            kwargs = dict(node.kwargs)
            node.args = (kwargs.pop("input"),)
            node.kwargs = kwargs


def named_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None




def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Conv or linear: the layers whose chain length is the network's depth."""
    return isinstance(module_of(node, modules), CONV_TYPES + LINEAR_TYPES)


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return isinstance(module_of(node, modules), IDENTITY_TYPES)


def call_sites(gm: fx.GraphModule, target: str) -> int:
    """How many nodes call the submodule ``target`` (a shared module has several)."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Store every node's output shape in ``node.meta['tensor_meta']`` (torch.fx ShapeProp on one sample).

    A real forward of one sample: measured faster than fake tensors once the
    process is warm (ResNet-50 at 224x224: 0.08 s real vs 0.28 s fake;
    EfficientNetV2-S at 32x32: 0.04 s vs 0.67 s).
    """
    with torch.no_grad():
        ShapeProp(gm).propagate(example)


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """Output axis i of a permute/transpose node takes input axis perm[i]; None for other nodes."""
    is_method = node.op == "call_method"
    if (is_method and node.target == "permute") or (node.op == "call_function" and node.target is torch.permute):
        dims = node.args[1:] if is_method else node.args[1:2] or [node.kwargs.get("dims")]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        return [d % rank for d in dims]
    if (is_method and node.target == "transpose") or (node.op == "call_function" and node.target is torch.transpose):
        a, b = (d % rank for d in node.args[1:3])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return None


def neuron_dim(node: fx.Node, modules: dict[str, nn.Module], _depth: int = 0) -> int:
    """The axis that indexes neurons of ``node``'s output: 1 for conv layouts, -1 for token layouts.

    Walks up through elementwise/activation ops to the nearest layer that fixes
    the layout: conv / batchnorm produce channels-first, linear / layernorm
    channels-last (Swin's ``[B, H, W, C]``, ViT's ``[B, N, C]``); a permute or
    transpose moves the axis its input had (ConvNeXt permutes to channels-last
    and back).
    """
    current: fx.Node | None = node
    for _ in range(64):
        if current is None or _depth > 16:
            break
        module = module_of(current, modules)
        if isinstance(module, CONV_TYPES + BATCHNORM_TYPES):
            return 1
        if isinstance(module, LINEAR_TYPES + (nn.LayerNorm,)):
            return -1
        shape = shape_of(current)
        perm = _permutation(current, len(shape)) if shape is not None else None
        if perm is not None:
            source = current.args[0]
            axis = neuron_dim(source, modules, _depth + 1) % len(shape)
            moved = perm.index(axis)
            return -1 if moved == len(shape) - 1 else moved
        if shape is None and current.op in ("call_method", "call_function") and current.target in (
            "permute", "transpose", torch.permute, torch.transpose
        ):
            return -1  # no shapes yet: a permute in these networks goes to channels-last
        inputs = [a for a in current.all_input_nodes if a.op != "get_attr"]
        current = inputs[0] if inputs else None
    shape = shape_of(node)
    return 1 if shape is not None and len(shape) > 2 else -1


def activation_nodes(gm: fx.GraphModule) -> Iterable[fx.Node]:
    modules = named_modules(gm)
    return [n for n in gm.graph.nodes if activation_spec(n, modules) is not None]



def depth(gm: fx.GraphModule) -> int:
    """Longest input-to-output path counted in conv/linear layers."""
    modules = named_modules(gm)
    longest: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        inherited = max((longest[a] for a in node.all_input_nodes), default=0)
        longest[node] = inherited + (1 if is_layer(node, modules) else 0)
    return max(longest.values(), default=0)


def layer_macs(node: fx.Node, module: nn.Module) -> int:
    """Multiply-accumulates of one conv/linear call per sample (needs shapes on the node)."""
    shape = shape_of(node)
    if shape is None:
        return 0
    per_sample = 1
    for size in shape[1:]:
        per_sample *= int(size)
    if isinstance(module, CONV_TYPES):
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        return per_sample * (module.in_channels // module.groups) * kernel
    if isinstance(module, LINEAR_TYPES):
        return per_sample * module.in_features
    return 0


def summarize(gm: fx.GraphModule) -> dict[str, int]:
    """Depth, layer and activation counts, parameters and MACs (shapes must be propagated)."""
    modules = named_modules(gm)
    layers = [n for n in gm.graph.nodes if is_layer(n, modules)]
    return {
        "depth": depth(gm),
        "layers": len(layers),
        "activations": sum(1 for n in gm.graph.nodes if activation_spec(n, modules) is not None),
        "params": sum(p.numel() for p in gm.parameters()),
        "macs": sum(layer_macs(n, modules[str(n.target)]) for n in layers),
    }


def unique_submodule_name(gm: fx.GraphModule, hint: str) -> str:
    existing = set(dict(gm.named_modules()))
    base = hint.replace(".", "_")
    name, suffix = base, 0
    while name in existing or hasattr(gm, name):
        suffix += 1
        name = f"{base}_{suffix}"
    return name


def insert_module_call(
    gm: fx.GraphModule, before: fx.Node, hint: str, module: nn.Module, args: tuple, *, like: fx.Node | None = None
) -> fx.Node:
    """Register ``module`` under a fresh name and call it on ``args`` just before ``before``.

    ``like``: a node whose output has the same shape; its shape facts are
    copied so later passes in the same run can read them.
    """
    name = unique_submodule_name(gm, hint)
    gm.add_submodule(name, module.train(gm.training))
    with gm.graph.inserting_before(before):
        node = gm.graph.call_module(name, args)
    if like is not None and "tensor_meta" in like.meta:
        node.meta["tensor_meta"] = like.meta["tensor_meta"]
    return node
