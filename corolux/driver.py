"""Running callbacks: each stage's weight-sorted handlers, built once per run; coroutines;
signals; exception notes; setup and teardown.

The driver wraps the loop generator. For each stage the loop yields, it delivers the stage
(in :meth:`Driver.events`: count it, merge in the coroutines due, run the handlers in
``(weight, position)`` order, note errors), then yields the ``Event`` to the consumer.
Every stage goes through that one path: the loop's ordinary stages, the stages callbacks
emit and ``on_interrupt`` (the loop yields those too) and ``on_exception`` (the driver's
own). Class handlers are sorted once per run; a coroutine is merged in among them when it
starts waiting for a stage (the stage it waits for changes as it runs), and at delivery
when a filter of it is due. A stage nobody listens to costs one dict look-up. In a run
without a consumer and without coroutines (``fit()``), whose handlers are therefore fixed,
the loop passes over the batch stages nobody listens to, and calls the handlers of the
``*_batch_end`` stages itself, with the driver's order and its error handling
(``corolux.loop.Routing``): the one exception to the one path, for the one stage that every
batch of every ``fit()`` delivers. An error of such a handler comes back from the loop as a
``Failure``, which the driver raises as if the handler had failed here.

A rewindable run (``corolux.rewind``) adds two cold paths: the loop may yield a ``Failure``
(an error of a training batch's step), which the driver raises as if it had escaped, and
``Stepper.rewind()`` throws ``Rewind`` at the consumer's yield, which the driver passes into
the loop (an error it was delivering at ``on_exception`` then no longer escapes).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import warnings
import weakref
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from corolux._suggest import unknown_stage_message
from corolux.callback import CoroutineCallback, handlers_of, weight_of
from corolux.context import Context
from corolux.control import ControlSignal
from corolux.events import BATCH_ENDS, Event, Filter, Stage
from corolux.loop import YIELD_ALL, Routing
from corolux.rewind import Failure, Rewind

__all__ = ["Driver", "check_callbacks", "context_of"]

_NEVER = float("inf")
_BUILT_IN = frozenset(Stage)
_ORDER = operator.itemgetter(0, 1)  # handlers run by (weight, position)
Loop = Generator[Stage | str | Failure, None, None]
#: Builds the run's loop generator, given what it may do instead of yielding a stage.
MakeLoop = Callable[[Routing], Loop]
Entry = tuple[float, int, Callable[[Context], Any], Any]  # (weight, position, handler, owner)


def _display(cb: Any) -> str:
    return cb.name if isinstance(cb, CoroutineCallback) else type(cb).__name__


def check_callbacks(
    callbacks: Sequence[Any], stages: Collection[str]
) -> list[dict[str, Callable[[Context], Any]] | None]:
    """Reject what cannot be a callback, bad weights and unknown ``on_*`` names, before the
    first event; return each class callback's handlers by stage (None for a coroutine)."""
    found: list[dict[str, Callable[[Context], Any]] | None] = []
    for cb in callbacks:
        if isinstance(cb, type):
            raise TypeError(f"callbacks: got the class {cb.__name__}; pass an instance: {cb.__name__}(...)")
        if getattr(cb, "__corolux_coroutine__", False):
            raise TypeError(
                f"callbacks: got the coroutine factory {cb.__name__}; call it to build the "
                f"callback: {cb.__name__}(...)"
            )
        weight = getattr(cb, "weight", 0)
        if isinstance(weight, Mapping):
            for stage in weight:
                if stage not in stages:
                    raise ValueError(unknown_stage_message(stage, f"{_display(cb)}.weight", stages))
                weight_of(cb, stage)  # raises TypeError for a non-numeric value
        weight_of(cb, "on_fit_begin")  # raises TypeError for a non-numeric weight
        if isinstance(cb, CoroutineCallback):
            found.append(None)
            continue
        names = handlers_of(cb)
        found.append(names)
        if not names and not any(hasattr(cb, m) for m in ("setup", "teardown")):
            raise TypeError(
                f"callbacks: {cb!r} ({type(cb).__name__}) defines no on_<stage> method, setup "
                "or teardown; subclass corolux.Callback and define e.g. on_epoch_end(self, ctx)"
            )
        for name in names:
            if name not in stages:
                raise ValueError(unknown_stage_message(name, f"{type(cb).__name__}.{name}", stages))
    return found


