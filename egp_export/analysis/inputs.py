"""What one model input batch is, and the few things done with it: count, slice, copy, call the model.

A batch is a tensor (one positional input), a tuple of tensors (several
positional inputs, in the order ``forward`` takes them) or a dict of tensors
(keyword inputs, e.g. ``input_ids``, ``attention_mask``). Every tensor of a
batch holds the same samples along dimension 0. Code that handles batches
goes through these functions, never ``batch[:1]`` or ``model(batch)``, so
that every form works wherever a tensor does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Batch = torch.Tensor | tuple | dict


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
