"""Control: the signals that steer the loop, and the one Ctrl-C state machine.

A signal never cuts a stage short: the other handlers of the stage still run and the
consumer still receives the event; the loop acts on it when it resumes.

- Callbacks raise :class:`StopTraining`, :class:`SkipBatch`, :class:`SkipValidation` (or call
  the ``ctx`` methods of the same names); the loop reads ``ctx.stop_reason``,
  ``ctx.skipped`` and ``ctx.validation_skipped``.
- What cannot wait for the loop's own checks lives in :class:`Signals` (``ctx.signals``): the
  one-off stages callbacks emit, and Ctrl-C. The loop looks at ``signals.pending`` after
  every stage, yielded or passed over, and acts there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corolux.context import Context

__all__ = [
    "ControlSignal",
    "Signals",
    "SkipBatch",
    "SkipValidation",
    "StopTraining",
    "graceful_sigint",
    "warn_if_interrupted",
]


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


class Signals:
    """What the loop must act on at its next stage boundary: emitted stages and Ctrl-C.

    One per run (``ctx.signals``). ``ctx.emit()``, ``ctx.request_interrupt()``, the SIGINT
    handler of :func:`graceful_sigint` and the driver (a handler that raised
    ``KeyboardInterrupt``) write it; the loop alone reads it, after every stage.

    Ctrl-C is a small state machine:

    - *idle*: no Ctrl-C yet.
    - *requested*: a first Ctrl-C (or ``request()``) asks for a graceful stop; the loop takes
      it at its next stage boundary and raises ``KeyboardInterrupt`` inside itself, where
      the open scope turns it into ``on_interrupt`` and the ends of every open scope.
    - *stopping*: the graceful stop has begun (:meth:`begin_stop`). From here on, a Ctrl-C
      aborts: ``KeyboardInterrupt`` propagates. So does a second one while *requested*
      (before the loop took the first).
    - After the run's last stage there is nothing left to stop: a request made there is
      dropped (the run ran to its end).

    Invariant: ``pending`` is true exactly when ``emitted`` or ``after`` is not empty or a
    stop is requested and not yet taken. Only the methods below change these fields.
    """

    __slots__ = (
        "pending",
        "emitted",
        "after",
        "defer",
        "_requested",
        "_deferred",
        "_released",
        "_stopping",
        "sigints",
    )

    def __init__(self) -> None:
        #: Something waits for the loop (read after every stage, so a plain attribute).
        self.pending = False
        #: Stages emitted with ``ctx.emit()``, delivered in order after the current stage.
        self.emitted: deque[str] = deque()
        #: Work to run once every handler of the current stage has run (``ctx.after_stage``).
        self.after: deque[Callable[[], None]] = deque()
        #: Under DDP (set by ``AgreeOnStop``): a requested stop waits, :attr:`deferred`, until
        #: the ranks agree on it and :meth:`release` it, so every rank stops after the same batch.
        self.defer = False
        self._requested = False
        self._deferred = False
        self._released = False  # the ranks agreed on the stop (release())
        self._stopping = False
        #: SIGINTs received while :func:`graceful_sigint` was installed.
        self.sigints = 0

    # -- emitted stages --------------------------------------------------------------------

    def emit(self, stage: str) -> None:
        """Queue a one-off stage for the loop to yield after the current one."""
        self.emitted.append(stage)
        self.pending = True

    def after_stage(self, fn: Callable[[], None]) -> None:
        """Queue ``fn()`` for the loop to run once the current stage is over (every handler
        ran, and the consumer had the event), before any emitted stage."""
        self.after.append(fn)
        self.pending = True

    def next_after(self) -> Callable[[], None] | None:
        """The next queued after-stage function, or None when none waits."""
        if not self.after:
            return None
        fn = self.after.popleft()
        self._recompute()
        return fn

    def next_emitted(self) -> str | None:
        """The next emitted stage, or None when none waits."""
        if not self.emitted:
            return None
        stage = self.emitted.popleft()
        self._recompute()
        return stage

    def _recompute(self) -> None:
        # Cleared first, then set again if needed: a SIGINT handler that runs in between sets
        # it itself, so a request is never lost to a stale read.
        self.pending = False
        if self.emitted or self.after or self._requested:
            self.pending = True

    # -- Ctrl-C ----------------------------------------------------------------------------

    @property
    def aborting(self) -> bool:
        """A Ctrl-C now aborts: the graceful stop has begun, or SIGINT came twice."""
        return self._stopping or self.sigints >= 2

    @property
    def stopping(self) -> bool:
        """The graceful stop has begun (the loop took the request)."""
        return self._stopping

    @property
    def deferred(self) -> bool:
        """A stop was requested while :attr:`defer` is set, and waits for :meth:`release`."""
        return self._deferred

    def request(self) -> None:
        """Ask for a graceful stop at the loop's next stage boundary (idle -> requested), or
        at the ranks' next agreement under :attr:`defer` (idle -> deferred); a no-op once the
        stop has begun."""
        if self._stopping:
            return
        if self.defer:
            self._deferred = True
            return
        self._requested = True
        self.pending = True

    def release(self) -> None:
        """The ranks agreed on a stop: take it at the loop's next stage boundary, on every
        rank (deferred or idle -> requested); a no-op once the stop has begun."""
        self._deferred = False
        if not self._stopping:
            self._released = self._requested = True
            self.pending = True

    def take_interrupt(self) -> bool:
        """For the loop: whether a requested stop is to happen now (it then raises
        ``KeyboardInterrupt`` inside its open scope)."""
        if not self._requested:
            return False
        self._requested = False
        self._recompute()
        return True

    def keyboard_interrupt(self) -> None:
        """A Ctrl-C arrived (a callback raised ``KeyboardInterrupt``, or SIGINT): request the
        graceful stop; a second one before the loop took the first, or one once the stop
        has begun, aborts (raises ``KeyboardInterrupt``)."""
        if self.aborting or self._requested or self._deferred:
            raise KeyboardInterrupt
        self.request()

    def sigint(self) -> None:
        """The body of the SIGINT handler: count it, then request the stop, or abort."""
        self.sigints += 1
        self.keyboard_interrupt()

    def rewind(self) -> None:
        """For a rewind (``Stepper.rewind()``): drop what the abandoned batch queued (emitted
        stages, after-stage work) and call off a graceful stop it began (-> idle)."""
        self.emitted.clear()
        self.after.clear()
        self._requested = self._stopping = False
        self.sigints = 0
        self._recompute()

    def begin_stop(self, exc: KeyboardInterrupt) -> None:
        """For the loop, which caught ``exc``: begin the graceful stop (requested or idle ->
        stopping), or re-raise ``exc`` when this Ctrl-C aborts. Under :attr:`defer` only a
        released stop is graceful: a ``KeyboardInterrupt`` that reached the loop otherwise
        (``run()`` without ``fit()``'s handler) would stop this rank alone, mid-batch, and
        the others would wait for it; it aborts instead, and they fail within the timeout."""
        if self.aborting or (self.defer and not self._released):
            raise exc
        self._stopping = True
        self._requested = False
        self._recompute()


@contextlib.contextmanager
def graceful_sigint(signals: Signals) -> Iterator[None]:
    """While inside, a first Ctrl-C asks the loop for a graceful stop at its next stage; a
    second restores the default handler and aborts at once. Main thread only.

    ``fit()``, ``evaluate()``, ``predict()`` and each ``Stepper`` call run inside it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        try:
            signals.sigint()
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def warn_if_interrupted(ctx: Context, call: str, stacklevel: int = 3) -> None:
    """Warn that a run driven to its end by ``call`` (``fit()``, ``evaluate()``,
    ``predict()``, ``Stepper.finish()``) was stopped by Ctrl-C, and say what its results
    cover."""
    if not ctx.history.interrupted:
        return
    if ctx.kind == "fit":
        message = (
            f"{call} was interrupted by Ctrl-C in epoch {ctx.epoch}; returning the history of "
            f"the {len(ctx.history)} epoch(s) recorded"
        )
    else:
        what = "the predictions" if ctx.kind == "predict" else "the metrics"
        if not ctx.iter:
            message = f"{call} was interrupted by Ctrl-C before its first batch: {what} cover no batch"
        else:
            # A Ctrl-C inside a batch drops that batch; one during its *_batch_end keeps it.
            covered = "the batches before it" if ctx.skipped else "the batches up to it"
            message = f"{call} was interrupted by Ctrl-C at batch {ctx.iter}: {what} cover {covered} only"
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
