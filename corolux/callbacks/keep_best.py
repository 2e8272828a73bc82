"""KeepBestModel: the model ends training with the weights of its best epoch."""

from __future__ import annotations

from typing import Any

import torch

from corolux.callback import Callback
from corolux.callbacks.monitor import Monitor, describe
from corolux.checkpoint import unwrap
from corolux.context import Context

__all__ = ["KeepBestModel"]


class KeepBestModel(Callback):
    """Keep a copy of the weights of the epoch where ``monitor`` was best, and put them back
    into the model when training ends.

    At each epoch's end that improves on the best by more than ``min_delta``, the model's
    ``state_dict()`` (unwrapped: no DDP or ``torch.compile`` prefixes) is copied to the CPU:
    one copy in host memory, never a second model on the accelerator. At ``on_fit_end`` the
    copy is loaded into the model, after every ending that reaches ``on_fit_end``: all epochs
    run, early stopping, a ``stop_training``, ``max_steps``, and Ctrl-C (the model is the best
    one when ``fit()`` returns). An exception that escapes ``fit()`` does not reach
    ``on_fit_end``: the model then keeps its last weights, and ``keep.best_state`` still holds
    the best ones. An epoch that did not produce the value (validation skipped) or was cut
    short by a stop is not considered.

    Weight 0: it decides at ``on_epoch_end``, once the epoch's metrics are computed
    (``MetricsTracker`` runs at -100); its restore at ``on_fit_end`` comes before the handlers
    of higher weight, which see the restored weights.

    Its state (best value, best epoch, best weights) goes into checkpoints, so a resumed run
    restores the same weights as an uninterrupted one. Each new ``fit()`` starts fresh.

    .. warning::
        Only the model's weights are restored: the optimizers keep the state of the last
        epoch. ``fit(resume_from="last")`` and ``trainer.save_checkpoint()`` after such a fit
        continue from (or save) the best weights with that last optimizer state; to continue
        from the last weights, resume from a checkpoint written during the run
        (``AutoResume``, ``ModelCheckpoint``).

    Args:
        monitor: the history name to watch (``"valid_loss"``, ``"valid_acc"``, ...).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (the metric's ``higher_is_better``).
        min_delta: how much a value must beat the best by to count as an improvement (>= 0).

    Example:
        >>> keep = KeepBestModel(monitor="valid_acc")
        >>> history = trainer.fit(data, epochs=30, valid_data=0.2, callbacks=[keep])  # doctest: +SKIP
        >>> keep.best, keep.best_epoch                                                # doctest: +SKIP
        (0.9722, 17)
    """

    def __init__(self, monitor: str = "valid_loss", mode: str = "auto", min_delta: float = 0) -> None:
        self.monitor = Monitor(monitor, mode=mode, min_delta=min_delta, owner="KeepBestModel")
        #: Its saved state is matched by what it watches, not by its place in the list.
        self.state_key = f"KeepBestModel[{monitor}|{mode}]"
        #: The best value seen, or None.
        self.best: float | None = None
        #: The epoch of the best value, or None.
        self.best_epoch: int | None = None
        #: The best weights (a state dict of CPU tensors), or None.
        self.best_state: dict[str, torch.Tensor] | None = None

    def setup(self, ctx: Context) -> None:
        self.best, self.best_epoch, self.best_state = None, None, None  # a checkpoint may restore them

    def on_epoch_end(self, ctx: Context) -> None:
        if ctx.completed_epochs != ctx.epoch:  # cut short by a stop: partial metrics
            return
        value = self.monitor.value(ctx)
        if value is None or not self.monitor.improves(value, self.best):
            return
        self.best, self.best_epoch = value, ctx.epoch
        # One host copy per improving epoch (a device-to-host sync, off the per-step path).
        self.best_state = {
            key: tensor.detach().to("cpu", copy=True)
            for key, tensor in unwrap(ctx.model).state_dict().items()
        }

    def on_fit_end(self, ctx: Context) -> None:
        if self.best_state is not None:
            unwrap(ctx.model).load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        """The best value, its epoch and the best weights (CPU tensors)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        best_state = state["best_state"]
        self.best_state = None if best_state is None else {k: v.to("cpu") for k, v in best_state.items()}

    def __repr__(self) -> str:
        return (
            f"KeepBestModel(monitor={self.monitor.name!r}, mode={self.monitor.mode!r}, "
            f"min_delta={self.monitor.min_delta}, best={describe(self.best)})"
        )
