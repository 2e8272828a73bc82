"""User data -> batches: tensor pairs, datasets, fraction splits, unpacking, device moves."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    random_split,
)

__all__ = [
    "BatchAt",
    "ShardSampler",
    "TensorBatches",
    "default_unpack",
    "fast_forward_problem",
    "generators_of",
    "length",
    "pass_state",
    "resolve_data",
    "resume_batches",
    "set_epoch",
    "split_validation",
    "to_device",
]

DEFAULT_BATCH_SIZE = 32


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor) or type(x).__module__ == "numpy" and hasattr(x, "shape")


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and all(_is_array(x) for x in data)


def _tensor_dataset(data: tuple[Any, Any], name: str) -> TensorDataset:
    inputs, targets = (torch.as_tensor(x) for x in data)
    if len(inputs) != len(targets):
        raise ValueError(
            f"{name}: inputs and targets must have the same length (first dimension), got "
            f"{len(inputs)} inputs and {len(targets)} targets"
        )
    return TensorDataset(inputs, targets)


def resolve_data(
    data: Any,
    *,
    name: str,
    batch_size: int | None,
    shuffle: bool,
    device: torch.device,
    epochs: int = 1,
    shard: tuple[int, int] | None = None,
) -> Iterable[Any]:
    """Turn what the user passed as ``name`` into something that iterates over batches.

    A ``(inputs, targets)`` pair of tensors or arrays, a tensor of inputs alone, or a
    map-style ``Dataset``, is batched
    (``batch_size``, default 32; shuffled when ``shuffle``; the last partial batch kept).
    A DataLoader or any other re-iterable of batches is used as it is.

    ``shard=(rank, world_size)`` (DDP) gives this rank its share: for training
    (``shuffle``) as ``DistributedSampler`` does (equal shares, the last padded with samples
    from the start; ``batch_size`` per process), for validation and prediction every
    ``world_size``-th sample from ``rank`` on, each sample once.
    """
    if _is_tensor_pair(data):
        data = _tensor_dataset(data, name)
    elif _is_array(data):  # inputs alone (predict): batches of (input,)
        data = TensorDataset(torch.as_tensor(data))
    if isinstance(data, Dataset):
        iterable = isinstance(data, IterableDataset)
        size_of_data = None if iterable else length(data)
        if not iterable and size_of_data is None:
            raise TypeError(f"{name}: a map-style Dataset needs __len__; {type(data).__name__} has none")
        if size_of_data == 0:
            raise ValueError(f"{name} is empty (a Dataset of length 0); pass at least one sample")
        size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        in_memory = None if iterable else _tensors_of(data)
        if in_memory is not None:  # indexed directly: no per-sample __getitem__ and collate
            tensors, indices = in_memory
            pin = device.type == "cuda" and tensors[0].device.type == "cpu"
            return TensorBatches(tensors, indices, batch_size=size, shuffle=shuffle, pin=pin, shard=shard)
        # Pin host memory for fast non-blocking copies to the GPU.
        pin = device.type == "cuda"
        if shard is not None:
            if iterable:
                raise TypeError(_unshardable(name, data))
            sampler = _shard_sampler(data, shard, shuffle)
            return DataLoader(data, batch_size=size, sampler=sampler, pin_memory=pin)
        return DataLoader(data, batch_size=size, shuffle=shuffle and not iterable, pin_memory=pin)
    if batch_size is not None:
        raise ValueError(
            f"batch_size={batch_size!r} was given, but {name} is already batched "
            f"({type(data).__name__}); set the batch size where you build it, or pass a "
            "Dataset or an (inputs, targets) pair to have corolux batch it"
        )
    if shard is not None:
        if isinstance(data, DataLoader):
            return _sharded_loader(data, shard, shuffle, name)
        raise TypeError(_unshardable(name, data))
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"{name} must be a DataLoader, a Dataset, an (inputs, targets) pair of tensors or "
            f"an iterable of batches, got {type(data).__name__}: {_short(data)}"
        )
    if isinstance(data, Iterator) and epochs > 1:
        raise TypeError(
            f"{name} is a one-shot iterator ({type(data).__name__}), which can be read only "
            f"once, but {epochs} epochs were asked for; pass a list, a Dataset or a DataLoader"
        )
    if length(data) == 0:
        raise ValueError(f"{name} is empty (no batches); pass at least one batch")
    return data


class TensorBatches:
    """Batches of in-memory tensors, made by indexing them: how corolux batches a tensor pair,
    inputs alone, a ``TensorDataset`` or a ``Subset`` of one (what ``valid_data=0.2`` makes),
    instead of a ``DataLoader`` that would call ``__getitem__`` per sample and collate.

    Each pass draws from torch's global RNG exactly what ``DataLoader(dataset, batch_size,
    shuffle=shuffle)`` draws, in the same order: its iterator's base seed at ``iter()``, and,
    when shuffled, its sampler's seed at the first batch, then one ``randperm`` from a
    generator seeded with it. So a run is bit-identical to the textbook ``DataLoader`` loop
    from the same seed. Shuffled batches are gathered with ``index_select``, up to 512 batches
    (about 1 MiB at most) in one copy that each batch is a view of; unshuffled batches of plain
    tensors are slices, views of your tensors (change ``ctx.input`` out of place). The last
    partial batch is kept. Tensors already on the device are batched there; with ``pin``, CPU
    tensors are gathered into pinned memory, a block per batch, for the loop's non-blocking
    copy to the GPU.

    Example:
        >>> import torch
        >>> batches = TensorBatches((torch.arange(5.0), torch.arange(5)), None, batch_size=2, shuffle=False)
        >>> len(batches), [tuple(x.tolist()) for x, _ in batches]
        (3, [(0.0, 1.0), (2.0, 3.0), (4.0,)])
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        indices: torch.Tensor | None,
        *,
        batch_size: int,
        shuffle: bool,
        pin: bool = False,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.tensors = tensors
        self.indices = indices  # the rows a Subset keeps, in its order (None: all of them)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pin = pin
        total = len(tensors[0]) if indices is None else len(indices)
        #: Under DDP (``shard=(rank, world_size)``): training shuffles and pads as
        #: ``DistributedSampler`` does (its ``set_epoch`` reshuffles); validation takes every
        #: ``world_size``-th row from ``rank`` on.
        self.sampler: Any = None  # the rows of this rank's share, as a DataLoader's sampler
        if shard is not None:
            positions: Any = range(total)  # all a sampler needs of a dataset: its length
            self.sampler = _shard_sampler(positions, shard, shuffle)
        self.size = total if self.sampler is None else len(self.sampler)

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self.iter_from(0)

    def iter_from(
        self, skip: int, then: Callable[[], None] | None = None
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """The pass that ``iter()`` starts, with its first ``skip`` batches left out by index
        (nothing is gathered for them); ``then()`` runs once they are, before the next batch
        is made (a resume sets the RNG state there)."""
        torch.empty((), dtype=torch.int64).random_()  # as DataLoader's iterator draws its base seed
        return self._batches(skip, then)

    def _batches(self, skip: int, then: Callable[[], None] | None) -> Iterator[tuple[torch.Tensor, ...]]:
        size, step = self.size, self.batch_size
        rows = self.indices
        if self.sampler is not None:  # this rank's share (DDP)
            rows = self._share(rows)
        elif self.shuffle:  # RandomSampler: a seed drawn at the first batch, then one randperm
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # sync-ok: a CPU tensor
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            rows = order if rows is None else rows[order.to(rows.device)]
        if then is not None:
            then()
        first = skip * step
        tensors = self.tensors
        if rows is not None:
            rows = rows.to(tensors[0].device)
        if self.pin:  # each batch copied into a pinned block of its own (the non-blocking copy)
            for start in range(first, size, step):
                if rows is None:
                    yield self._slice(start, start + step)
                else:
                    yield self._gather(rows[start : start + step])
            return
        # Up to 512 batches at a time (each torch op costs microseconds of dispatch, more among a
        # real step's ops than a small batch's copy does): unshuffled plain tensors are sliced
        # into views of them; shuffled rows (or a Subset's) are gathered, one index_select per
        # tensor for up to 512 batches (about 1 MiB at most), then split into views of the gather.
        if rows is None:
            span = step * _CHUNK_BATCHES
            for begin in range(first, size, span):
                yield from _split([t[begin : begin + span] for t in tensors], step)
            return
        span = step * self._chunk_batches
        for begin in range(first, size, span):
            chunk = rows[begin : begin + span]
            yield from _split([t.index_select(0, chunk) for t in tensors], step)

    def _share(self, rows: torch.Tensor | None) -> torch.Tensor:
        """This rank's rows (of the Subset's ``rows`` when there are some)."""
        share = torch.tensor(list(self.sampler), dtype=torch.long)
        return share if rows is None else rows[share.to(rows.device)]

    @property
    def _chunk_batches(self) -> int:
        """How many shuffled batches one gather makes: up to 512, within about 1 MiB."""
        row_bytes = sum(t.element_size() * t[0].numel() for t in self.tensors if len(t))
        return max(1, min(_CHUNK_BATCHES, _CHUNK_BYTES // max(1, row_bytes * self.batch_size)))

    def _slice(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows ``start:stop`` copied into pinned memory (``pin``)."""
        return tuple(_pinned(t[start:stop].shape, t).copy_(t[start:stop]) for t in self.tensors)

    def _gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``rows`` gathered into pinned memory (``pin``)."""
        return tuple(
            torch.index_select(t, 0, rows, out=_pinned((len(rows), *t.shape[1:]), t)) for t in self.tensors
        )

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"TensorBatches({shapes}, batch_size={self.batch_size}, shuffle={self.shuffle})"


class BatchAt:
    """One training batch at its place in a pass: the ``index``-th (1-based) of ``total``
    batches (None: a pass without a length). What ``Stepper.from_capture`` trains on: a pass
    resumed after ``index - 1`` batches (:func:`resume_batches`) yields this batch alone and
    ends; ``len()`` is the whole pass's, so the counters read as in the run it came from.

    Example:
        >>> data = BatchAt((torch.zeros(2, 3), torch.zeros(2)), index=4, total=10)
        >>> len(data), len(list(resume_batches(data, pass_state(data), 3, lambda: None)))
        (10, 1)
    """

    def __init__(self, batch: Any, index: int, total: int | None) -> None:
        self.batch = batch
        self.index = index
        self.total = total

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("BatchAt: the pass it comes from has no length")
        return self.total

    def __iter__(self) -> Iterator[Any]:
        raise TypeError(
            f"BatchAt holds batch {self.index} alone, not the batches before it: it is read by a "
            "pass resumed after them (Stepper.from_capture runs one)"
        )

    def iter_from(self, skip: int, then: Callable[[], None]) -> Iterator[Any]:
        """The pass resumed after ``skip`` batches, which must be those before this one:
        ``then()`` runs, then the batch comes."""
        if skip != self.index - 1:
            raise ValueError(f"BatchAt holds batch {self.index}, not the one after {skip} batches")
        then()
        yield self.batch

    def __repr__(self) -> str:
        total = "?" if self.total is None else self.total
        return f"BatchAt(batch {self.index}/{total})"


# Against 32 batches at a time, on benchmarks/overhead.py's workloads (shuffled): the MLP's
# batches (8.5 KiB each, 120 to a gather) -1.5 us/step, the Linear's (320 B, 512 to a gather)
# -3.0. A larger gather (4 MiB: 481 MLP batches) gained nothing more on the MLP (+0.0 [-1.1, +1.5]).
# The byte cap bounds the copy that a pass holds besides your tensors.
_CHUNK_BATCHES = 512  # batches made at a time (sliced, or gathered then split)
_CHUNK_BYTES = 1 << 20  # what one gather of shuffled batches copies at most (unless one batch is more)


def _split(pieces: list[torch.Tensor], step: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches of ``step`` rows of ``pieces`` (one per tensor, the same rows): views made by
    one ``split`` per tensor, so that a batch costs a tuple and no torch op."""
    return zip(*[piece.split(step) for piece in pieces], strict=True)


def _pinned(shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Page-locked host memory for one batch (from torch's caching host allocator, which keeps a
    block until the non-blocking copy reading it has finished)."""
    return torch.empty(shape, dtype=like.dtype, pin_memory=True)


def _tensors_of(data: Dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
    """The tensors and kept rows of a ``TensorDataset`` or a ``Subset`` (of a ``Subset``...) of
    one; None for any other dataset (a subclass may override ``__getitem__``)."""
    indices: torch.Tensor | None = None
    while type(data) is Subset:
        kept = torch.as_tensor(data.indices, dtype=torch.long)
        indices = kept if indices is None else kept[indices]
        data = data.dataset
    if type(data) is not TensorDataset:
        return None
    tensors = data.tensors
    if indices is not None:
        indices = indices.to(tensors[0].device)
    return tensors, indices


def length(data: Any) -> int | None:
    """The number of batches in ``data``, or None when it cannot tell (e.g. an iterable dataset)."""
    try:
        return len(data)
    except TypeError:
        return None


def split_validation(
    data: Any, fraction: float, *, seed: int, batch_size: int | None, device: torch.device
) -> tuple[Any, Any]:
    """Split ``fraction`` of ``data`` off as validation data (``valid_data=0.2``).

    Tensor pairs and Datasets are split with ``random_split`` seeded by ``seed``; a DataLoader
    has its dataset split and both loaders rebuilt with its batch size, collate function and
    workers.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"valid_data as a fraction must be in (0, 1), got {fraction!r}")
    loader = data if isinstance(data, DataLoader) else None
    if _is_tensor_pair(data):
        data = _tensor_dataset(data, "train_data")
    if loader is not None:
        data = loader.dataset
    if not (isinstance(data, Dataset) and hasattr(data, "__len__")):
        raise TypeError(
            f"valid_data={fraction!r} splits the training data, which must then be an "
            f"(inputs, targets) pair, a Dataset or a DataLoader over a Dataset; got "
            f"{type(data).__name__}. Pass the validation batches as valid_data instead"
        )
    n = len(data)  # type: ignore[arg-type]
    n_valid = round(n * fraction)
    if n_valid == 0 or n_valid == n:
        raise ValueError(
            f"valid_data={fraction!r} of {n} samples leaves an empty split; use a fraction "
            "that keeps at least one sample on each side"
        )
    generator = torch.Generator().manual_seed(seed)
    train_part, valid_part = random_split(data, [n - n_valid, n_valid], generator=generator)
    if loader is None:
        return train_part, valid_part
    if batch_size is not None:
        raise ValueError(
            "batch_size was given with a DataLoader; the split keeps the loader's own batch size"
        )
    if loader.batch_size is None:
        raise TypeError(
            f"valid_data={fraction!r} cannot split a DataLoader built with a batch_sampler "
            f"({type(loader.batch_sampler).__name__}); pass the validation data as its own DataLoader"
        )

    options: dict[str, Any] = {
        "batch_size": loader.batch_size,
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "drop_last": loader.drop_last,
        "persistent_workers": loader.persistent_workers,
    }
    shuffled = isinstance(loader.sampler, torch.utils.data.RandomSampler)
    return (
        DataLoader(train_part, shuffle=shuffled, **options),
        DataLoader(valid_part, shuffle=False, **options),
    )


def default_unpack(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(input, target)``: a tuple/list of 2 or 1, a bare tensor (the
    input alone, as ``DataLoader(x)`` yields), or a dict with the keys ``"input"`` and
    ``"target"``."""
    kind = type(batch)
    if kind is tuple or kind is list:
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    elif isinstance(batch, torch.Tensor):
        return batch, None
    elif isinstance(batch, Mapping) and "input" in batch:
        return batch["input"], batch.get("target")
    elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return (batch[0], batch[1]) if len(batch) == 2 else (batch[0], None)
    raise TypeError(
        f"cannot split a batch of type {kind.__name__} ({_short(batch)}) into (input, target): "
        "a batch must be a tuple or list of 2 (input, target) or 1 (input,), or a dict with "
        "the keys 'input' and 'target'. For any other layout pass "
        "Trainer(unpack=lambda batch: (input, target))"
    )


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors in ``obj`` (nested tuples, lists, dicts) to ``device``, asynchronously."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(to_device(x, device) for x in obj))
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, Mapping):
        moved = {k: to_device(v, device) for k, v in obj.items()}
        return moved if type(obj) is dict else _same_mapping(obj, moved)
    return obj


def _same_mapping(original: Mapping[Any, Any], moved: dict[Any, Any]) -> Any:
    """A mapping of the original's type when it can be built from a dict (e.g. OrderedDict,
    BatchEncoding), else the plain dict."""
    try:
        return type(original)(moved)  # type: ignore[call-arg]
    except TypeError:
        return moved


def batch_size_of(obj: Any) -> int:
    """The number of samples in a target or input (its first dimension)."""
    if isinstance(obj, torch.Tensor):
        return obj.shape[0] if obj.ndim else 1
    if isinstance(obj, (tuple, list)) and obj:
        return batch_size_of(obj[0])
    if isinstance(obj, Mapping) and obj:
        return batch_size_of(next(iter(obj.values())))
    return 1


def _short(obj: Any, limit: int = 60) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- resuming a pass inside an epoch -----------------------------------------------------------
#
# A checkpoint taken inside an epoch holds what the epoch's pass over the training data drew
# its order from (``pass_state``, recorded by the loop just before ``iter(data)``) and the
# number of batches done. ``resume_batches`` replays the same order from that state and skips
# the batches done by index, without loading them; then the RNG state of the save is set again,
# so the next batch, and every draw after it, is the uninterrupted run's.

#: The samplers whose order depends only on torch's global RNG and their own generator.
_REPLAYABLE_SAMPLERS = (
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
    DistributedSampler,
)


def generators_of(data: Any) -> list[torch.Generator | None]:
    """The generators a DataLoader's pass draws from besides the global RNG: the loader's own
    (its workers' base seed) and its sampler's (None where there is none); [] for other data.
    Their states go into checkpoints with the global RNG's."""
    if not isinstance(data, DataLoader):
        return []
    return [data.generator, getattr(data.sampler, "generator", None)]


def set_epoch(data: Any, epoch: int) -> None:
    """Tell ``data``'s sampler (``DistributedSampler`` and any sampler or batch sampler with a
    ``set_epoch`` method) which epoch starts, 0-based as in ``for epoch in range(n):
    sampler.set_epoch(epoch)``, so that each epoch shuffles differently, resumed or not."""
    for owner in (getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        method = getattr(owner, "set_epoch", None)
        if callable(method):
            method(epoch)


def pass_state(data: Any) -> dict[str, Any]:
    """What a pass over ``data`` draws its order from, taken just before ``iter(data)``:
    torch's global RNG state and the states of the DataLoader's own generators."""
    return {
        "torch": torch.get_rng_state(),
        "generators": [None if g is None else g.get_state() for g in generators_of(data)],
    }


def fast_forward_problem(data: Any) -> str | None:
    """Why a pass over ``data`` cannot be resumed at a given batch by index, or None when it
    can: corolux's in-memory batches, a list or tuple of batches, a :class:`BatchAt`, and a
    DataLoader over a map-style Dataset with one of torch's samplers."""
    if isinstance(data, (TensorBatches, BatchAt, list, tuple)):
        return None
    if isinstance(data, DataLoader):
        if type(data) is not DataLoader:
            return f"it is a {type(data).__name__}, a DataLoader subclass, which corolux cannot rebuild"
        if isinstance(data.dataset, IterableDataset):
            return "its dataset is an IterableDataset, which has no index to skip to"
        if type(data.batch_sampler) is not BatchSampler or not isinstance(data.sampler, _REPLAYABLE_SAMPLERS):
            shown = data.sampler if data.batch_sampler is None else data.batch_sampler
            return (
                f"its sampler ({type(shown).__name__}) is not one of torch's own, whose order "
                "corolux can replay"
            )
        return None
    return f"it is a {type(data).__name__}, an iterable without an index to skip to"


def resume_batches(data: Any, state: Mapping[str, Any], skip: int, then: Callable[[], None]) -> Iterator[Any]:
    """The pass over ``data`` that started from ``state`` (:func:`pass_state`), without its
    first ``skip`` batches; ``then()`` runs once they are skipped, before the next batch is
    made. ``data`` must pass :func:`fast_forward_problem`."""
    torch.set_rng_state(state["torch"])
    for generator, saved in zip(generators_of(data), state["generators"], strict=False):
        if generator is not None and saved is not None:
            generator.set_state(saved)
    if isinstance(data, (TensorBatches, BatchAt)):
        return data.iter_from(skip, then)
    if isinstance(data, DataLoader):
        return iter(_rebuilt(data, batch_sampler=_SkipBatches(data.batch_sampler, skip, then)))
    assert isinstance(data, Sequence)
    then()
    return iter(data[skip:])


class _SkipBatches:
    """A batch sampler that runs ``sampler`` (same draws, same order) and leaves out its
    first ``skip`` batches of indices, calling ``then()`` before the next one."""

    def __init__(self, sampler: Any, skip: int, then: Callable[[], None]) -> None:
        self.sampler, self.skip, self.then = sampler, skip, then

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def __iter__(self) -> Iterator[list[int]]:
        batches = iter(self.sampler)
        for _ in range(self.skip):
            next(batches, None)
        self.then()
        yield from batches


def _rebuilt(loader: DataLoader, **sampling: Any) -> DataLoader:
    """A DataLoader like ``loader`` (its dataset, collate function, workers, pinning, seeds)
    whose indices come from ``sampling``: ``batch_sampler=...``, or ``batch_size``,
    ``sampler`` and ``drop_last``."""
    workers = loader.num_workers
    return DataLoader(
        loader.dataset,
        **sampling,
        num_workers=workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers,
        in_order=loader.in_order,
    )


# -- sharding (DDP) --------------------------------------------------------------------------------


class ShardSampler(torch.utils.data.Sampler[int]):
    """Every ``world_size``-th index from ``rank`` on, each once (no padding): the validation
    share of a rank, so that metrics reduced over the ranks count every sample once."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def _shard_sampler(dataset: Any, shard: tuple[int, int], shuffle: bool) -> Any:
    rank, world = shard
    if shuffle:
        return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    return ShardSampler(len(dataset), rank, world)


def _sharded_loader(loader: DataLoader, shard: tuple[int, int], shuffle: bool, name: str) -> DataLoader:
    """A user's DataLoader for one rank: kept when it has a DistributedSampler already, else
    rebuilt over the same dataset with this rank's sampler (the same batch size, collate
    function and workers)."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if (
        isinstance(loader.dataset, IterableDataset)
        or loader.batch_size is None
        or not isinstance(loader.sampler, (RandomSampler, SequentialSampler))
    ):
        raise TypeError(_unshardable(name, loader))
    training = shuffle and isinstance(loader.sampler, RandomSampler)
    return _rebuilt(
        loader,
        batch_size=loader.batch_size,
        sampler=_shard_sampler(loader.dataset, shard, training),
        drop_last=loader.drop_last,
    )


def _unshardable(name: str, data: Any) -> str:
    return (
        f"{name}: under DDP each process trains on its share of the data, and corolux cannot shard "
        f"a {type(data).__name__}; pass tensors, a map-style Dataset or a DataLoader (with torch's "
        "default samplers, or with your own DistributedSampler, kept as it is), or shard it yourself "
        "and pass it as a DataLoader with a DistributedSampler"
    )
