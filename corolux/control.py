"""Control signals: raise one in a callback (or call the ``ctx`` method) to steer the loop.

A signal never cuts a stage short: the other handlers of the stage still run and the
consumer still receives the event; the loop acts on it when it resumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corolux.context import Context

__all__ = ["ControlSignal", "SkipBatch", "SkipValidation", "StopTraining"]


class ControlSignal(Exception):  # noqa: N818 - these are signals, not errors
    """Base class of the control signals; ``apply(ctx)`` gives the signal to the loop."""

    def apply(self, ctx: Context) -> None:
        raise NotImplementedError


class StopTraining(ControlSignal):
    """Finish the current batch, end every open scope, then ``on_fit_end``; as ``ctx.stop_training()``."""

    def __init__(self, reason: str = "stopped") -> None:
        super().__init__(reason)
        self.reason = reason

    def apply(self, ctx: Context) -> None:
        ctx.stop_training(self.reason)


class SkipBatch(ControlSignal):
    """Skip the rest of this batch's step and go to ``on_*_batch_end``. Same as ``ctx.skip_batch()``."""

    def apply(self, ctx: Context) -> None:
        ctx.skip_batch()


class SkipValidation(ControlSignal):
    """Do not run this epoch's validation loop. Same as ``ctx.skip_validation()``."""

    def apply(self, ctx: Context) -> None:
        ctx.skip_validation()