class _Coroutine:
    """A running coroutine callback: its generator and where it waits."""

    __slots__ = ("cb", "gen", "name", "position", "slots", "spec", "weights", "wakers", "wake")

    def __init__(
        self,
        cb: CoroutineCallback,
        gen: Generator[Any, Event, None],
        position: int,
        wake: Callable[[_Coroutine, _Slot, Context], None],
    ) -> None:
        self.cb = cb
        self.gen = gen
        self.name = cb.name
        self.position = position
        self.slots: list[_Slot] = []
        self.spec: Any = None  # what it waits for now
        self.weights: dict[str, float] = {}
        self.wakers: dict[str, Callable[[Context], None]] = {}
        self.wake = wake

    def weight(self, stage: str) -> float:
        weight = self.weights.get(stage)
        if weight is None:
            weight = self.weights[stage] = weight_of(self.cb, stage)
        return weight

    def waker(self, slot: _Slot) -> Callable[[Context], None]:
        """The handler that wakes this coroutine at ``slot``'s stage (built once per stage)."""
        waker = self.wakers.get(slot.stage)
        if waker is None:
            waker = self.wakers[slot.stage] = functools.partial(self.wake, self, slot)
        return waker


class _Slot:
    """Everything the driver needs for one stage, found with one dict look-up."""

    __slots__ = (
        "stage",
        "event",
        "entries",
        "waiters",
        "filters",
        "count",
        "next_due",
        "counting",
        "watched",
        "handlers",
        "owners",
    )

    def __init__(self, stage: str, ctx: Context, counting: bool) -> None:
        self.stage = stage
        self.event = Event(stage, ctx)
        self.entries: tuple[Entry, ...] = ()  # the class handlers, sorted
        self.waiters: list[_Coroutine] = []
        self.filters: list[tuple[int, _Coroutine]] = []
        self.count = 0  # occurrences so far, kept while ``counting`` (for ``every`` filters)
        self.next_due: float = _NEVER
        self.counting = counting  # the run has coroutines, which may wait on filters
        self.watched = counting
        # The class handlers and the wakers of the waiting coroutines, in (weight, position)
        # order, and the callback of each (for error notes): what the delivery runs.
        self.handlers: tuple[Callable[[Context], Any], ...] = ()
        self.owners: tuple[Any, ...] = ()

    def refresh(self) -> None:
        """Recompute what depends on the handlers, waiters and filters (after they change)."""
        self.next_due = min(due for due, _ in self.filters) if self.filters else _NEVER
        self.watched = bool(self.entries or self.waiters or self.filters or self.counting)
        # A coroutine waiting on this stage twice over (['s', 's']) is woken once.
        self.handlers, self.owners = self.merged(dict.fromkeys(self.waiters))

    def due(self) -> tuple[tuple[Callable[[Context], Any], ...], tuple[Any, ...]]:
        """The handlers with the coroutines whose filters are due merged in, once each."""
        coroutines = dict.fromkeys(self.waiters)
        coroutines.update(dict.fromkeys(co for at, co in self.filters if at <= self.count))
        return self.merged(coroutines)

    def merged(
        self, coroutines: Collection[_Coroutine]
    ) -> tuple[tuple[Callable[[Context], Any], ...], tuple[Any, ...]]:
        """The class handlers with ``coroutines`` merged in by (weight, position)."""
        merged = list(self.entries)  # sorted already
        if coroutines:
            merged.extend((co.weight(self.stage), co.position, co.waker(self), co.cb) for co in coroutines)
            merged.sort(key=_ORDER)
        return tuple(e[2] for e in merged), tuple(e[3] for e in merged)


