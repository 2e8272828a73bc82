"""Stepper: walk through one run event by event in a REPL; look at ``ctx``, change it, resume.

A ``Stepper`` is one more driver of the generator that ``Trainer.run()`` returns, like
``fit()`` and a ``for`` loop: callbacks run exactly as under ``fit()``, and nothing in the
loop or the driver knows about it, so a run without a stepper pays nothing for it. A
rewindable one puts a ``Rewinder`` in ``ctx.rewinder`` before the run starts and throws
``Rewind`` into it for :meth:`Stepper.rewind` (``corolux.rewind`` says how the loop and the
driver take it); :meth:`Stepper.from_capture` replays what ``CaptureAnomaly`` wrote.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from corolux._suggest import unknown_stage_message
from corolux.capture import describe, replay_run
from corolux.context import Context
from corolux.control import graceful_sigint, warn_if_interrupted
from corolux.driver import context_of
from corolux.events import PHASES, SCOPE_STAGES, Event, Stage
from corolux.positions import position, tree, unreachable
from corolux.rewind import Rewind, attach

if TYPE_CHECKING:
    from corolux.history import History

__all__ = ["Stepper", "position"]

#: Target of :meth:`Stepper.until`: a stage name, a collection of names, or a predicate.
Target = str | Collection[str] | Callable[[Event], Any] | None

_BUILTIN = frozenset(Stage)
_PHASE_BEGINS = frozenset(SCOPE_STAGES[phase][0] for phase in PHASES)
_PHASE_ENDS = frozenset(SCOPE_STAGES[phase][3] for phase in PHASES)
# step() and until() hand back control at these even when they are not the target.
_PAUSE_ALWAYS = frozenset({Stage.on_exception, Stage.on_interrupt})


#: The steppers not yet garbage-collected: at interpreter exit, those still paused are closed
#: (teardown, files, bars), before Python's shutdown would finalize their runs half torn down.
_OPEN: weakref.WeakSet[Stepper] = weakref.WeakSet()


@atexit.register
def _close_paused() -> None:
    for stepper in list(_OPEN):
        with contextlib.suppress(Exception):
            stepper.close()


class Stepper:
    """Step through a run in a REPL: pause at any stage, look at ``ctx``, change it, resume.

    Build one with ``corolux.Stepper(trainer.run(...))`` or ``trainer.stepper(...)`` (the
    same arguments as ``run``). Nothing runs until the first :meth:`step`, :meth:`until`
    or :meth:`finish`; callbacks run exactly as under ``fit()``. Each call installs the
    Ctrl-C handler of ``fit()`` for its duration: a first Ctrl-C makes the loop stop
    gracefully and the call pauses at ``on_interrupt``; a second one aborts the run. At the
    prompt, between calls, Ctrl-C is the ordinary ``KeyboardInterrupt`` and leaves the run
    paused.

    ``step()`` and ``until()`` also pause at ``on_exception`` (an error is escaping: look at
    ``ctx``, then ``step()`` re-raises it) and at ``on_interrupt``, even when those are not
    what they were asked for. When the run ends before the target, they print what
    happened and return None; they never raise ``StopIteration`` and never hang.

    Args:
        events: the generator of ``Trainer.run()`` (or ``run_evaluate()``, ``run_predict()``).
        rewindable: keep the state of each training batch as it begins, so that
            :meth:`rewind` can run the batch again (``corolux.rewind``: a device-side copy of
            the parameters and optimizer state per batch, no host sync). Off, the run
            pays nothing for it.

    Example:
        >>> import torch, corolux
        >>> trainer = corolux.Trainer(torch.nn.Linear(4, 1), loss_fn=torch.nn.functional.mse_loss,
        ...     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu", progress=False)
        >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> s = trainer.stepper((x, y), epochs=3, batch_size=8)
        >>> s.until("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 5)
        Event('on_train_batch_after_loss', epoch=1, iter=5)
        >>> s
        <Stepper epoch 1/3 · train · batch 5/8 · on_train_batch_after_loss>
        >>> s.ctx.loss = s.ctx.loss * 0          # this batch's backward sees the new loss
        >>> len(s.finish())                      # the history: one record per epoch
        3
    """

    def __init__(self, events: Iterator[Event], rewindable: bool = False) -> None:
        if not isinstance(events, Iterator):
            hint = (
                "trainer.stepper(data, epochs=...) or corolux.Stepper(trainer.run(data, epochs=...))"
                if hasattr(events, "run")
                else "corolux.Stepper(trainer.run(data, epochs=...))"
            )
            raise TypeError(f"Stepper takes the generator of a run, got {type(events).__name__}; use {hint}")
        self._events = events
        self._event: Event | None = None
        self._ctx: Context | None = context_of(events)
        self._rewinder = attach(events, self._ctx) if rewindable else None
        self._end: str | None = None  # why the run is over, once it is
        self._stack: contextlib.ExitStack | None = None  # set during a call
        self._guarded = False
        self._in_phase = False  # between an on_<phase>_begin and its end, as seen here
        self._grad_mode = torch.is_grad_enabled()  # the run's, kept while paused at the prompt
        _OPEN.add(self)  # closed at exit if still paused (its cleanup runs while Python is whole)

    # -- looking -------------------------------------------------------------------------------

    @property
    def ctx(self) -> Context:
        """The live context of the run: what you assign takes effect when the run resumes.

        Raises:
            RuntimeError: when the stepper cannot know it before the first event.
        """
        if self._ctx is None:
            raise RuntimeError("the run has not started yet: step() takes it to its first event")
        return self._ctx

    @property
    def event(self) -> Event | None:
        """The event the run is paused at (None before the first one)."""
        return self._event

    @property
    def finished(self) -> bool:
        """True once the run is over (ended, closed, aborted or failed)."""
        return self._end is not None

    def where(self) -> str:
        """Return one line saying where the run is paused.

        ``"epoch 2/10 · train · batch 5/32 · on_train_batch_after_loss"`` (``batch 5/?``
        when the data has no length); ``"not started"``; ``"finished"`` (or ``"closed"``,
        ``"aborted by Ctrl-C"``, ``"failed: ..."``) once the run is over.
        """
        if self._end is not None:
            return self._end
        stage = self._stage()
        if stage is None:
            return "not started"
        assert self._ctx is not None
        return position(self._ctx, stage, in_phase=self._in_phase)

    def show(self) -> None:
        """Print where the run is, then the tree of stages with the current one marked ``-->``."""
        print(self.where())
        current = None if self._end is not None else self._stage()
        for depth, stage in tree(self._ctx):
            if depth < 0:
                print(f"    {stage}")
                continue
            marker = "--> " if stage == current else "    "
            print(f"{marker}{'  ' * depth}{stage}")

    def __repr__(self) -> str:
        return f"<Stepper {self.where()}>"

    # -- moving --------------------------------------------------------------------------------

    def step(self, n: int = 1) -> Event | None:
        """Advance ``n`` events (callbacks run as in ``fit``) and return the last one.

        Stops early at ``on_exception`` and ``on_interrupt``. Returns None, with a message,
        when the run ends first.

        Raises:
            ValueError: when ``n`` is not an integer >= 1.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"step(n): n must be an integer >= 1, got {n!r}")
        if self._end is not None:
            self._over(f"step({n})")
            return None
        with self._call():
            for i in range(1, n + 1):
                event = self._advance()
                if event is None:
                    self._ended(f"step({n})" if n == 1 else f"step({n}) after {i - 1} event(s)")
                    return None
                if i < n and event.stage in _PAUSE_ALWAYS:
                    self._paused_early(event, f"step({n}) after {i} event(s)")
                    return event
            return event

    def until(self, target: Target = None, *, when: Callable[[Context], Any] | None = None) -> Event | None:
        """Advance to the next event that matches, and return it.

        Args:
            target: a stage name (``"on_train_batch_after_loss"``), a collection of names
                (the first of any), or a predicate ``fn(event) -> bool``; None matches any
                stage (give ``when`` then).
            when: a predicate ``fn(ctx) -> bool`` that the event must also satisfy, e.g.
                ``when=lambda ctx: ctx.iter == 5``.

        Returns:
            The matching event, the ``on_exception`` or ``on_interrupt`` event where the
            run had to pause first, or None (with a message) when the run ended without a
            match. It always advances at least one event.

        Raises:
            ValueError: a stage name the run does not know (with a suggestion), or one it
                can never reach (``on_valid_*`` without validation data); checked before
                anything runs.
            TypeError: a target or ``when`` of the wrong kind.
        """
        matches, label = self._matcher(target, when)
        if self._end is not None:
            self._over(label)
            return None
        with self._call():
            while True:
                event = self._advance()
                if event is None:
                    self._ended(f"{label}: no match")
                    return None
                if matches(event):
                    return event
                if event.stage in _PAUSE_ALWAYS:
                    self._paused_early(event, label)
                    return event

    def finish(self) -> History | None:
        """Run to the end (callbacks as in ``fit``) and return the history (``ctx.history``).

        An escaping error propagates, as in ``fit()``. A run stopped by Ctrl-C returns its
        history with ``history.interrupted = True`` and a warning. For ``run_evaluate()``
        and ``run_predict()`` the results are in ``ctx.metrics`` and ``ctx.predictions``.
        """
        if self._end is None:
            with self._call():
                if self._ctx is None:
                    self._advance()  # learn ctx: Ctrl-C is handled from here on
                if self._end is None:
                    try:
                        last = deque(self._events, maxlen=1)  # the rest, at C speed
                    except BaseException as exc:
                        self._end = _failure(exc)
                        raise
                    if last:
                        self._event = last[0]
                    self._end = "finished"
        if self._ctx is None:
            return None
        warn_if_interrupted(self._ctx, "Stepper.finish()")
        return self._ctx.history

    def rewind(self) -> Event:
        """Go back to the start of the current training batch and pause at its
        ``on_train_batch_begin`` again; return that event.

        Everything the batch changed is put back as it was when the batch began (parameters,
        buffers, gradients, optimizers, GradScaler, every RNG, counters, the epoch's metrics,
        stateful callbacks; see ``corolux.rewind``), and the batch is the same one. Change
        what you like (``s.ctx.input``, a learning rate in ``s.ctx.opt.param_groups``, a
        callback's setting) and step on; with no change, the batch runs again bit for bit.
        Valid at any stage of a training batch, at its ``on_train_batch_end``, and at an
        ``on_exception`` or ``on_interrupt`` raised inside it (the error is then dropped,
        the graceful stop called off). Needs ``rewindable=True``.

        Example:
            >>> s = trainer.stepper(data, epochs=2, rewindable=True)       # doctest: +SKIP
            >>> s.until("on_train_batch_after_step", when=lambda ctx: ctx.iter == 3)  # doctest: +SKIP
            >>> s.rewind()                                                 # doctest: +SKIP
            Event('on_train_batch_begin', epoch=1, iter=3)
            >>> s.ctx.input = s.ctx.input * 2                              # doctest: +SKIP

        Raises:
            RuntimeError: the stepper was built without ``rewindable=True``; the run has not
                started or is over; it is not inside a training batch (only the current
                batch's start is kept: there is no going back past it).
        """
        rewinder = self._rewinder
        if rewinder is None:
            raise RuntimeError(
                "rewind(): this stepper was built without rewindable=True, so no batch's start was "
                "kept; build it with trainer.stepper(..., rewindable=True) or "
                "corolux.Stepper(trainer.run(...), rewindable=True) (each training batch's state is "
                "then kept in memory: one copy of the parameters and optimizer state)"
            )
        if self._end is not None:
            raise RuntimeError(
                f"rewind(): the run is over ({self._end}); start another with "
                "trainer.stepper(..., rewindable=True)"
            )
        if self._event is None or self._ctx is None:
            raise RuntimeError("rewind(): the run has not started; step() takes it to its first event")
        problem = rewinder.problem(self._ctx)
        if problem is not None:
            raise RuntimeError(
                f"rewind() at {self.where()}: {problem}; rewind() goes back to the start of the "
                "training batch the run is in (only that batch's state is kept, so not past it): "
                "use it from on_train_batch_begin up to on_train_batch_end, or at an on_exception "
                "or on_interrupt raised inside the batch"
            )
        rewinder.request()
        with self._call():
            event = self._advance(Rewind())
        if event is None:  # cannot happen: the loop yields the batch's begin
            self._ended("rewind()")
            raise RuntimeError("rewind(): the run ended instead of restarting the batch")
        return event

    @classmethod
    def from_capture(
        cls,
        trainer: Any,
        path: str | os.PathLike[str],
        *,
        callbacks: Sequence[Any] | None = None,
        rewindable: bool = True,
    ) -> Stepper:
        """Replay the batch a ``CaptureAnomaly`` file holds: pause at its
        ``on_train_batch_begin``, restored to its start (weights, optimizers, GradScaler,
        counters, history, callbacks' states, RNG), so that stepping on shows what failed.

        The run holds that batch alone, at its place (same epoch, ``iter`` and batch count):
        after it the training pass ends (the rest of the epoch is not in the capture), and the
        run with that epoch (its ``max_epochs``). It works in any process.

        Args:
            trainer: a trainer built as for the failing run (same model, optimizers, loss
                function and precision); a capture of another model is refused.
            path: the file ``CaptureAnomaly`` wrote.
            callbacks: the callbacks that shape the step as in the failing run (``MixUp``,
                ``GradientAccumulation``, ``GradientClip``, ...); their saved states are
                restored. Saved states of callbacks not given are left out.
            rewindable: keep the batch's start, so that :meth:`rewind` can run it again.

        Example:
            >>> s = corolux.Stepper.from_capture(trainer, "anomaly.pt")      # doctest: +SKIP
            replaying 'anomaly.pt': epoch 2 (of 5), batch 7/24, where the training loss was nan (...)
            >>> s.until("on_train_batch_after_loss").ctx.loss                # doctest: +SKIP
            tensor(nan, grad_fn=<NllLossBackward0>)

        Raises:
            CheckpointError: ``path`` is not a capture (a checkpoint, another file), or holds
                another model or optimizers.
        """
        events, info = replay_run(trainer, path, callbacks)
        try:
            stepper = cls(events, rewindable=rewindable)
            event = stepper.until(Stage.on_train_batch_begin)
        except BaseException:
            events.close()
            raise
        at = (event.stage, event.ctx.epoch, event.ctx.iter) if event is not None else None
        if at == (Stage.on_train_batch_begin, info["epoch"], info["iter"]):
            print(describe(path, info))
        return stepper  # otherwise paused early (on_exception): the stepper said why

    def close(self) -> None:
        """Abandon the run: nothing more is yielded, cleanup runs (teardown, files, bars),
        and the trainer can start another run. Closing twice is harmless."""
        if self._end is None:
            self._end = "closed"
            close = getattr(self._events, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Stepper:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _stage(self) -> str | None:
        if self._event is not None:
            return self._event.stage
        # A run already partly iterated before it was handed to the stepper.
        return None if self._ctx is None else self._ctx.stage

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """The duration of one call: Ctrl-C asks for a graceful stop; a second one aborts. The
        run keeps its own grad mode (validation runs under ``no_grad``), and the prompt gets
        the user's back between calls."""
        users_grad = torch.is_grad_enabled()
        torch.set_grad_enabled(self._grad_mode)
        with contextlib.ExitStack() as stack:
            self._stack = stack
            self._guard()
            try:
                yield
            except KeyboardInterrupt:
                if self._end is None:  # it landed in the stepper's code, between two events
                    self._end = "aborted by Ctrl-C"
                    close = getattr(self._events, "close", None)
                    if close is not None:
                        close()
                raise
            finally:
                self._stack = None
                self._guarded = False
                self._grad_mode = torch.is_grad_enabled()
                torch.set_grad_enabled(users_grad)

    def _guard(self) -> None:
        if self._stack is not None and not self._guarded and self._ctx is not None:
            self._stack.enter_context(graceful_sigint(self._ctx.signals))
            self._guarded = True

    def _advance(self, rewind: Rewind | None = None) -> Event | None:
        """The next event (after throwing ``rewind`` into the run, when given), or None at
        the end of the run. Never leaks StopIteration."""
        try:
            event = next(self._events) if rewind is None else self._events.throw(rewind)  # type: ignore[attr-defined]
        except StopIteration:
            self._end = "finished"
            return None
        except BaseException as exc:  # a generator that raised is over
            self._end = _failure(exc)
            raise
        self._event = event
        stage = event.stage
        if stage in _PHASE_BEGINS:
            self._in_phase = True
        elif stage in _PHASE_ENDS:
            self._in_phase = False
        if self._ctx is None:
            self._ctx = event.ctx
            self._guard()
        return event

    def _matcher(
        self, target: Target, when: Callable[[Context], Any] | None
    ) -> tuple[Callable[[Event], bool], str]:
        """Check ``until``'s arguments; return the match function and a label for messages."""
        if when is not None and not callable(when):
            raise TypeError(f"until(when=...) takes a predicate fn(ctx) -> bool, got {when!r}")
        label_when = "" if when is None else f", when={_name(when)}"
        test: Callable[[Event], Any]
        if target is None:
            if when is None:
                raise TypeError(
                    "until() needs a stage name, a collection of them, a predicate on the "
                    "event, or when=fn(ctx); e.g. until('on_train_batch_after_loss')"
                )
            label = f"until(when={_name(when)})"
            test = _always
        elif isinstance(target, str):
            self._check_names((target,))
            label = f"until({str(target)!r}{label_when})"
            test = lambda event: event.stage == target
        elif callable(target):
            label = f"until({_name(target)}{label_when})"
            test = target
        elif isinstance(target, Collection) and target and all(isinstance(t, str) for t in target):
            names = frozenset(target)
            self._check_names(names)
            label = f"until({sorted(map(str, names))!r}{label_when})"
            test = lambda event: event.stage in names
        else:
            raise TypeError(
                f"until() takes a stage name, a non-empty collection of stage names, or a "
                f"predicate fn(event) -> bool, got {target!r}; for every n-th event, use e.g. "
                "until('on_train_batch_end', when=lambda ctx: ctx.iter % 100 == 0)"
            )
        if when is None:
            return (lambda event: bool(test(event))), label
        return (lambda event: bool(test(event)) and bool(when(event.ctx))), label

    def _check_names(self, names: Collection[str]) -> None:
        ctx = self._ctx
        # The trainer's full stage set (Stage plus its custom stages) once the context is known.
        known: frozenset[str] = _BUILTIN if ctx is None else ctx.stages or _BUILTIN
        for name in names:
            if name not in known:
                raise ValueError(unknown_stage_message(name, "Stepper.until()", known))
        if ctx is None:
            return
        never = unreachable(ctx)
        if all(name in never for name in names):
            first = min(names)
            raise ValueError(f"Stepper.until(): this run never reaches {str(first)!r}: {never[first]}")

    def _ended(self, what: str) -> None:
        last = "" if self._event is None else f" (its last event was {str(self._event.stage)!r})"
        print(f"{what}: the run has ended{last}; finish() returns the history")

    def _over(self, what: str) -> None:
        print(f"{what}: the run is over ({self._end}); start another with trainer.stepper(...)")

    def _paused_early(self, event: Event, what: str) -> None:
        again = (
            ""
            if self._rewinder is None or self._rewinder.problem(event.ctx) is not None
            else "; s.rewind() runs the batch again"
        )
        if event.stage == Stage.on_exception:
            print(
                f"{what}: paused at on_exception: {event.ctx.exception!r} is escaping; look "
                f"at ctx (ctx.exception, ctx.batch, ...), then step() re-raises it{again}"
            )
        else:
            print(
                f"{what}: paused at on_interrupt (Ctrl-C): the run is stopping gracefully; "
                f"finish() ends it and returns the history{again}"
            )


def _failure(exc: BaseException) -> str:
    """How ``where()`` tells a run that ended with ``exc``."""
    return "aborted by Ctrl-C" if isinstance(exc, KeyboardInterrupt) else f"failed: {exc!r}"


def _always(event: Event) -> bool:
    return True


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or repr(fn)
