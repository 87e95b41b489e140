"""What one model input batch is, and the few things done with it: count, slice, copy, call the model.

A batch is a tensor (one positional input), a tuple of tensors (several
positional inputs, in the order ``forward`` takes them) or a dict of tensors
(keyword inputs, e.g. ``input_ids``, ``attention_mask``). Every tensor of a
batch holds the same samples along dimension 0. Code that handles batches
goes through these functions, never ``batch[:1]`` or ``model(batch)``, so
that every form works wherever a tensor does. ``signature`` says which inputs
a model's ``forward`` takes (analysis/batches.py reads calibration items by
it), ``positional`` lays a batch out as the arguments an ``fx.Interpreter``
runs on (one per placeholder).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Batch = torch.Tensor | tuple | dict

_NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


@dataclass(frozen=True)
class Signature:
    """The named inputs of a model's ``forward``, in order, and which of them have no default.

    ``*args`` and ``**kwargs`` are not named inputs: a model taking only those
    has none, and is read like a one-input model.
    """

    names: tuple[str, ...]
    required: tuple[str, ...]
    defaults: tuple[tuple[str, object], ...] = ()

    @property
    def several(self) -> bool:
        """Whether ``forward`` names more than one input (then a dict item may hold keyword inputs)."""
        return len(self.names) > 1

    def default(self, name: str):
        return dict(self.defaults)[name]


def signature(model) -> Signature:
    """The named inputs of ``model.forward`` (a GraphModule's forward names one per placeholder)."""
    forward = getattr(model, "forward", model)
    try:
        parameters = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C++ forward: nothing to read
        return Signature((), ())
    named = [p for p in parameters if p.kind in _NAMED]
    return Signature(
        tuple(p.name for p in named),
        tuple(p.name for p in named if p.default is inspect.Parameter.empty),
        tuple((p.name, p.default) for p in named if p.default is not inspect.Parameter.empty),
    )


def leaves(batch: Batch) -> list[torch.Tensor]:
    """The batch's tensors, in order (a dict in its key order)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return list(batch.values())
    return list(batch)


def structured(batch: Batch, apply: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """``apply`` to every tensor of the batch, the structure kept."""
    if isinstance(batch, torch.Tensor):
        return apply(batch)
    if isinstance(batch, dict):
        return {key: apply(value) for key, value in batch.items()}
    return tuple(apply(value) for value in batch)


def with_leaves(batch: Batch, replacements: Sequence[torch.Tensor]) -> Batch:
    """``batch``'s structure holding ``replacements`` (one per tensor, in ``leaves`` order)."""
    given = iter(replacements)
    return structured(batch, lambda _: next(given))


def batch_size(batch: Batch) -> int:
    """How many samples the batch holds (dimension 0 of its tensors)."""
    return int(leaves(batch)[0].shape[0])


def take(batch: Batch, index: slice | torch.Tensor) -> Batch:
    """Samples ``index`` (a slice or an index tensor) of every tensor of the batch."""
    return structured(batch, lambda tensor: tensor[index])


def clone(batch: Batch) -> Batch:
    """A copy a model may write into (``x.sub_(mean)``) without changing the caller's batch."""
    return structured(batch, torch.Tensor.clone)


def call(model, batch: Batch):
    """``model`` on the batch: model(x), model(*inputs) or model(**inputs)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(*batch)


def call_on_copy(model, batch: Batch):
    """``model`` on a copy of the batch: a model may write into its input, the caller's batch stays as it is."""
    return call(model, clone(batch))


def sample_shape(batch: Batch) -> list | dict:
    """The shape of one sample: a list for a tensor, a list of lists for a tuple, a dict of lists for a dict."""
    if isinstance(batch, torch.Tensor):
        return list(batch.shape[1:])
    if isinstance(batch, dict):
        return {key: list(value.shape[1:]) for key, value in batch.items()}
    return [list(value.shape[1:]) for value in batch]


def positional(model, batch: Batch) -> tuple:
    """The batch as ``model``'s positional arguments (``fx.Interpreter.run``, ``ShapeProp.propagate`` take no keywords):
    a dict is laid out in ``forward``'s order, an input it leaves out before one it gives taking its default."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if not isinstance(batch, dict):
        return tuple(batch)
    taken = signature(model)
    last = max((taken.names.index(key) for key in batch if key in taken.names), default=-1)
    return tuple(batch[name] if name in batch else taken.default(name) for name in taken.names[: last + 1])


def concat(batches: Sequence[Batch]) -> Batch:
    """The batches' samples in order, as one batch of their structure (torch.cat of each input)."""
    return _zip(batches, torch.cat)


def stack(samples: Sequence[Batch]) -> Batch:
    """One batch from single samples (each without a batch dimension), torch.stack of each input."""
    return _zip(samples, torch.stack)


def _zip(parts: Sequence[Batch], combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> Batch:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return combine(list(parts))
    if isinstance(first, dict):
        return {key: combine([part[key] for part in parts]) for key in first}
    return tuple(combine([part[i] for part in parts]) for i in range(len(first)))


def names(batch: Batch) -> list[str]:
    """A name per tensor of the batch, in ``leaves`` order: "input", the dict's keys, or "input 0", "input 1", ..."""
    if isinstance(batch, torch.Tensor):
        return ["input"]
    if isinstance(batch, dict):
        return [str(key) for key in batch]
    return [f"input {i}" for i in range(len(batch))]


def model_input_names(model, batch: Batch) -> list[str]:
    """The names a model's inputs go by (an ONNX file's inputs, ``dynamic_dims`` keys): "input" for one tensor, a
    dict's keys, a tuple's ``forward`` parameter names ("input_0", ... when forward has fewer)."""
    if isinstance(batch, torch.Tensor):
        return ["input"]
    if isinstance(batch, dict):
        return [str(key) for key in batch]
    parameters = signature(model).names
    return list(parameters[: len(batch)]) if len(parameters) >= len(batch) else [f"input_{i}" for i in range(len(batch))]


def form(batch: Batch) -> tuple:
    """What two batches of one calibration set share: structure, and each input's sample shape and dtype."""
    kind = "tensor" if isinstance(batch, torch.Tensor) else "dict" if isinstance(batch, dict) else "tuple"
    return kind, tuple((name, tuple(leaf.shape[1:]), leaf.dtype) for name, leaf in zip(names(batch), leaves(batch)))


def describe(batch: Batch) -> str:
    """One sample's shapes and dtypes for a message: "shape (8,) and dtype int64", or "name (8,) int64" per input."""
    if isinstance(batch, torch.Tensor):
        return f"shape {tuple(batch.shape[1:])} and dtype {str(batch.dtype).removeprefix('torch.')}"
    return ", ".join(
        f"{name} {tuple(leaf.shape[1:])} {str(leaf.dtype).removeprefix('torch.')}"
        for name, leaf in zip(names(batch), leaves(batch))
    )


def floating(batch: Batch) -> list[bool]:
    """Per tensor of the batch, whether it holds floating-point values (token ids and masks do not)."""
    return [leaf.is_floating_point() for leaf in leaves(batch)]
