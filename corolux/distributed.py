"""Distributed data-parallel training on ``torch.distributed``: joining the process group a
``torchrun`` launch describes, the rank-0 guard, and the reductions that make metrics exact.

Under ``torchrun --nproc_per_node=N script.py`` every process builds the same ``Trainer``; it
joins the process group (gloo on the CPU, nccl on CUDA; one already initialised is used as it
is), trains on its share of the data through ``DistributedDataParallel``, and reduces losses and
metrics across the processes, so every rank's history is the whole data set's.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import gc
import os
import sys
import weakref
from typing import Any

import torch
import torch.distributed as dist

from corolux.callback import Callback
from corolux.context import Context

__all__ = [
    "AgreeOnStop",
    "Distributed",
    "is_distributed",
    "is_main_process",
    "join",
    "launched",
    "reduce_sum",
]

STRATEGIES = (None, "ddp")


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed."""
    return not is_distributed() or dist.get_rank() == 0


def launched() -> bool:
    """True in a process that ``torchrun`` (or another launcher setting ``WORLD_SIZE``,
    ``RANK`` and ``LOCAL_RANK``) started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclasses.dataclass(frozen=True)
class Distributed:
    """The process group a trainer trains in: this process's rank, their number, the local
    rank (which GPU on this machine) and whether corolux created the group."""

    rank: int
    world_size: int
    local_rank: int
    created: bool

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0


def join(strategy: str | None, device: str | torch.device, timeout: float) -> Distributed | None:
    """Join the process group of a ``torchrun`` launch (or ``strategy="ddp"``); None for a
    single process. The group is created with ``timeout`` seconds for every collective (a
    rank that fails or is killed makes the others fail within it), and destroyed at exit if
    corolux created it.

    Raises:
        ValueError: an unknown strategy, or ``"ddp"`` in a process no launcher started.
    """
    if isinstance(strategy, str) and strategy.lower() in ("fsdp", "fsdp2", "deepspeed"):
        raise ValueError(
            f"strategy={strategy!r} is not built in yet (planned: FSDP2's fully_shard, with sharded "
            "checkpoints); today corolux trains data-parallel with strategy='ddp' (or any torchrun "
            "launch), which keeps a whole copy of the model on each process"
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be None or 'ddp', got {strategy!r}")
    if strategy is None and not launched() and not is_distributed():
        return None
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; DDP training needs it")
    created = False
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "strategy='ddp' needs the environment of a launcher (RANK, WORLD_SIZE, MASTER_ADDR, "
                "...): start the script with torchrun --nproc_per_node=N script.py"
            )
        cuda = _wants_cuda(device)
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        created = True
        atexit.register(_leave)
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        created=created,
    )


def _wants_cuda(device: str | torch.device) -> bool:
    if isinstance(device, str) and device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def _leave() -> None:
    """At exit: wait for the other ranks, then destroy the group (a rank that tears down its
    connections while another still uses them makes that one abort), and let go of the
    group in the DDP wrappers made here, so that the group's threads end now, while Python
    is whole (a thread of it still at work during the interpreter's shutdown aborts it)."""
    if dist.is_initialized():
        if getattr(sys, "last_value", None) is None:  # a clean exit (a failed one would wait in vain)
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()
    for ddp in list(_WRAPPED):
        for name in ("reducer", "logger", "process_group"):  # what holds the group in DDP
            ddp.__dict__.pop(name, None)
    gc.collect()


def device_for(setup: Distributed, device: str | torch.device) -> str | torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``"auto"`` or ``"cuda"`` on a GPU
    machine, else what was asked for."""
    if _wants_cuda(device) and (device in ("auto", "cuda") or torch.device(device).index is None):
        return torch.device("cuda", setup.local_rank)
    return "cpu" if device == "auto" else device


#: The DDP wrappers made by :func:`wrap` (released at exit by ``_leave``).
_WRAPPED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` (on its GPU on CUDA)."""
    ids = [device.index] if device.type == "cuda" else None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    _WRAPPED.add(ddp)
    return ddp


def reduce_sum(value: Any) -> Any:
    """The sum of ``value`` (a tensor or a number) over the ranks; ``value`` itself when not
    distributed. A tensor is reduced on a copy; a number comes back a float (or an int)."""
    if not is_distributed():
        return value
    if isinstance(value, torch.Tensor):
        total = value.detach().clone()
        dist.all_reduce(total)
        return total
    tensor = torch.tensor(value, dtype=torch.float64 if isinstance(value, float) else torch.int64)
    tensor = tensor.to(_collective_device())
    dist.all_reduce(tensor)
    return tensor.item()  # sync-ok: once per phase (a metric's count)


def gather_objects(value: Any, group: Any = None) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (a collective over ``group``,
    default all of them)."""
    if not is_distributed():
        return [value]
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def gather_shares(share: Any) -> Any:
    """The whole of what the ranks computed on their shares of some data (rank ``r`` had the
    samples ``r, r + world, ...``), back in the data's order, on every rank: tensors (and
    tuples or dicts of them) interleaved along the first dimension; lists of per-sample
    items likewise."""
    shares = gather_objects(share)
    return _interleave(shares)


def _interleave(shares: list[Any]) -> Any:
    first = shares[0]
    if isinstance(first, torch.Tensor):
        total = sum(len(part) for part in shares)
        out = first.new_empty((total, *first.shape[1:]))
        for rank, part in enumerate(shares):
            out[rank :: len(shares)] = part
        return out
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_interleave([s[i] for s in shares]) for i in range(len(first))))
    if isinstance(first, tuple):
        return tuple(_interleave([s[i] for s in shares]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _interleave([s[key] for s in shares]) for key in first}
    if isinstance(first, list):
        world, total = len(shares), sum(len(part) for part in shares)
        return [shares[i % world][i // world] for i in range(total)]
    raise TypeError(f"predict() under DDP cannot join per-rank outputs of type {type(first).__name__}")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) when not distributed)."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _collective_device() -> torch.device:
    """Where the backend reduces: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


