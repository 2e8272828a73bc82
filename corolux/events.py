"""Stages, events and filters: the vocabulary the loop speaks."""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corolux.context import Context

__all__ = ["Event", "Filter", "Stage", "StageSpec", "every"]


class Stage(enum.StrEnum):
    """Every breakpoint of training; the value is the method name a callback defines.

    ``fit``/``run`` yield them in this tree (``evaluate`` yields only the ``on_valid_*``
    part, ``predict`` only the ``on_predict_*`` one)::

        on_fit_begin
          on_epoch_begin
            on_train_begin
              on_train_batch_begin
                on_train_batch_after_pred
                on_train_batch_after_loss
                on_train_batch_before_backward
                on_train_batch_before_step      (not while accumulating gradients)
                on_train_batch_after_step       (ctx.step counts here)
              on_train_batch_end
            on_train_end
            on_valid_begin                      (only when there is validation data)
              on_valid_batch_begin
                on_valid_batch_after_pred
                on_valid_batch_after_loss
              on_valid_batch_end
            on_valid_end
          on_epoch_end
        on_fit_end

    One-off events stand outside the nesting: ``on_exception`` (an error is escaping;
    ``ctx.exception`` is set, with its traceback: log it with
    ``logging.error(..., exc_info=ctx.exception)``, as ``sys.exc_info()`` is empty there),
    ``on_early_stopping`` (emitted by early stopping before the stop) and ``on_interrupt``
    (Ctrl-C arrived; fired before the graceful stop).

    On a signal: *skip batch* jumps to ``on_*_batch_end``; *skip validation* leaves out
    ``on_valid_begin`` .. ``on_valid_end``; *stop training* ends the current batch, then
    every open scope gets its ``*_end`` and ``on_fit_end`` is the last event.

    >>> Stage.on_train_batch_end == "on_train_batch_end"
    True
    """

    on_fit_begin = "on_fit_begin"
    on_epoch_begin = "on_epoch_begin"
    on_train_begin = "on_train_begin"
    on_train_batch_begin = "on_train_batch_begin"
    on_train_batch_after_pred = "on_train_batch_after_pred"
    on_train_batch_after_loss = "on_train_batch_after_loss"
    on_train_batch_before_backward = "on_train_batch_before_backward"
    on_train_batch_before_step = "on_train_batch_before_step"
    on_train_batch_after_step = "on_train_batch_after_step"
    on_train_batch_end = "on_train_batch_end"
    on_train_end = "on_train_end"
    on_valid_begin = "on_valid_begin"
    on_valid_batch_begin = "on_valid_batch_begin"
    on_valid_batch_after_pred = "on_valid_batch_after_pred"
    on_valid_batch_after_loss = "on_valid_batch_after_loss"
    on_valid_batch_end = "on_valid_batch_end"
    on_valid_end = "on_valid_end"
    on_epoch_end = "on_epoch_end"
    on_fit_end = "on_fit_end"
    on_predict_begin = "on_predict_begin"
    on_predict_batch_begin = "on_predict_batch_begin"
    on_predict_batch_after_pred = "on_predict_batch_after_pred"
    on_predict_batch_end = "on_predict_batch_end"
    on_predict_end = "on_predict_end"
    on_exception = "on_exception"
    on_early_stopping = "on_early_stopping"
    on_interrupt = "on_interrupt"

    @property
    def is_begin(self) -> bool:
        """True for the stages that open a scope (``on_*_begin``)."""
        return self.value.endswith("_begin")

    @property
    def is_end(self) -> bool:
        """True for the stages that close a scope (``on_*_end``)."""
        return self.value.endswith("_end")

    @property
    def scope(self) -> str:
        """The scope a begin/end stage opens or closes: ``"train_batch"`` for both
        ``on_train_batch_begin`` and ``on_train_batch_end``; ``""`` for other stages."""
        for suffix in ("_begin", "_end"):
            if self.value.endswith(suffix):
                return self.value[3 : -len(suffix)]
        return ""

    @property
    def phase(self) -> str | None:
        """The phase the stage belongs to: ``"train"``, ``"valid"`` or ``"predict"``; None
        for the fit, epoch and one-off stages.

        >>> Stage.on_valid_batch_after_loss.phase, Stage.on_epoch_end.phase
        ('valid', None)
        """
        return _PHASE_OF[self]

    @property
    def in_batch(self) -> bool:
        """True for the stages of a batch: ``on_*_batch_begin``, the step's stages and
        ``on_*_batch_end``.

        >>> Stage.on_train_batch_end.in_batch, Stage.on_train_end.in_batch
        (True, False)
        """
        return self in _BATCH_STAGES


