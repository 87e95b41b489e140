"""Turning what a user calls "calibration data" into validated batches, and holding part out."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from egp_export.errors import CalibrationError

DEFAULT_BATCH_SIZE = 64
# Samples per chunk of the NaN/Inf check of a tensor source.
_CHECK_CHUNK = 256


class Batches(Sequence[torch.Tensor]):
    """Batches of at most ``size`` samples over the sample range [start, stop) of a source, made on access.

    A source is a tensor (batches are views: nothing is copied), a map-style
    Dataset (a batch is stacked from its items when it is used), or a list of
    batches read from an iterable. Only the batch in use is held, so memory does
    not grow with the number of samples for the first two; an iterable has to be
    held, since it may not be iterable twice. Re-iterable, with ``len`` and
    indexing, so the compiler can pass over a part several times.
    """

    def __init__(self, source: _Source, start: int = 0, stop: int | None = None, size: int = DEFAULT_BATCH_SIZE,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.source, self.start = source, start
        self.stop = source.samples if stop is None else stop
        self.size, self.transform = size, transform

    @property
    def samples(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return -(-self.samples // self.size)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        first = self.start + index * self.size
        batch = self.source.take(first, min(first + self.size, self.stop))
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def part(self, start: int, stop: int) -> Batches:
        """The samples [start, stop) of this range (relative to it), batched alike."""
        return Batches(self.source, self.start + start, self.start + stop, self.size, self.transform)

    def shard(self, rank: int, world_size: int) -> Batches:
        """Rank ``rank``'s contiguous share of these samples (shares differ by at most one sample)."""
        return self.part(self.samples * rank // world_size, self.samples * (rank + 1) // world_size)

    def map(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> Batches:
        """The same batches with ``transform`` applied to each as it is made."""
        inner = self.transform
        combined = transform if inner is None else (lambda batch: transform(inner(batch)))
        return Batches(self.source, self.start, self.stop, self.size, combined)


class _Source:
    """Samples 0 .. samples-1, read by range; every batch a source returns has been checked."""

    samples: int

    def take(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class _TensorSource(_Source):
    """One tensor, samples along dim 0: batches are views."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.samples = tensor, len(tensor)

    def take(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


class _ListSource(_Source):
    """Batches already read (from an iterable); a range spanning two of them is concatenated, nothing else copied."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.offsets = list(itertools.accumulate((len(b) for b in batches), initial=0))
        self.samples = self.offsets[-1]

    def take(self, start: int, stop: int) -> torch.Tensor:
        first = bisect.bisect_right(self.offsets, start) - 1
        pieces = []
        for index in range(first, len(self.batches)):
            offset = self.offsets[index]
            if offset >= stop:
                break
            pieces.append(self.batches[index][max(start - offset, 0) : stop - offset])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _DatasetSource(_Source):
    """A map-style Dataset read in index order; a batch is stacked from its items (inputs of (input, target)) on use."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.samples = dataset, len(dataset)
        first = self._item(0)
        self.sample_shape, self.dtype = tuple(first.shape), first.dtype

    def _item(self, index: int) -> torch.Tensor:
        item = _input_of(self.dataset[index], index)
        if item.dim() == 0:
            item = item.reshape(1)
        return item

    def take(self, start: int, stop: int) -> torch.Tensor:
        items = [self._item(i) for i in range(start, stop)]
        for index, item in zip(range(start, stop), items):
            if tuple(item.shape) != self.sample_shape or item.dtype != self.dtype:
                raise CalibrationError(
                    f"calibration sample {index} has shape {tuple(item.shape)} and dtype {item.dtype}, but sample 0 "
                    f"has {self.sample_shape} and {self.dtype}; all samples must share one shape and dtype."
                )
        return _checked(torch.stack(items), f"calibration samples {start}..{stop - 1}")


def _checked(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """``tensor`` when it is a real-valued batch [B, ...] of finite values, else a CalibrationError naming ``what``."""
    if tensor.dim() == 0:
        raise CalibrationError(f"{what} is a scalar; each item must be a batch [B, ...].")
    if tensor.is_complex():
        raise CalibrationError(f"{what} is complex ({tensor.dtype}); give real-valued inputs.")
    bad = sum(count_nonfinite(tensor))
    if bad:
        raise CalibrationError(f"{what} has {bad} NaN/Inf values; clean or drop those samples first.")
    return tensor.detach()


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of ``tensor``, in chunks of samples: a whole-set mask would cost as much memory as the
    data (and a memory-mapped file is read once)."""
    if not tensor.is_floating_point():
        return 0, 0
    nans = infs = 0
    for chunk in torch.split(tensor, _CHECK_CHUNK):
        nans += int(torch.isnan(chunk).sum())
        infs += int(torch.isinf(chunk).sum())
    return nans, infs


@dataclass
class CalibrationSplit:
    """The calibration samples in three disjoint parts, each with one job.

    ``calibrate`` (decide): the activation statistics every rewrite is planned
    on. ``validate``: run only to withdraw rewrites whose neurons leave their
    region there; it never adds one. ``holdout`` (verify): never used to
    decide anything; the final check runs on it.
    """

    calibrate: Batches
    holdout: Batches
    validate: Batches

    @property
    def calibration_samples(self) -> int:
        """Samples the compile learned from: decided on or validated on."""
        return self.decide_samples + self.validation_samples

    @property
    def decide_samples(self) -> int:
        return self.calibrate.samples

    @property
    def validation_samples(self) -> int:
        return self.validate.samples

    @property
    def holdout_samples(self) -> int:
        return self.holdout.samples


def _input_of(item, index: int) -> torch.Tensor:
    # (input, target) tuples from datasets/DataLoaders: the input is first.
    if isinstance(item, (tuple, list)):
        if not item:
            raise CalibrationError(f"calibration item {index} is an empty tuple; expected a tensor or (input, target).")
        item = item[0]
    if isinstance(item, dict):
        raise CalibrationError(
            f"calibration item {index} is a dict; pass tensors or (input, target) tuples "
            "(e.g. a generator yielding batch['input'])."
        )
    if not isinstance(item, torch.Tensor):
        try:
            item = torch.as_tensor(item)
        except Exception:
            raise CalibrationError(
                f"calibration item {index} is a {type(item).__name__}, not a tensor; "
                "pass a tensor batch, an iterable of tensors or (input, target) tuples, or a DataLoader."
            ) from None
    return item


def as_batches(calibration, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Batches:
    """Checked batches ``[B, ...]`` from a tensor, a map-style Dataset, an iterable of tensors / (x, y), or a DataLoader.

    Samples keep their dtype (integer token ids stay integers). A tensor is
    cut into ``batch_size`` views and a map-style Dataset (or a DataLoader over
    one that gives every sample once with the default collate function: a
    sequential or shuffling sampler, no drop_last; it is read in index order)
    is read a batch at a time, so neither is copied or held whole; any other
    iterable (a loader with its own sampler or collate function, a generator)
    is read once and held. Tensors and iterables are
    checked up front (shape, NaN/Inf), a Dataset's batches as they are read.
    """
    if isinstance(calibration, (str, bytes)):
        raise CalibrationError("calibration must be tensors, not a path; load the file first (egp_export.io.datasets).")
    if isinstance(calibration, Batches):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return _nonempty(Batches(_TensorSource(_checked(calibration, "calibration item 0")), size=batch_size))
    dataset = _map_style_dataset(calibration)
    if dataset is not None:
        if not len(dataset):
            raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
        return Batches(_DatasetSource(dataset), size=batch_size)
    try:
        items = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration of type {type(calibration).__name__} is not iterable; pass a tensor batch, "
            "a Dataset, an iterable of tensors or (input, target) tuples, or a DataLoader."
        ) from None
    batches: list[torch.Tensor] = []
    sample_shape: tuple[int, ...] | None = None
    for index, item in enumerate(items):
        tensor = _checked(_input_of(item, index), f"calibration item {index}")
        if sample_shape is None:
            sample_shape = tuple(tensor.shape[1:])
        elif tuple(tensor.shape[1:]) != sample_shape:
            raise CalibrationError(
                f"calibration item {index} has samples of shape {tuple(tensor.shape[1:])}, "
                f"but earlier items have {sample_shape}; all samples must share one shape."
            )
        if len(tensor):
            batches.append(tensor)
    if not batches:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    return Batches(_ListSource(batches), size=batch_size)


def _nonempty(batches: Batches) -> Batches:
    if not batches.samples:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    return batches


def _map_style_dataset(calibration) -> Dataset | None:
    """The map-style Dataset to read by index: the object itself, or a plain DataLoader's dataset."""
    if isinstance(calibration, DataLoader):
        from torch.utils.data import RandomSampler, SequentialSampler, default_collate

        dataset, sampler = calibration.dataset, calibration.sampler
        # Read in index order only when the loader would give every sample once, collated the default way.
        every_sample = isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None
        )
        plain = (
            every_sample and calibration.collate_fn is default_collate and calibration.batch_size is not None
            and not calibration.drop_last
        )
        return dataset if plain and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") else None
    if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset) and hasattr(calibration, "__len__"):
        return calibration
    return None


def split_holdout(batches: Batches | list[torch.Tensor], holdout: float, validation: float = 0.0) -> CalibrationSplit:
    """Hold out the last ``holdout`` fraction of samples (at least one) for verification,
    and the ``validation`` fraction before them (at least one when asked for) for validation.

    The parts are ranges of the same source (nothing is copied). ``holdout=0``
    verifies on the calibration data itself, which only checks the rewrite, not
    the claim that activations stay linear on unseen inputs.
    """
    for name, fraction in (("holdout", holdout), ("validation", validation)):
        if not 0.0 <= fraction < 1.0:
            raise CalibrationError(f"{name} fraction must be in [0, 1), got {fraction}.")
    if not isinstance(batches, Batches):
        batches = Batches(_ListSource(list(batches)), size=max(len(b) for b in batches))
    total = batches.samples
    held = max(1, round(total * holdout)) if holdout > 0 else 0
    validated = max(1, round(total * validation)) if validation > 0 else 0
    if held + validated >= total:
        raise CalibrationError(
            f"only {total} calibration sample(s): too few to keep {holdout:.0%} for verification and "
            f"{validation:.0%} for validation and still decide on the rest; pass more samples or smaller fractions."
        )
    decide_end = total - held - validated
    calibrate = batches.part(0, decide_end)
    return CalibrationSplit(
        calibrate=calibrate,
        holdout=batches.part(total - held, total) if held else calibrate,
        validate=batches.part(decide_end, total - held),
    )
