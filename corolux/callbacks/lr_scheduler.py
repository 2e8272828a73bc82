"""LRScheduler: a torch learning-rate scheduler built for the run and stepped at a stage."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from corolux._suggest import did_you_mean
from corolux.callback import Callback
from corolux.callbacks.monitor import Monitor
from corolux.context import Context
from corolux.events import Stage

__all__ = ["LRScheduler"]

_TorchScheduler = torch.optim.lr_scheduler.LRScheduler

#: The stages of the default training step that fire once per optimizer and batch: with
#: several optimizers, a scheduler steps there only when its own optimizer is ``ctx.opt``.
_PER_OPTIMIZER = frozenset(
    {
        Stage.on_train_batch_after_pred,
        Stage.on_train_batch_after_loss,
        Stage.on_train_batch_before_backward,
        Stage.on_train_batch_before_step,
        Stage.on_train_batch_after_step,
    }
)


class LRScheduler(Callback):
    """Build a learning-rate scheduler for each run and step it at ``call_on``.

    The scheduler is built in ``setup`` by ``scheduler_factory(optimizer)``, on
    ``ctx.optimizers[opt_name]`` (or the trainer's only optimizer), so every ``fit()`` gets
    a fresh one on the live optimizer. Its ``state_dict()`` goes into checkpoints:
    ``AutoResume`` and ``resume_from`` continue the schedule where it was.

    - ``call_on="on_epoch_end"`` (the default): one step per completed epoch. An epoch cut
      short by a stop or Ctrl-C does not step it (a resume runs that epoch again).
    - ``call_on="on_train_batch_after_step"``: one step per optimizer step (OneCycleLR,
      warm-up): under gradient accumulation once per window, and never when the GradScaler
      skipped the step (``ctx.step_skipped``: inf/NaN gradients under ``"16-mixed"``).
    - A scheduler whose ``step`` takes a metric (``ReduceLROnPlateau``), or any one when
      ``monitor`` is given, is stepped at ``on_epoch_end`` with the epoch's value of
      ``monitor`` (default ``"valid_loss"``), never a batch's loss; in an epoch that did not
      produce it (validation skipped, or ``nan``) it does not step.

    With several optimizers, give ``opt_name``; at the stages of the step that fire once
    per optimizer (``on_train_batch_after_step``, ...) it steps when its optimizer steps.

    Weight 0: at ``on_epoch_end`` it runs after the ``MetricsTracker`` (-100) wrote the
    epoch's metrics, and before ``AutoResume`` (inf) saves, so checkpoints hold the stepped
    scheduler. ``LRMonitor`` records the rate each epoch trained with, whatever the order.

    Args:
        scheduler_factory: ``fn(optimizer) -> scheduler``, e.g.
            ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10)``.
        call_on: the stage at which it steps.
        opt_name: the key in ``ctx.optimizers`` of the optimizer to schedule; None for the
            trainer's only optimizer.
        monitor: the history name whose epoch value is passed to ``step`` (``"valid_loss"``,
            ``"train_loss"``, ``"valid_acc"``, a ``ctx.log`` name).

    Raises:
        TypeError: ``scheduler_factory`` is not callable (a scheduler already built), or
            ``call_on``/``opt_name``/``monitor`` are not strings.
        ValueError: ``call_on`` is not a stage name (with a suggestion); at ``setup``, an
            unknown ``opt_name`` or several optimizers without one, a metric with a
            ``call_on`` other than ``on_epoch_end``, ``monitor`` with a torch scheduler whose
            ``step`` takes no metric (StepLR...), or a ``valid_*`` monitor without validation
            data. An unknown monitor name fails at the first ``on_epoch_end``, with the names
            the run records.

    Example:
        >>> import torch
        >>> LRScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
        LRScheduler(<lambda>, call_on='on_epoch_end')
        >>> plateau = LRScheduler(
        ...     lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2),
        ...     monitor="valid_loss",
        ... )
        >>> trainer.fit(data, epochs=20, valid_data=0.2, callbacks=[plateau])  # doctest: +SKIP

    .. warning::
       ``call_on="on_train_batch_end"`` steps after every batch: also while gradients
       accumulate, for skipped batches and when the GradScaler skipped the step. For a
       schedule counted in optimizer steps use ``"on_train_batch_after_step"``.
    """

    def __init__(
        self,
        scheduler_factory: Callable[[torch.optim.Optimizer], Any],
        call_on: str = "on_epoch_end",
        opt_name: str | None = None,
        monitor: str | None = None,
    ) -> None:
        if isinstance(scheduler_factory, _TorchScheduler) or not callable(scheduler_factory):
            raise TypeError(
                "LRScheduler: scheduler_factory must be a function that builds the scheduler from "
                f"the optimizer, got {scheduler_factory!r}; e.g. LRScheduler(lambda opt: "
                "torch.optim.lr_scheduler.StepLR(opt, step_size=10)), since the trainer's "
                "optimizer is only known when the run starts"
            )
        self.scheduler_factory = scheduler_factory
        self.call_on = _check_stage(call_on)
        if opt_name is not None and not isinstance(opt_name, str):
            raise TypeError(f"LRScheduler: opt_name must be an optimizer's name or None, got {opt_name!r}")
        self.opt_name = opt_name
        if monitor is not None and not isinstance(monitor, str):
            raise TypeError(
                f"LRScheduler: monitor must be a history name such as 'valid_loss', got {monitor!r}"
            )
        self.monitor = monitor
        #: Its saved state is matched by the optimizer and the stage it steps at.
        self.state_key = f"LRScheduler[{opt_name or ''}|{self.call_on}]"
        #: The scheduler of the current (or last) run; None before the first ``setup``.
        self.scheduler: Any = None
        #: The optimizer it schedules.
        self.optimizer: torch.optim.Optimizer | None = None
        self._monitor: Monitor | None = None
        self._pending: dict[str, Any] | None = None  # a state loaded before setup built the scheduler
        setattr(self, self.call_on, self._step)  # the handler of that one stage

    def setup(self, ctx: Context) -> None:
        if ctx.kind != "fit":
            return  # evaluate/predict: no schedule (building one would change the learning rate)
        self.optimizer = _pick_optimizer(ctx, self.opt_name)
        self.scheduler = scheduler = self.scheduler_factory(self.optimizer)
        if not callable(getattr(scheduler, "step", None)):
            raise TypeError(
                f"LRScheduler: scheduler_factory returned {scheduler!r}, which has no step(); it must "
                "return a scheduler, e.g. torch.optim.lr_scheduler.StepLR(opt, step_size=10)"
            )
        monitor = self.monitor
        takes_metric = _takes_metric(scheduler)
        if monitor is None and takes_metric:
            monitor = "valid_loss"
        elif monitor is not None and not takes_metric and isinstance(scheduler, _TorchScheduler):
            raise ValueError(
                f"LRScheduler: monitor={monitor!r} was given, but {type(scheduler).__name__}.step() "
                "takes no metric (its argument is an epoch number); drop monitor=, or use a "
                "scheduler that steps on a value (torch.optim.lr_scheduler.ReduceLROnPlateau)"
            )
        self._monitor = None
        if monitor is not None:
            if self.call_on != Stage.on_epoch_end:
                raise ValueError(
                    f"LRScheduler: {type(scheduler).__name__} steps on the epoch's {monitor!r}, which "
                    f"is known at on_epoch_end, not at call_on={self.call_on!r}; use "
                    "call_on='on_epoch_end'"
                )
            if monitor.startswith("valid_") and ctx.valid_data is None:
                raise ValueError(
                    f"LRScheduler: {type(scheduler).__name__} monitors {monitor!r}, but this fit has no "
                    "validation data; pass valid_data= to fit(), or monitor='train_loss'"
                )
            # The direction is the scheduler's own (ReduceLROnPlateau(mode=...)); only the
            # value is read here, so the Monitor's mode is never used.
            self._monitor = Monitor(monitor, mode="min", owner="LRScheduler")
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def _step(self, ctx: Context) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return  # not a fit
        stage = self.call_on
        if stage in _PER_OPTIMIZER and ctx.opt is not self.optimizer and len(ctx.optimizers) > 1:
            return  # another optimizer's pass of the step
        if stage == Stage.on_train_batch_after_step and ctx.step_skipped:
            return  # the GradScaler skipped this optimizer step: the schedule waits for a real one
        if stage == Stage.on_epoch_end and ctx.completed_epochs != ctx.epoch:
            return  # an epoch cut short: a resume runs it again, and steps then
        if self._monitor is None:
            scheduler.step()
            return
        value = self._monitor.value(ctx)
        if value is not None:  # not produced this epoch: no step
            scheduler.step(value)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state (``scheduler.state_dict()``), for checkpoints."""
        if self.scheduler is None:
            return {"scheduler": None} if self._pending is None else dict(self._pending)
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (kept until ``setup`` builds the scheduler)."""
        if not isinstance(state, dict) or "scheduler" not in state:
            raise ValueError(f"LRScheduler.load_state_dict: not an LRScheduler state: {state!r}")
        if self.scheduler is None:
            self._pending = dict(state)
        elif state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])

    def __repr__(self) -> str:
        factory = getattr(self.scheduler_factory, "__qualname__", None) or repr(self.scheduler_factory)
        extra = "".join(
            f", {key}={value!r}"
            for key, value in (("opt_name", self.opt_name), ("monitor", self.monitor))
            if value
        )
        return f"LRScheduler({factory}, call_on={self.call_on!r}{extra})"


def _check_stage(stage: Any) -> str:
    """A built-in stage, or a name of the form custom stages have (the driver checks those
    against the trainer's stages when the callback is handed to ``fit``/``run``)."""
    if not isinstance(stage, str):
        raise TypeError(f"LRScheduler: call_on must be a stage name such as 'on_epoch_end', got {stage!r}")
    if stage in Stage.__members__:
        return str(stage)
    if stage.startswith("on_") and stage.isidentifier():
        return str(stage)  # a custom stage of the trainer: checked against it at fit()
    raise ValueError(
        f"LRScheduler: call_on={stage!r} is not a stage name;"
        f"{did_you_mean(stage, list(Stage)) or ''} e.g. 'on_epoch_end', or "
        "'on_train_batch_after_step' for a schedule per optimizer step (see corolux.Stage)"
    )


def _pick_optimizer(ctx: Context, opt_name: str | None) -> torch.optim.Optimizer:
    """The optimizer to schedule: ``ctx.optimizers[opt_name]``, or the only one."""
    names = list(ctx.optimizers)
    if opt_name is not None:
        if opt_name not in ctx.optimizers:
            raise ValueError(
                f"LRScheduler: opt_name={opt_name!r} is not one of this trainer's optimizers "
                f"{names};{did_you_mean(opt_name, names) or ''} pass one of them"
            )
        return ctx.optimizers[opt_name]
    if len(names) == 1:
        return ctx.optimizers[names[0]]
    if not names:
        raise ValueError(
            "LRScheduler: this trainer has no optimizer (optimizer=None): there is nothing to schedule"
        )
    raise ValueError(
        f"LRScheduler: this trainer has {len(names)} optimizers {names}; say which one to schedule "
        f"with opt_name=, e.g. LRScheduler(factory, opt_name={names[0]!r})"
    )


def _takes_metric(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes the monitored value (ReduceLROnPlateau's ``metrics``)."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    try:
        params = inspect.signature(scheduler.step).parameters
    except (TypeError, ValueError):
        return False
    return "metrics" in params or "metric" in params
