"""EarlyStopping: end training when a monitored value has stopped improving."""

from __future__ import annotations

from typing import Any

from corolux.callback import Callback
from corolux.callbacks.monitor import Monitor, describe
from corolux.context import Context

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Stop training once ``monitor`` has not improved for more than ``patience`` epochs.

    At each epoch's end the value of ``monitor`` (a history name: ``"valid_loss"``,
    ``"train_acc"``, a ``ctx.log`` name) is compared with the best so far. An epoch whose value
    does not beat the best by more than ``min_delta`` counts against ``patience``; an improving
    one resets the count. When the count exceeds ``patience`` (``patience=0``: the first epoch
    without improvement stops; an improving epoch never does), it emits ``on_early_stopping``
    and stops training with reason ``"early_stopping"`` (``history.stop_reason``). The epoch
    it stops at is complete (``history.completed_epochs`` counts it).

    - Never before ``min_epochs``: with ``fit(epochs=(min, max))`` it stops at epoch ``min``
      at the earliest (the count goes on before that). Only EarlyStopping honours the minimum.
    - An epoch that did not produce the value (validation skipped) counts neither way, nor
      does an epoch cut short by another stop (its metrics are partial).
    - ``baseline`` is the best value assumed before the first epoch: the first epochs must beat
      it to count as improvements. Without it the first value is the first best.
    - Weight ``inf``: it runs after every other ``on_epoch_end`` handler (loggers, schedulers,
      checkpoints see the epoch it stops at).
    - Its state (best value, count, the epoch it stopped at) goes into checkpoints, so a resumed
      run stops at the same epoch as an uninterrupted one. Each new ``fit()`` starts fresh.

    Args:
        monitor: the history name to watch.
        min_delta: how much a value must beat the best by to count as an improvement (>= 0).
        patience: how many epochs without improvement are tolerated (an integer >= 0).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (the metric's ``higher_is_better``; a loss is
            lower-is-better).
        baseline: the best value assumed before the first epoch, or None.

    Raises:
        ValueError: at the first epoch's end, for a monitor the run does not record (the
            message lists the names it does, with a did-you-mean).

    Example:
        >>> stop = EarlyStopping(monitor="valid_loss", patience=2, min_delta=1e-3)
        >>> stop.state_dict()                      # what a checkpoint keeps
        {'best': None, 'wait': 0, 'stopped_epoch': None}
        >>> history = trainer.fit(data, epochs=100, valid_data=0.2, callbacks=[stop])  # doctest: +SKIP
        >>> history.stop_reason, stop.stopped_epoch                                  # doctest: +SKIP
        ('early_stopping', 14)
    """

    weight = float("inf")

    def __init__(
        self,
        monitor: str = "valid_loss",
        min_delta: float = 0,
        patience: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
    ) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an integer >= 0, got {patience!r}")
        if baseline is not None and (not isinstance(baseline, (int, float)) or isinstance(baseline, bool)):
            raise TypeError(f"EarlyStopping: baseline must be a number or None, got {baseline!r}")
        self.monitor = Monitor(monitor, mode=mode, min_delta=min_delta, owner="EarlyStopping")
        self.patience = patience
        self.baseline = None if baseline is None else float(baseline)
        #: The best value seen (``baseline`` before the first epoch).
        self.best: float | None = self.baseline
        #: Epochs in a row without improvement.
        self.wait = 0
        #: The epoch at which it stopped training, or None.
        self.stopped_epoch: int | None = None

    @property
    def state_key(self) -> str:
        """Its saved state is matched by what it watches, not by its place in the list."""
        return f"EarlyStopping[{self.monitor.name}|{self.monitor.mode}]"

    def setup(self, ctx: Context) -> None:
        self.best, self.wait, self.stopped_epoch = self.baseline, 0, None  # a checkpoint may restore them

    def on_epoch_end(self, ctx: Context) -> None:
        if ctx.completed_epochs != ctx.epoch:  # cut short by another stop: partial metrics
            return
        value = self.monitor.value(ctx)
        if value is None:  # not produced this epoch (validation skipped): nothing counts
            return
        if self.monitor.improves(value, self.best):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait > self.patience and ctx.epoch >= ctx.min_epochs and ctx.stop_reason is None:
            self.stopped_epoch = ctx.epoch
            ctx.emit("on_early_stopping")
            ctx.stop_training("early_stopping")

    def state_dict(self) -> dict[str, Any]:
        """The best value, the count of epochs without improvement and the stop epoch."""
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best = state["best"]
        self.wait = int(state["wait"])
        self.stopped_epoch = state["stopped_epoch"]

    def __repr__(self) -> str:
        return (
            f"EarlyStopping(monitor={self.monitor.name!r}, min_delta={self.monitor.min_delta}, "
            f"patience={self.patience}, mode={self.monitor.mode!r}, best={describe(self.best)})"
        )
