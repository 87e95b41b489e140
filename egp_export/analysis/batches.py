"""Turning what a user calls "calibration data" into validated batches, and splitting them (seeded) three ways."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from egp_export.errors import CalibrationError

DEFAULT_BATCH_SIZE = 64
# Seeds the permutation that splits the calibration samples (compile's split_seed, the CLI's --split-seed).
DEFAULT_SPLIT_SEED = 0
# Samples per chunk of the NaN/Inf check of a tensor source.
_CHECK_CHUNK = 256


class Batches(Sequence[torch.Tensor]):
    """Batches of at most ``size`` samples, gathered from a source through an index array when they are used.

    ``order`` lists sample indices of the source (None: 0, 1, 2, ...); these
    batches hold its positions [start, stop). A source is a tensor (a batch
    gathers its rows with index_select: a memory-mapped array is read only
    for them), a map-style Dataset (a batch is stacked from its items), or a
    list of batches read from an iterable. Every batch is a fresh tensor:
    a model that writes into its input (``x.sub_(mean)``) never changes the
    caller's data, and only the batch in use is held, so memory does not grow
    with the number of samples for the first two (an iterable has to be held,
    since it may not be iterable twice). Re-iterable, with ``len`` and
    indexing, so the compiler can pass over a part several times. With
    ``digests`` every sample read is hashed once (:class:`SampleDigests`).
    """

    def __init__(self, source: _Source, start: int = 0, stop: int | None = None, size: int = DEFAULT_BATCH_SIZE,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, *, order: torch.Tensor | None = None,
                 digests: SampleDigests | None = None) -> None:
        self.source, self.start, self.order = source, start, order
        self.stop = (source.samples if order is None else len(order)) if stop is None else stop
        self.size, self.transform, self.digests = size, transform, digests

    @property
    def samples(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> torch.Tensor:
        """The source's sample indices these batches hold, in the order they are read (int64)."""
        return self._indices(self.start, self.stop)

    def _indices(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop) if self.order is None else self.order[start:stop]

    def batch_indices(self, index: int) -> torch.Tensor:
        """The source's sample indices batch ``index`` holds."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        first = self.start + index * self.size
        return self._indices(first, min(first + self.size, self.stop))

    def __len__(self) -> int:
        return -(-self.samples // self.size)

    def __getitem__(self, index: int) -> torch.Tensor:
        indices = self.batch_indices(index)
        batch = self.source.take(indices)
        if self.digests is not None:
            self.digests.record(indices, batch)
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def _like(self, start: int, stop: int, transform=None, order=None, digests=None) -> Batches:
        return Batches(self.source, start, stop, self.size, transform or self.transform,
                       order=self.order if order is None else order, digests=digests or self.digests)

    def part(self, start: int, stop: int) -> Batches:
        """The samples at positions [start, stop) of these (relative to them), batched alike."""
        return self._like(self.start + start, self.start + stop)

    def shard(self, rank: int, world_size: int) -> Batches:
        """Rank ``rank``'s contiguous share of these samples (shares differ by at most one sample)."""
        return self.part(self.samples * rank // world_size, self.samples * (rank + 1) // world_size)

    def map(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> Batches:
        """The same batches with ``transform`` applied to each as it is made."""
        inner = self.transform
        combined = transform if inner is None else (lambda batch: transform(inner(batch)))
        return self._like(self.start, self.stop, transform=combined)

    def select(self, indices: torch.Tensor, digests: SampleDigests | None = None) -> Batches:
        """The source's samples ``indices`` (int64, e.g. a compile's held-out samples), batched alike."""
        return self._like(0, len(indices), order=torch.as_tensor(indices, dtype=torch.int64), digests=digests)


class _Source:
    """Samples 0 .. samples-1, gathered by index; every batch a source returns is a fresh, checked tensor."""

    samples: int

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _TensorSource(_Source):
    """One tensor, samples along dim 0: a batch gathers its rows (a memory-mapped array is read for them only)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.samples = tensor, len(tensor)

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, indices.to(self.tensor.device))


class _ListSource(_Source):
    """Batches already read (from an iterable); a batch gathers its rows from the held batches they lie in."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.offsets = torch.tensor(list(itertools.accumulate((len(b) for b in batches), initial=0)))
        self.samples = int(self.offsets[-1])

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        held = torch.searchsorted(self.offsets, indices, right=True) - 1
        runs, counts = torch.unique_consecutive(held, return_counts=True)
        pieces, first = [], 0
        for which, count in zip(runs.tolist(), counts.tolist()):
            rows = indices[first : first + count] - self.offsets[which]
            pieces.append(self.batches[which].index_select(0, rows.to(self.batches[which].device)))
            first += count
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class _DatasetSource(_Source):
    """A map-style Dataset read by index; a batch is stacked from its items (inputs of (input, target)) on use."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset, self.samples = dataset, len(dataset)
        first = self._item(0)
        self.sample_shape, self.dtype = tuple(first.shape), first.dtype

    def _item(self, index: int) -> torch.Tensor:
        item = _input_of(self.dataset[index], index)
        if item.dim() == 0:
            item = item.reshape(1)
        return item

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.tolist()
        items = [self._item(i) for i in indices]
        for index, item in zip(indices, items):
            if tuple(item.shape) != self.sample_shape or item.dtype != self.dtype:
                raise CalibrationError(
                    f"calibration sample {index} has shape {tuple(item.shape)} and dtype {item.dtype}, but sample 0 "
                    f"has {self.sample_shape} and {self.dtype}; all samples must share one shape and dtype."
                )
        return _checked(torch.stack(items), f"calibration samples {_named(indices)}")


def _named(indices: list[int]) -> str:
    """'8..11' for a run of consecutive indices, else the indices (the first eight)."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")


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


class SampleDigests:
    """One digest per sample of a source, filled in as batches are read: duplicated samples told apart cheaply.

    A digest is 62 bits of the SHA-1 hash of the sample's bytes (never 0,
    which marks a sample not read yet); each sample is hashed once, when its
    batch is first read, before any model sees it. One int64 per sample is
    held, never the samples. SHA-1 only tells samples apart here, it protects
    nothing: it is hashlib's fastest digest on CPUs with SHA extensions
    (about twice blake2b's speed).
    """

    def __init__(self, samples: int) -> None:
        self.values = torch.zeros(samples, dtype=torch.int64)

    def record(self, indices: torch.Tensor, batch: torch.Tensor) -> None:
        missing = (self.values[indices] == 0).nonzero().flatten().tolist()
        if not missing:
            return
        rows = batch.detach().cpu().contiguous()
        rows = rows.reshape(len(rows), -1).view(torch.uint8).numpy()
        for row in missing:
            digest = int.from_bytes(hashlib.sha1(rows[row], usedforsecurity=False).digest()[:8], "little")
            self.values[indices[row]] = (digest >> 2) + 1

    def of(self, part: Batches) -> torch.Tensor:
        """The digests of ``part``'s samples (a ``Batches`` recording into these), reading any batch not read yet."""
        for index in range(len(part)):
            if bool((self.values[part.batch_indices(index)] == 0).any()):
                part[index]
        return self.values[part.indices]

    def merge(self, runtime, part: Batches) -> None:
        """Every rank's digests of ``part`` (ranks read disjoint shares of it): the union, by a max over ranks."""
        indices = part.indices
        self.values[indices] = runtime.max(self.values[indices])


@dataclass(frozen=True)
class SplitIndices:
    """Which calibration samples (indices into the data as given) each part of a compile's split holds."""

    seed: int
    decide: torch.Tensor
    validate: torch.Tensor
    holdout: torch.Tensor


@dataclass
class CalibrationSplit:
    """The calibration samples in three disjoint parts, each with one job.

    ``calibrate`` (decide): the activation statistics every rewrite is planned
    on. ``validate``: run only to withdraw rewrites whose neurons leave their
    region there; it never adds one. ``holdout`` (verify): never used to
    decide anything; the final check runs on it. ``digests`` hash every
    sample the parts read, so duplicates count once as evidence.
    """

    calibrate: Batches
    holdout: Batches
    validate: Batches
    seed: int = DEFAULT_SPLIT_SEED
    digests: SampleDigests | None = None

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

    def indices(self) -> SplitIndices:
        held = self.holdout.indices if self.holdout is not self.calibrate else torch.zeros(0, dtype=torch.int64)
        return SplitIndices(self.seed, self.calibrate.indices, self.validate.indices, held)

    def distinct_decide_samples(self) -> int:
        return int(self.digests.of(self.calibrate).unique().numel())

    def distinct_holdout_samples(self) -> tuple[int, int]:
        """(distinct held-out samples, those of them not among the decide samples: what verifies something new)."""
        held = self.digests.of(self.holdout).unique()
        unseen = torch.isin(held, self.digests.of(self.calibrate), invert=True)
        return int(held.numel()), int(unseen.sum())


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
    gathered ``batch_size`` rows at a time and a map-style Dataset (or a DataLoader over
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


def split_holdout(
    batches: Batches | list[torch.Tensor], holdout: float, validation: float = 0.0, *, seed: int = DEFAULT_SPLIT_SEED
) -> CalibrationSplit:
    """Split the samples three ways by a seeded permutation: the ``holdout`` fraction (at least one) for
    verification, the ``validation`` fraction (at least one when asked for) for validation, the rest to decide on.

    The permutation is ``torch.randperm`` under a generator seeded with
    ``seed``: the same split on every run and every process (of one torch
    version). Data sorted by class (an image folder) give every part samples
    of every class, where the tail in index order held out the last class
    only. Each part reads its samples in index order, through its index array
    (nothing is copied up front), and hashes each one it reads
    (:class:`SampleDigests`). ``holdout=0`` verifies on the decide samples
    themselves, which only checks the rewrite, not the claim that
    activations stay linear on unseen inputs.
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
    shuffled = batches.indices[torch.randperm(total, generator=torch.Generator().manual_seed(seed))]
    parts = (shuffled[:decide_end], shuffled[decide_end : total - held], shuffled[total - held :])
    digests = SampleDigests(batches.source.samples)
    ordered = batches.select(torch.cat([part.sort().values for part in parts]), digests)
    calibrate = ordered.part(0, decide_end)
    return CalibrationSplit(
        calibrate=calibrate,
        holdout=ordered.part(total - held, total) if held else calibrate,
        validate=ordered.part(decide_end, total - held),
        seed=seed,
        digests=digests,
    )