INTERRUPTED = "interrupted"


def _given(ctx: Context) -> str | None:
    """The stop this rank gives: its ``ctx.stop_reason``, or a deferred Ctrl-C."""
    if ctx.stop_reason is None and ctx.signals.deferred:
        return INTERRUPTED
    return ctx.stop_reason


class AgreeOnStop(Callback):
    """Under DDP (a default callback there, weight ``inf``): a stop given on any rank (early
    stopping, a time limit, a callback) stops every rank at the same point, so that no rank
    waits forever for another's gradients.

    - Inside an epoch, a stop given on one rank is held (``ctx.stop_reason`` is cleared on
      that rank) and shared without a blocking sync: every ``interval`` batches each rank
      starts an all-reduce of its flag on a CPU process group and reads the one it started
      ``interval`` batches earlier (long done). So every rank stops after the same batch, at
      most ``2 * interval`` batches after the stop was given. ``max_steps`` needs no agreement
      (every rank counts the same steps).
    - At the end of each training phase (before validation, which every rank runs or none)
      and of each epoch (once every ``on_epoch_end`` handler has run), the ranks agree at once
      (two collectives per epoch); the reason is the lowest stopping rank's. A stop given at
      ``on_train_begin`` is held the same way.
    - Ctrl-C (``torchrun`` forwards SIGINT to every worker) is a stop like the others: under
      ``fit()`` it is deferred (``ctx.signals.defer``) and agreed at the same points, then every
      rank takes the graceful stop (``on_interrupt``, ``history.interrupted``) after the same
      batch, so the history comes back on every rank (a second Ctrl-C aborts). A Ctrl-C during
      validation waits for the epoch's end. ``torchrun`` kills the workers 30 s after it
      forwarded the signal.
    """

    weight = float("inf")

    def __init__(self, interval: int = 8) -> None:
        self.interval = interval
        self._held: str | None = None  # a stop given here, waiting for the next agreement
        self._work: Any = None  # the flag all-reduce in flight
        self._flag: torch.Tensor | None = None
        self._group: Any = None

    def setup(self, ctx: Context) -> None:
        self._held, self._work, self._flag = None, None, None
        ctx.signals.defer = True  # Ctrl-C too waits for the ranks to agree
        if self._group is None:  # flags travel on the CPU: reading one never syncs with a GPU
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def _hold(self, ctx: Context) -> None:
        reason = _given(ctx)
        if reason is not None and reason != "max_steps" and not ctx.signals.stopping:
            if self._held is None:
                self._held = reason  # not yet: the other ranks would wait for this one's gradients
            ctx.stop_reason = None

    on_train_begin = _hold

    def on_train_batch_end(self, ctx: Context) -> None:
        self._hold(ctx)
        if ctx.iter % self.interval:
            return
        if self._work is not None:
            self._work.wait()  # started interval batches ago: done by now
            assert self._flag is not None
            stopped = bool(self._flag.item())  # sync-ok: a CPU tensor, every interval batches
            self._work = None
            if stopped:
                self._stop(ctx)
                return
        self._flag = torch.tensor(int(self._held is not None))
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)

    def on_train_end(self, ctx: Context) -> None:
        if self._work is not None:  # every rank started it at the same batch: every rank ends it
            self._work.wait()
            self._work = None
        self._hold(ctx)
        self._stop(ctx)  # before validation, which every rank runs or none

    def on_epoch_end(self, ctx: Context) -> None:
        ctx.after_stage(self._agree)

    def _stop(self, ctx: Context) -> None:
        """Every rank stops here if one holds a stop (what ``on_train_batch_end`` kept back)."""
        held, self._held = self._held, None
        self._agree_on(ctx, held)

    def _agree(self, ctx: Context) -> None:
        self._agree_on(ctx, _given(ctx))

    def _agree_on(self, ctx: Context, reason: str | None) -> None:
        """Every rank stops if one gives ``reason`` (a collective), with the lowest such rank's."""
        given = next((r for r in gather_objects(reason, self._group) if r is not None), None)
        if given == INTERRUPTED and not ctx.signals.stopping:
            ctx.signals.release()  # the loop's graceful Ctrl-C stop, on every rank after this stage
        elif given is not None:
            ctx.stop_training(given)

    def __repr__(self) -> str:
        return f"AgreeOnStop(interval={self.interval})"
