"""Rewind: keep each training batch's starting state in memory, and run the batch again.

``Stepper(run, rewindable=True)`` puts a :class:`Rewinder` in ``ctx.rewinder`` before the run
starts; a run without one runs none of this code. The loop's training passes then draw their
batches through :meth:`Rewinder.batches`, which keeps, as each batch is handed out (after the
data gave it, before ``on_train_batch_begin``):

- the parameters and buffers of the model (and any other parameter an optimizer steps), and
  the gradients pending in a gradient-accumulation window: device-side copies into buffers
  kept from batch to batch (one foreach ``copy_``, no allocation, no host sync);
- each optimizer's state and hyperparameters, and the GradScaler's scale (device tensors);
- every RNG (torch CPU and CUDA, ``random``, NumPy); a DataLoader's own generators need no
  copy: they are drawn from as a batch is fetched, which is before the keeping, and the
  batch is not fetched again;
- the counters and this epoch's records (``epoch``, ``iter``, ``step``, ``ctx.metrics``, the
  stop reason) and every stateful callback's ``state_dict()`` (the MetricsTracker's loss and
  metric accumulators, a scheduler, early stopping);
- the batch itself, as the data gave it (a reference: it is not fetched again, so the data's
  order and the RNG draws of fetching it are not repeated; change ``ctx.input`` out of place).

``Stepper.rewind()`` throws :class:`Rewind` into the run. The driver passes it into the loop,
which abandons the batch where it stands (its step generator is closed) and asks for its next
batch; :meth:`Rewinder.batches` restores all of the above and hands out the same batch again,
and the loop yields its ``on_train_batch_begin`` once more. With nothing changed, the replay
is bit-identical: parameters, losses and RNG states (dropout included).

What callbacks see: the abandoned attempt gets no ``on_train_batch_end``; the next event is the
same batch's ``on_train_batch_begin`` (same epoch and iter). Stateful callbacks get their state
of that batch's start back through ``load_state_dict()``. Other class callbacks keep their
attributes (one that counts batches counts the replay too). Coroutine callbacks are not rewound
(a generator's place cannot be copied): each keeps waiting for what it waits for and wakes when
the replay reaches it (one that woke at the abandoned ``on_train_batch_begin`` and waits for
``on_train_batch_after_loss`` wakes at the replay's). ``every()`` filters count the replay's
events. Side effects outside the training state stay (files written, progress bars, prints).

In a rewindable run, an error raised by a training batch's step does not end the loop: the
loop yields a :class:`Failure`, the driver raises its error there as if it had escaped
(``on_exception`` fires once, as always), and the loop waits in the batch until the driver
closes it (the error then propagates) or a rewind restarts the batch.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import operator
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from corolux.checkpoint import rng_snapshot, rng_state, set_rng_state, unwrap
from corolux.context import Context
from corolux.distributed import is_distributed

__all__ = ["Failure", "Rewind", "Rewinder", "attach"]

_Tensor = torch.Tensor


class Rewind(BaseException):  # noqa: N818 (a control signal, as GeneratorExit, not an error)
    """Thrown into a rewindable run by ``Stepper.rewind()``: the loop restarts the current
    training batch. A ``BaseException``, as ``GeneratorExit``: no ``except Exception`` in a
    step or a callback swallows it."""


class Failure:
    """What the loop yields instead of raising an error inside a batch (of a rewindable run's
    training step, or of a handler it called in place, see ``corolux.loop``): the driver
    raises ``error`` as if it had escaped the loop, which waits in the batch."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failure({self.error!r})"


@dataclasses.dataclass(slots=True)
class _Kept:
    """The state at the start of one training batch (see the module docstring)."""

    epoch: int
    iter: int  # the batch's own (ctx.iter once it has begun)
    batch: Any
    counters: tuple[Any, ...]
    rng: dict[str, Any]
    live: list[_Tensor]  # parameters, buffers, pending gradients, optimizer state tensors
    copies: list[_Tensor]  # their copies, index for index
    grads: list[tuple[_Tensor, int | None]]  # (parameter, index of its gradient's copy or None)
    optimizers: list[tuple[torch.optim.Optimizer, list[dict[str, Any]], list[Any]]]
    scaler: Any
    callbacks: list[tuple[Any, Any]]