class Driver:
    """Runs one run's callbacks around its loop generator.

    ``start(make_loop)`` returns the generator that ``Trainer.run()`` returns.
    """

    def __init__(self, ctx: Context, callbacks: Sequence[Any], stages: Collection[str]) -> None:
        handlers = check_callbacks(callbacks, stages)
        self.ctx = ctx
        self.stages = frozenset(stages)
        order = sorted(range(len(callbacks)), key=lambda i: (weight_of(callbacks[i], "on_fit_begin"), i))
        ctx.callbacks = [callbacks[i] for i in order]
        counting = any(isinstance(cb, CoroutineCallback) for cb in callbacks)
        self.counting = counting
        # Keyed by the Stage members the loop yields (a str value finds the same slot); a
        # stage's slot is made when it is first needed (a run meets a few of its stages).
        self.slots: dict[str, _Slot] = {}
        entries: dict[str, list[Entry]] = {}
        coroutines: list[tuple[_Coroutine, Any]] = []
        for position, (cb, found) in enumerate(zip(callbacks, handlers, strict=True)):
            if found is None:  # a coroutine
                gen, first = cb.start()
                if first is not None:
                    coroutines.append((_Coroutine(cb, gen, position, self._wake), first))
                continue
            for name, handler in found.items():
                entries.setdefault(name, []).append((weight_of(cb, name), position, handler, cb))
        # A callback with wrap_handler (Profile) wraps every other callback's class handlers,
        # once per run: nothing is wrapped, and nothing costs more, in a run without one.
        wrappers = [cb for cb in callbacks if callable(getattr(cb, "wrap_handler", None))]
        for name, items in entries.items():
            for wrapper in wrappers:
                items[:] = [
                    (w, pos, handler if cb is wrapper else wrapper.wrap_handler(handler, cb, name), cb)
                    for w, pos, handler, cb in items
                ]
            items.sort(key=_ORDER)
            # One function given to two callbacks gets a distinct object each, so that an
            # error is noted with the callback that ran it (owners are found by position).
            seen: set[int] = set()
            for i, (weight, position, handler, cb) in enumerate(items):
                if id(handler) in seen:
                    items[i] = (weight, position, functools.partial(handler), cb)
                seen.add(id(handler))
            slot = self._slot(name)
            slot.entries = tuple(items)
            slot.refresh()
        self._annotated: BaseException | None = None
        for co, first in coroutines:
            self._wait(co, first)

    def _slot(self, stage: str) -> _Slot:
        """The slot of ``stage`` (one of this run's stages), made at its first use."""
        slot = self.slots.get(stage)
        if slot is None:
            member = Stage(stage) if stage in _BUILT_IN else stage  # events carry the Stage member
            slot = self.slots[member] = _Slot(member, self.ctx, self.counting)
        return slot

    def listeners(self, stage: str) -> tuple[Any, ...]:
        """The callbacks listening to ``stage`` now (class handlers and waiting coroutines)."""
        slot = self.slots.get(stage)
        return () if slot is None else slot.owners

    # -- the run -------------------------------------------------------------------------------

    def start(
        self,
        make_loop: MakeLoop,
        *,
        consumer: bool = True,
        finished: Callable[[Context, bool], None] | None = None,
        scope: AbstractContextManager[Any] | None = None,
    ) -> Generator[Event, None, None]:
        """Return the run's event generator (what ``Trainer.run()`` returns); nothing runs
        until its first ``next()``. ``context_of(gen)`` finds this run's ``ctx``;
        ``finished(ctx, in_batch)`` is called once the run has ended, after every teardown
        (``in_batch``: it ended inside a batch, by an error or a ``close()`` there). ``scope``
        is entered before the callbacks' ``setup`` and exited after ``finished``, in every
        outcome (the compiled forward of ``Trainer(compile=...)``)."""
        gen = self.events(make_loop, consumer=consumer, finished=finished, scope=scope)
        _CONTEXTS[gen] = weakref.ref(self.ctx)
        return gen

    def events(
        self,
        make_loop: MakeLoop,
        *,
        consumer: bool = True,
        finished: Callable[[Context, bool], None] | None = None,
        scope: AbstractContextManager[Any] | None = None,
    ) -> Generator[Event, None, None]:
        """Set up, drive the loop and its callbacks, tear down; yield each Event.

        ``consumer=False`` (``fit()``, ``evaluate()``, ``predict()``) runs the same delivery
        without suspending at each event: the whole run happens in the first ``next()``.
        With no consumer and no coroutine, the loop may pass over the stages no handler
        listens to (they would reach nobody), and it calls the ``*_batch_end`` handlers
        itself (``corolux.loop.Routing``).
        """
        __tracebackhide__ = True
        ctx = self.ctx
        slots = self.slots
        loop = None
        escaping: BaseException | None = None
        # The loop switches train/eval mode; the run restores each submodule's own mode.
        modes = [(module, module.training) for module in ctx.model.modules()]
        routing = YIELD_ALL
        if not consumer and not self.counting:  # a stage's handlers are fixed for the run
            watched = {stage for stage, slot in slots.items() if slot.watched}
            routing = Routing(
                pass_over=frozenset(stage for stage in self.stages if stage not in watched),
                in_place={
                    stage: slot.handlers
                    for stage, slot in slots.items()
                    if stage in BATCH_ENDS and slot.handlers
                },
                failed=self._failed_in_place,
            )
        stages: Iterable[str | Failure] = ()
        entered: AbstractContextManager[Any] | None = None
        try:
            while True:
                try:
                    if loop is None and escaping is None:  # the first pass: set up, start the loop
                        if scope is not None:
                            scope.__enter__()
                            entered = scope
                        self._call_each("setup")
                        stages = loop = make_loop(routing)
                    # The one delivery path, written out because it is the hot path: every
                    # stage the loop yields goes through here, and on_exception after it.
                    for stage in stages:
                        try:
                            slot = slots[stage]  # type: ignore[index]  # a Failure: KeyError
                        except KeyError:  # a stage met for the first time, or not a stage
                            failure = self._failure(stage)  # or a ValueError for an unknown stage
                            if failure is not None:
                                break
                            slot = self._slot(stage)  # type: ignore[arg-type]
                        if slot.watched:
                            handlers, owners = slot.handlers, slot.owners
                            if slot.counting:  # a run with coroutines counts, for every()
                                slot.count += 1
                                if slot.count >= slot.next_due:
                                    handlers, owners = slot.due()
                            for handler in handlers:
                                try:
                                    handler(ctx)
                                except BaseException as exc:
                                    self._failed(exc, owners[handlers.index(handler)], slot.stage)
                        if consumer:
                            yield slot.event
                    else:
                        break
                    # A Failure: a rewindable run's step, or a handler the loop called in place,
                    # failed inside a batch: raised here, outside the except above, as if it had
                    # escaped the loop (or a handler here), while the loop waits in the batch.
                    raise failure.error
                except Rewind as rewind:  # Stepper.rewind() threw it at the yield (corolux.rewind)
                    if loop is None or inspect.getgeneratorstate(loop) == inspect.GEN_CLOSED:
                        raise RuntimeError("rewind(): the loop did not restart the batch") from None
                    escaping = self._annotated = None  # a rewind from on_exception: nothing escapes
                    stages = itertools.chain(_thrown(loop, rewind), loop)
                except Exception as exc:
                    if escaping is None:  # setup, the loop, a step or a handler failed
                        escaping = exc
                        self._note_escaping(exc)
                        stages = (Stage.on_exception,)  # delivered as any stage, then raised
                        continue
                    if exc is not self._annotated:  # the consumer threw into the generator
                        raise
                    escaping.add_note(f"and while handling it, on_exception raised {exc!r}")
                    if ctx.rewinder is not None:
                        ctx.rewinder.refuse("an on_exception handler failed while the error escaped")
                    if consumer:
                        yield self._slot(Stage.on_exception).event
                    break
            if escaping is not None:
                raise escaping
        except BaseException as exc:  # KeyboardInterrupt (abort), GeneratorExit (close)
            if escaping is None:
                escaping = exc
            raise
        finally:
            try:
                in_batch = ctx.in_batch  # (closing the loop ends an open batch)
                if loop is not None:
                    loop.close()
                for module, training in modes:
                    module.training = training
                self._close_coroutines()
                self._call_each("teardown", escaping)
                if finished is not None and loop is not None:
                    finished(ctx, in_batch)
            finally:
                if entered is not None:
                    entered.__exit__(None, None, None)

    def _note_escaping(self, exc: Exception) -> None:
        """An error escapes the loop: note where it was raised (unless a handler's note says
        so already), and make it ``ctx.exception`` for the ``on_exception`` handlers."""
        ctx = self.ctx
        if exc is not self._annotated and ctx.stage is not None:
            where = f"the {ctx.phase} step" if ctx.in_batch else "the loop"
            exc.add_note(f"raised in {where} after {str(ctx.stage)!r} (epoch {ctx.epoch}, batch {ctx.iter})")
        ctx.exception = exc
        ctx.stage = Stage.on_exception  # the driver's own stage: the loop has ended

    def discard(self) -> None:
        """Close the coroutines of a run that never started (they were primed to validate
        their first stage); nothing else ran, so there is nothing else to clean up."""
        self._close_coroutines()

    def _failure(self, stage: Any) -> Failure | None:
        """What the loop yielded that has no slot yet: None for one of this run's stages; a
        :class:`Failure`, returned; anything else is an unknown stage (raised)."""
        if type(stage) is Failure:
            return stage
        try:
            if stage in self.stages:
                return None
        except TypeError:  # unhashable
            pass
        raise ValueError(unknown_stage_message(stage, "the step's yields", self.stages)) from None

    # -- coroutines ----------------------------------------------------------------------------

    def _wake(self, co: _Coroutine, slot: _Slot, ctx: Context) -> None:
        """Send ``slot``'s event to ``co`` (its waker is one of the slot's handlers) and
        register it for what it waits for next."""
        __tracebackhide__ = True
        try:
            spec = co.gen.send(slot.event)
        except StopIteration:
            self._unwait(co)
            return
        except ControlSignal as signal:
            self._unwait(co)
            self._apply(signal, co.cb, slot.stage)
            warnings.warn(
                f"coroutine {co.name} raised {type(signal).__name__} at {str(slot.stage)!r}, which "
                f"ended it; to keep it running, call event.ctx.{_METHOD[type(signal).__name__]}() "
                "and yield the next stage instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        except KeyboardInterrupt:
            self._unwait(co)
            self.ctx.signals.keyboard_interrupt()  # a graceful stop, or an abort
            return
        except Exception as exc:
            self._unwait(co)
            self._annotate(exc, co.name, slot.stage)
            raise
        if type(spec) is str and spec == co.spec or spec is co.spec and isinstance(spec, Stage):
            return  # waits for the same stage again: its registration stands
        self._unwait(co)
        try:
            self._wait(co, spec)
        except Exception as exc:
            co.gen.close()
            self._annotate(exc, co.name, slot.stage)
            raise

    def _wait(self, co: _Coroutine, spec: Any) -> None:
        """Register ``co`` on the stages (or filters) of ``spec``."""
        items: Iterable[Any]
        if isinstance(spec, (str, Filter)):
            items = (spec,)
        elif isinstance(spec, Collection) and spec:
            items = spec
        else:
            raise TypeError(
                f"coroutine {co.name} yielded {spec!r}; a coroutine yields the stage it waits "
                "for: a stage name, a collection of them, or a filter such as "
                "corolux.every('on_train_batch_end', 100)"
            )
        co.spec = spec
        for item in items:
            name = item.stage if isinstance(item, Filter) else item
            if not isinstance(item, (str, Filter)) or name not in self.stages:
                if not isinstance(item, (str, Filter)):
                    raise TypeError(
                        f"coroutine {co.name} yielded {item!r} in {spec!r}; expected stage names or filters"
                    )
                raise ValueError(unknown_stage_message(name, f"coroutine {co.name}", self.stages))
            slot = self._slot(name)
            if isinstance(item, Filter):
                slot.filters.append((item.next_due(slot.count), co))
            else:
                slot.waiters.append(co)
            co.slots.append(slot)
            slot.refresh()

    def _unwait(self, co: _Coroutine) -> None:
        for slot in co.slots:
            if co in slot.waiters:
                slot.waiters = [w for w in slot.waiters if w is not co]
            if slot.filters:
                slot.filters = [f for f in slot.filters if f[1] is not co]
            slot.refresh()
        co.slots = []

    # -- signals and errors ----------------------------------------------------------------

    def _failed(self, exc: BaseException, owner: Any, stage: str) -> None:
        """A class handler raised ``exc``: apply a signal, turn Ctrl-C into a graceful stop,
        or note the callback and stage on an error and re-raise it."""
        __tracebackhide__ = True
        if isinstance(exc, ControlSignal):
            self._apply(exc, owner, stage)
        elif isinstance(exc, KeyboardInterrupt):
            self.ctx.signals.keyboard_interrupt()  # a graceful stop, or an abort
        elif isinstance(exc, Exception):
            self._annotate(exc, _display(owner), stage)
            raise exc
        else:
            raise exc

    def _failed_in_place(self, exc: BaseException, stage: str, handler: Callable[[Context], Any]) -> None:
        """``_failed`` for a handler that the loop called itself (``Routing.in_place``)."""
        __tracebackhide__ = True
        slot = self.slots[stage]
        self._failed(exc, slot.owners[slot.handlers.index(handler)], stage)

    def _apply(self, signal: ControlSignal, owner: Any, stage: str) -> None:
        try:
            signal.apply(self.ctx)
        except Exception as exc:
            self._annotate(exc, _display(owner), stage)
            raise exc from None

    def _annotate(self, exc: BaseException, owner: str, stage: str) -> None:
        if exc is not self._annotated:
            exc.add_note(f"in {owner}.{stage}")
            self._annotated = exc

    def _call_each(self, method: str, escaping: BaseException | None = None) -> None:
        """Call ``setup``/``teardown`` on every callback that has it, in weight order.

        Every teardown runs; the first teardown error is raised after them, or, when an
        exception is already escaping, noted on it instead.
        """
        ctx = self.ctx
        errors: list[BaseException] = []
        for cb in ctx.callbacks:
            fn = getattr(cb, method, None)
            if fn is None:
                continue
            try:
                fn(ctx)
            except Exception as exc:
                exc.add_note(f"in {_display(cb)}.{method}")
                if method == "setup":
                    raise
                errors.append(exc)
        if errors and isinstance(escaping, GeneratorExit):
            raise errors[0]  # close() raises it to its caller: a failed cleanup must not pass unseen
        if errors and escaping is not None:
            for error in errors:
                escaping.add_note(f"and during cleanup: {error!r} ({error.__notes__[-1]})")
        elif errors:
            raise errors[0]

    def _close_coroutines(self) -> None:
        if not self.counting:
            return  # the run has no coroutine
        seen: set[int] = set()
        for slot in self.slots.values():
            for co in [*slot.waiters, *(c for _, c in slot.filters)]:
                if id(co) not in seen:
                    seen.add(id(co))
                    co.gen.close()
            slot.waiters = []
            slot.filters = []
            slot.refresh()


def _thrown(loop: Loop, rewind: Rewind) -> Iterator[Stage | str | Failure]:
    """The stage the loop yields when ``rewind`` is thrown into it (the batch's begin)."""
    yield loop.throw(rewind)


_METHOD = {
    "StopTraining": "stop_training",
    "SkipBatch": "skip_batch",
    "SkipValidation": "skip_validation",
}


# Weak both ways: a run's ctx may reach its own generator (an escaped error's traceback holds
# the generator's frames), so a strong value would keep the entry, and everything the ctx and
# those frames hold (a DataLoader's workers), alive for the whole process.
_CONTEXTS: weakref.WeakKeyDictionary[Generator[Event, None, None], weakref.ref[Context]] = (
    weakref.WeakKeyDictionary()
)


def context_of(events: Iterator[Event]) -> Context | None:
    """The context of a run generator made by ``Trainer.run()`` (and its siblings), known
    before its first event; None for any other iterator."""
    try:
        ref = _CONTEXTS.get(events)  # type: ignore[call-overload]
    except TypeError:  # not weak-referenceable: not one of ours
        return None
    return None if ref is None else ref()