PHASES = ("train", "valid", "predict")
_PHASE_OF = {s: next((p for p in PHASES if s.startswith(f"on_{p}_")), None) for s in Stage}
_BATCH_STAGES = frozenset(s for s in Stage if s.startswith(tuple(f"on_{p}_batch_" for p in PHASES)))

#: The stages that are not part of the nesting.
ONE_OFF_STAGES = frozenset({Stage.on_exception, Stage.on_early_stopping, Stage.on_interrupt})
#: Per phase, the stages that open and close it and its batches: (begin, batch_begin, batch_end, end).
SCOPE_STAGES = {
    phase: tuple(Stage(f"on_{phase}_{part}") for part in ("begin", "batch_begin", "batch_end", "end"))
    for phase in PHASES
}
#: The ``on_*_batch_end`` stages: a batch is over there (no skip_batch, nothing after it).
BATCH_ENDS = frozenset(stages[2] for stages in SCOPE_STAGES.values())
#: Per phase, the stages its step may yield (a trainer's custom stages may come too).
STEP_STAGES = {
    phase: frozenset(s for s in _BATCH_STAGES if s.phase == phase and not (s.is_begin or s.is_end))
    for phase in PHASES
}


class Event:
    """What the loop yields at a breakpoint: the ``stage`` and the live ``ctx``.

    The driver builds one Event per stage and run and reuses it, so an event costs no
    allocation; read ``ctx`` at the moment you receive the event, it changes as training
    goes on.
    """

    __slots__ = ("stage", "ctx")

    stage: Stage | str
    ctx: Context

    def __init__(self, stage: Stage | str, ctx: Context) -> None:
        object.__setattr__(self, "stage", stage)
        object.__setattr__(self, "ctx", ctx)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Event is read-only; to change training, assign to event.ctx.{name}")

    def __repr__(self) -> str:
        ctx = self.ctx
        return f"Event({str(self.stage)!r}, epoch={ctx.epoch}, iter={ctx.iter})"


class Filter:
    """A condition on a stage that a coroutine callback can wait for.

    Build one with :func:`every`. Filters are compiled into the driver's schedule: a
    waiting filter costs one integer comparison per event of its stage.
    """

    __slots__ = ("stage", "n")

    def __init__(self, stage: Stage | str, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"every(): n must be an integer >= 1, got {n!r}")
        if not isinstance(stage, str):
            raise TypeError(f"every(): stage must be a stage name, got {stage!r}")
        self.stage = stage
        self.n = n

    def next_due(self, count: int) -> int:
        """The first occurrence count after ``count`` at which this filter fires."""
        return (count // self.n + 1) * self.n

    def __repr__(self) -> str:
        return f"every({str(self.stage)!r}, {self.n})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Filter) and (self.stage, self.n) == (other.stage, other.n)

    def __hash__(self) -> int:
        return hash((Filter, self.stage, self.n))


def every(stage: Stage | str, n: int) -> Filter:
    """Wake on the n-th, 2n-th, ... occurrence of ``stage`` in the run (a global count).

    Example:
        >>> import corolux
        >>> @corolux.coroutine
        ... def log_every_100(log=print):
        ...     while True:
        ...         event = yield corolux.every("on_train_batch_end", 100)
        ...         log(event.ctx.step)
    """
    return Filter(stage, n)


#: What a coroutine callback may yield: a stage, a filter, or a collection of them.
StageSpec = Stage | str | Filter | Collection[Stage | str | Filter]
