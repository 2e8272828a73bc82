"""LRMonitor: the learning rate each epoch trained with, in the history."""

from __future__ import annotations

from typing import Any

import torch

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["LRMonitor"]


class LRMonitor(Callback):
    """Record the learning rate of every optimizer's param groups in the history, per epoch.

    The value recorded for epoch k is the rate epoch k trained with: the one its first batch
    used. It is read at ``on_train_begin`` with weight ``inf`` there, after every schedule
    that steps at ``on_epoch_begin``/``on_train_begin``, and logged at ``on_epoch_end`` with
    weight -50 (after the ``MetricsTracker`` wrote the epoch's record, before user callbacks
    such as loggers and early stopping at 0 and above). So an ``LRScheduler`` stepping at
    ``on_epoch_end`` never shows up in the epoch it ends, whatever the weights. For a
    schedule per optimizer step, the value is the epoch's starting rate.

    Names: ``history["lr"]`` for one optimizer with one param group; else ``lr_<opt>`` per
    optimizer, and ``lr_<opt>_<i>`` for param group ``i`` (0-based) of an optimizer that has
    several. No host sync per step: one read per epoch (a tensor learning rate is copied on
    its device and becomes a float at the epoch's end).

    Example:
        >>> import torch
        >>> from corolux.callbacks.lr_scheduler import LRScheduler
        >>> step = LRScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        >>> history = trainer.fit(data, epochs=3, callbacks=[step, LRMonitor()])  # doctest: +SKIP
        >>> history["lr"]  # doctest: +SKIP
        [0.1, 0.05, 0.025]
    """

    weight = {"on_train_begin": float("inf"), "on_epoch_end": -50.0}

    def __init__(self) -> None:
        self._rates: dict[str, Any] = {}  # name -> the rate read at this epoch's on_train_begin

    def setup(self, ctx: Context) -> None:
        self._rates = {}

    def on_train_begin(self, ctx: Context) -> None:
        if ctx.iter:  # resumed inside the epoch: the rate it began with came with the checkpoint
            return
        self._rates = {name: _copy(lr) for name, lr in rates(ctx.optimizers)}

    def on_epoch_end(self, ctx: Context) -> None:
        for name, lr in self._rates.items():
            ctx.log(name, lr)

    def state_dict(self) -> dict[str, Any]:
        """The rates read at this epoch's start (a checkpoint inside an epoch resumes them)."""
        return {"rates": dict(self._rates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._rates = dict(state["rates"])


def rates(optimizers: dict[str, torch.optim.Optimizer]) -> list[tuple[str, Any]]:
    """``(history name, learning rate)`` for every param group of ``optimizers``.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> rates({"opt": torch.optim.SGD([a], lr=0.1)})
        [('lr', 0.1)]
        >>> gen = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1)
        >>> rates({"gen": gen, "disc": torch.optim.SGD([b], lr=0.2)})
        [('lr_gen_0', 0.1), ('lr_gen_1', 0.01), ('lr_disc', 0.2)]
    """
    single = len(optimizers) == 1
    found: list[tuple[str, Any]] = []
    for opt_name, opt in optimizers.items():
        groups = opt.param_groups
        if len(groups) == 1:
            found.append(("lr" if single else f"lr_{opt_name}", groups[0]["lr"]))
        else:
            found.extend((f"lr_{opt_name}_{i}", group["lr"]) for i, group in enumerate(groups))
    return found


def _copy(lr: Any) -> Any:
    """A tensor rate is updated in place by schedulers: keep a copy (on its device, no sync)."""
    return lr.detach().clone() if isinstance(lr, torch.Tensor) else float(lr)