class Rewinder:
    """The state at the start of the current training batch, kept while a rewindable
    ``Stepper`` drives the run (``ctx.rewinder``), and the means to go back to it.

    Invariant: ``_kept`` is the state of the batch the loop handed out last in the open
    training pass (None between passes); ``_replay`` is set by :meth:`request` and cleared
    when :meth:`batches` hands that batch out again.
    """

    def __init__(self) -> None:
        self._kept: _Kept | None = None
        self._replay = False
        self._refused: str | None = None
        self._copies: list[_Tensor] = []
        self._layout: tuple[Any, ...] = ()
        self._states = _StateCopies()

    @property
    def kept(self) -> tuple[int, int] | None:
        """``(epoch, iter)`` of the batch whose start is kept, or None."""
        kept = self._kept
        return None if kept is None else (kept.epoch, kept.iter)

    def problem(self, ctx: Context) -> str | None:
        """Why the run cannot go back to its batch's start now, or None when it can."""
        if self._refused is not None:
            return self._refused
        kept = self._kept
        if (
            ctx.phase != "train"
            or not ctx.in_batch
            or kept is None
            or (kept.epoch, kept.iter)
            != (
                ctx.epoch,
                ctx.iter,
            )
        ):
            return "it is not inside a training batch"
        return None

    def refuse(self, reason: str) -> None:
        """For the driver: from here on this run cannot be rewound, for ``reason``."""
        self._refused = reason

    def request(self) -> None:
        """Ask for the current batch again (``Stepper.rewind()``, before it throws
        :class:`Rewind` into the run)."""
        assert self._kept is not None
        self._replay = True

    def batches(self, ctx: Context, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, keeping the state before handing out each one, and handing out the
        same batch again, restored, after a :meth:`request`."""
        stateful = [
            cb
            for cb in ctx.callbacks
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None))
        ]
        try:
            for batch in batches:
                self._kept = self._keep(ctx, batch, stateful)
                yield batch
                while self._replay:
                    self._replay = False
                    self._restore(ctx, self._kept)
                    yield batch
        finally:  # the pass is over: nothing to go back to, and the copies' memory is freed
            self._kept = None
            self._replay = False
            self._copies, self._layout = [], ()

    # -- keeping -------------------------------------------------------------------------------

    def _keep(self, ctx: Context, batch: Any, stateful: list[Any]) -> _Kept:
        model = unwrap(ctx.model)
        params = list(model.parameters())
        seen = {id(p) for p in params}
        for opt in ctx.optimizers.values():  # a parameter outside the model (a loss's)
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        live: list[_Tensor] = [*params, *model.buffers()]
        grads: list[tuple[_Tensor, int | None]] = []
        for p in params:
            if p.grad is None:
                grads.append((p, None))
            else:
                grads.append((p, len(live)))
                live.append(p.grad)
        optimizers = []
        for opt in ctx.optimizers.values():
            groups = [
                {k: v.clone() if isinstance(v, _Tensor) else v for k, v in g.items() if k != "params"}
                for g in opt.param_groups
            ]
            states: list[Any] = []
            for group in opt.param_groups:
                for p in group["params"]:
                    state = opt.state.get(p)
                    if not state:
                        states.append((p, None))
                        continue
                    entries = {}
                    for key, value in state.items():
                        if isinstance(value, _Tensor):
                            entries[key] = (True, len(live))
                            live.append(value)
                        else:
                            entries[key] = (False, copy.deepcopy(value))
                    states.append((p, entries))
            optimizers.append((opt, groups, states))
        states = self._states.copy([cb.state_dict() for cb in stateful])
        return _Kept(
            epoch=ctx.epoch,
            iter=ctx.iter + 1,
            batch=batch,
            counters=ctx.counters(),
            rng=rng_snapshot(),
            live=live,
            copies=self._copy(live),
            grads=grads,
            optimizers=optimizers,
            scaler=ctx.precision.snapshot(),
            callbacks=list(zip(stateful, states, strict=True)),
        )

    def _copy(self, tensors: list[_Tensor]) -> list[_Tensor]:
        """Device-side copies of ``tensors``, into the buffers of the last batch when the
        tensors are alike (one foreach copy; no allocation, no host sync)."""
        layout = tuple((t.shape, t.dtype, t.device) for t in tensors)
        if layout != self._layout:
            self._copies = [t.detach().clone() for t in tensors]
            self._layout = layout
        elif tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, tensors)
        return self._copies

    # -- restoring -----------------------------------------------------------------------------

    def _restore(self, ctx: Context, kept: _Kept) -> None:
        # Every tensor kept gets its values back in place, and is put back where the batch
        # replaced or dropped it (a gradient set to None by a step, an optimizer's state).
        live = kept.live
        with torch.no_grad():
            torch._foreach_copy_(live, kept.copies)
        for p, index in kept.grads:
            p.grad = None if index is None else live[index]
        for opt, groups, states in kept.optimizers:
            for group, hyper in zip(opt.param_groups, groups, strict=True):
                group.update({k: v.clone() if isinstance(v, _Tensor) else v for k, v in hyper.items()})
            for p, entries in states:
                if entries is None:
                    opt.state.pop(p, None)
                    continue
                opt.state[p] = {
                    key: live[value] if is_tensor else copy.deepcopy(value)
                    for key, (is_tensor, value) in entries.items()
                }
        ctx.precision.restore(kept.scaler)
        for cb, state in kept.callbacks:
            cb.load_state_dict(copy.deepcopy(state))  # the kept copy stays for another rewind
        ctx.restore_counters(kept.counters)
        set_rng_state(rng_state(kept.rng))


def attach(events: Iterator[Any], ctx: Context | None) -> Rewinder:
    """Put a Rewinder in the ``ctx`` of the run ``events`` before it starts, and return it
    (``Stepper(..., rewindable=True)``).

    Raises:
        TypeError: ``events`` is not a run generator of a trainer.
        ValueError: not a training run, a run already started, or a DDP run.
    """
    if ctx is None:
        raise TypeError(
            "Stepper(..., rewindable=True) needs the generator of trainer.run(...), whose batches it "
            f"can keep; got {type(events).__name__}"
        )
    if ctx.kind != "fit":
        raise ValueError(
            f"Stepper(..., rewindable=True): a run_{ctx.kind}() run has no training batch to rewind; "
            "rewinding is for trainer.run(...) (or trainer.stepper(..., rewindable=True))"
        )
    if inspect.getgeneratorstate(events) != inspect.GEN_CREATED:  # type: ignore[arg-type]
        raise ValueError(
            "Stepper(..., rewindable=True): the run has started already, before its batches could be "
            "kept; build the stepper on a fresh run: trainer.stepper(..., rewindable=True)"
        )
    if is_distributed():
        raise ValueError(
            "Stepper(..., rewindable=True) under DDP: every rank would have to rewind together; step "
            "through a single-process run instead"
        )
    ctx.rewinder = Rewinder()
    return ctx.rewinder


# The items of a kept list whose earlier copy is reused while they stay the same objects:
# tensors (a change in place bumps their version) and immutable values.
_UNCHANGING = frozenset({_Tensor, int, float, bool, complex, str, bytes, type(None)})


class _StateCopies:
    """Copies of callbacks' ``state_dict()`` values: containers copied, tensors cloned, except
    a tensor that is the very object seen at the last batch and unchanged since (its version
    counter, which in-place changes move): its copy is reused. So the MetricsTracker's kept
    batch losses are each cloned once, not at every batch.

    A speed hack, local: a list of tensors at the same place as at the last batch whose first
    items are the same objects, unchanged, reuses their copies in one comparison (the kept
    losses grow by one per batch: 256 items cost ~10 us this way, ~90 us one by one).
    """

    def __init__(self) -> None:
        self._memo: dict[int, tuple[_Tensor, int, _Tensor]] = {}
        self._lists: dict[tuple[Any, ...], tuple[list[Any], list[Any], list[Any]]] = {}

    def copy(self, states: list[Any]) -> list[Any]:
        old, self._memo = self._memo, {}
        lists, self._lists = self._lists, {}
        return [self._copy(state, old, lists, (i,)) for i, state in enumerate(states)]

    def _copy(
        self, value: Any, old: dict[int, Any], lists: dict[tuple[Any, ...], Any], path: tuple[Any, ...]
    ) -> Any:
        if isinstance(value, _Tensor):
            return self._tensor(value, old)
        kind = type(value)
        if kind is dict or kind is OrderedDict:
            return kind((k, self._copy(v, old, lists, (*path, k))) for k, v in value.items())
        if kind is list or kind is tuple:
            return kind(self._items(value, old, lists, path))
        return copy.deepcopy(value)

    def _items(
        self, items: Any, old: dict[int, Any], lists: dict[tuple[Any, ...], Any], path: tuple[Any, ...]
    ) -> list[Any]:
        versions = [v._version if type(v) is _Tensor else None for v in items]
        copies: list[Any] = []
        last = lists.get(path)
        if last is not None:
            sources, seen, kept = last
            n = min(len(sources), len(items))
            if (
                versions[:n] == seen[:n]
                and all(map(operator.is_, items[:n], sources[:n]))
                and _UNCHANGING.issuperset(map(type, items[:n]))  # a list or dict changes in place
            ):
                copies = kept[:n]
        copies.extend(
            self._copy(v, old, lists, (*path, i)) for i, v in enumerate(items[len(copies) :], len(copies))
        )
        self._lists[path] = (list(items), versions, copies)
        return copies

    def _tensor(self, value: _Tensor, old: dict[int, Any]) -> _Tensor:
        key = id(value)
        seen = old.get(key)
        version = value._version
        if seen is not None and seen[0] is value and seen[1] == version:
            kept = seen[2]
        else:
            kept = value.detach().clone()
        self._memo[key] = (value, version, kept)
        return kept
