"""Running callbacks: each stage's weight-sorted handlers, built once per run; coroutines;
signals; exception notes; setup and teardown.

The driver wraps the loop generator. For each stage the loop yields it runs the handlers
that listen to that stage, in ``(weight, position)`` order, then yields the ``Event`` to
the consumer. Class handlers are sorted once per run; a coroutine callback is merged in
among them when it starts waiting for a stage (the stage it waits for changes as it runs),
and at dispatch time when a filter of it is due. A stage nobody listens to costs one dict
look-up and one attribute write (a run with coroutines also counts it, for ``every``
filters); under ``fit()``, the loop does not even yield it inside a batch (``ctx._silent``).
"""

from __future__ import annotations

import contextlib
import operator
import signal
import threading
import warnings
import weakref
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any

from corolux._suggest import unknown_stage_message
from corolux.callback import CoroutineCallback, listened_stages, weight_of
from corolux.context import Context
from corolux.control import ControlSignal
from corolux.events import Event, Filter, Stage

__all__ = ["Driver", "check_callbacks", "context_of", "graceful_sigint", "warn_if_interrupted"]

_NEVER = float("inf")
_ORDER = operator.itemgetter(0, 1)  # handlers run by (weight, position)
Loop = Generator[Stage | str, None, None]


def _display(cb: Any) -> str:
    return cb.name if isinstance(cb, CoroutineCallback) else type(cb).__name__


def check_callbacks(callbacks: Sequence[Any], stages: Collection[str]) -> None:
    """Reject what cannot be a callback, bad weights and unknown ``on_*`` names, before the
    first event."""
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
            continue
        names = listened_stages(type(cb))
        if not names and not any(hasattr(cb, m) for m in ("setup", "teardown")):
            raise TypeError(
                f"callbacks: {cb!r} ({type(cb).__name__}) defines no on_<stage> method, setup "
                "or teardown; subclass corolux.Callback and define e.g. on_epoch_end(self, ctx)"
            )
        for name in names:
            if name not in stages:
                raise ValueError(unknown_stage_message(name, f"{type(cb).__name__}.{name}", stages))


class _Coroutine:
    """A running coroutine callback: its generator and where it waits."""

    __slots__ = ("cb", "gen", "name", "position", "slots", "spec", "weights")

    def __init__(self, cb: CoroutineCallback, gen: Generator[Any, Event, None], position: int):
        self.cb = cb
        self.gen = gen
        self.name = cb.name
        self.position = position
        self.slots: list[_Slot] = []
        self.spec: Any = None  # what it waits for now
        self.weights: dict[str, float] = {}

    def weight(self, stage: str) -> float:
        weight = self.weights.get(stage)
        if weight is None:
            weight = self.weights[stage] = weight_of(self.cb, stage)
        return weight


class _Slot:
    """Everything the driver needs for one stage, found with one dict look-up."""

    __slots__ = (
        "stage",
        "owners",
        "event",
        "fns",
        "entries",
        "waiters",
        "filters",
        "count",
        "next_due",
        "counting",
        "watched",
        "order",
    )

    def __init__(self, stage: str, ctx: Context, counting: bool) -> None:
        self.stage = stage
        self.event = Event(stage, ctx)
        self.fns: tuple[Callable[[Context], Any], ...] = ()
        self.owners: tuple[Any, ...] = ()  # the callback of each fn, for error notes
        self.entries: tuple[tuple[float, int, Callable[[Context], Any], Any], ...] = ()
        self.waiters: list[_Coroutine] = []
        self.filters: list[tuple[int, _Coroutine]] = []
        self.count = 0  # occurrences so far, kept while ``counting`` (for ``every`` filters)
        self.next_due: float = _NEVER
        self.counting = counting  # the run has coroutines, which may wait on filters
        self.watched = counting
        # The class handlers and the waiting coroutines, as (handler, owner) in (weight,
        # position) order: what _dispatch runs when no filter is due.
        self.order: tuple[tuple[Any, Any], ...] = ()

    def refresh(self) -> None:
        """Recompute what depends on the handlers, waiters and filters (after they change)."""
        self.next_due = min(due for due, _ in self.filters) if self.filters else _NEVER
        self.watched = bool(self.fns or self.waiters or self.filters or self.counting)
        # A coroutine waiting on this stage twice over (['s', 's']) is woken once.
        waiting = dict.fromkeys(self.waiters)
        self.order = tuple((handler, owner) for _, _, handler, owner in self.merged(waiting))

    def merged(self, coroutines: Iterable[_Coroutine]) -> list[tuple[float, int, Any, Any]]:
        """The class handlers' entries with ``coroutines`` merged in by (weight, position)."""
        merged = list(self.entries)
        merged.extend((co.weight(self.stage), co.position, co, co.cb) for co in coroutines)
        merged.sort(key=_ORDER)
        return merged


class Driver:
    """Runs one run's callbacks around its loop generator.

    ``events(make_loop)`` is the generator that ``Trainer.run()`` returns.
    """

    def __init__(self, ctx: Context, callbacks: Sequence[Any], stages: Collection[str]) -> None:
        check_callbacks(callbacks, stages)
        self.ctx = ctx
        self.stages = frozenset(stages)
        order = sorted(range(len(callbacks)), key=lambda i: (weight_of(callbacks[i], "on_fit_begin"), i))
        ctx.callbacks = [callbacks[i] for i in order]
        counting = any(isinstance(cb, CoroutineCallback) for cb in callbacks)
        self.counting = counting
        # Keyed by the Stage members the loop yields (a str value finds the same slot).
        self.slots: dict[str, _Slot] = {stage: _Slot(stage, ctx, counting) for stage in stages}
        entries: dict[str, list[tuple[float, int, Callable[[Context], Any], Any]]] = {}
        coroutines: list[tuple[_Coroutine, Any]] = []
        for position, cb in enumerate(callbacks):
            if isinstance(cb, CoroutineCallback):
                gen, first = cb.start()
                if first is not None:
                    coroutines.append((_Coroutine(cb, gen, position), first))
                continue
            for name in listened_stages(type(cb)):
                entries.setdefault(name, []).append((weight_of(cb, name), position, getattr(cb, name), cb))
        for name, items in entries.items():
            items.sort(key=lambda e: (e[0], e[1]))
            slot = self.slots[name]
            slot.entries = tuple(items)
            slot.fns = tuple(fn for _, _, fn, _ in items)
            slot.owners = tuple(cb for _, _, _, cb in items)
            slot.refresh()
        self._annotated: BaseException | None = None
        for co, first in coroutines:
            self._wait(co, first)

    # -- the run -------------------------------------------------------------------------------

    def start(self, make_loop: Callable[[], Loop], *, quiet: bool = False) -> Generator[Event, None, None]:
        """Return the run's event generator (what ``Trainer.run()`` returns); nothing runs
        until its first ``next()``. ``context_of(gen)`` finds this run's ``ctx``."""
        gen = self.events(make_loop, quiet=quiet)
        _CONTEXTS[gen] = self.ctx
        return gen

    def events(self, make_loop: Callable[[], Loop], *, quiet: bool = False) -> Generator[Event, None, None]:
        """Set up, drive the loop and its callbacks, tear down; yield each Event.

        ``quiet=True`` (``fit()``, which has no consumer) runs the same dispatch without
        suspending at each event: the whole run happens in the first ``next()``.
        """
        __tracebackhide__ = True
        ctx = self.ctx
        slots = self.slots
        loop = None
        escaping: BaseException | None = None
        # The loop switches train/eval mode; the run restores each submodule's own mode.
        modes = [(module, module.training) for module in ctx.model.modules()]
        if quiet and not self.counting:
            # No consumer and no coroutine: a stage no handler watches reaches nobody, so the
            # loop only records it in ctx.stage. It does so inside a batch only, and yields the
            # stage anyway while ctx._attention is set, so an emit or a Ctrl-C is acted on
            # where it would be if every stage came here.
            ctx._silent = frozenset(stage for stage, slot in slots.items() if not slot.watched)
        try:
            self._call_each("setup")
            loop = make_loop()
            for stage in loop:
                # The hot path, written out: a slot look-up, and the class handlers of
                # watched stages; everything rare goes through _attend.
                try:
                    slot = slots[stage]
                except KeyError:
                    raise self._unknown(stage) from None
                ctx.stage = stage
                if slot.watched:
                    if slot.counting and self._due(slot):
                        self._dispatch(slot)  # coroutines are due: merge them in
                    else:
                        for fn in slot.fns:
                            try:
                                fn(ctx)
                            except BaseException as exc:
                                self._failed(exc, slot.owners[slot.fns.index(fn)], stage)
                if not quiet:
                    yield slot.event
                if ctx._attention:
                    yield from self._attend(loop, quiet)
        except Exception as exc:
            if exc is not self._annotated and ctx.stage is not None:
                where = f"the {ctx.phase} step" if ctx._in_batch else "the loop"
                exc.add_note(
                    f"raised in {where} after {str(ctx.stage)!r} (epoch {ctx.epoch}, batch {ctx.iter})"
                )
            ctx.exception = exc
            slot = slots[Stage.on_exception]
            ctx.stage = Stage.on_exception
            if slot.watched:
                try:
                    self._dispatch(slot)
                except Exception as nested:
                    exc.add_note(f"and while handling it, on_exception raised {nested!r}")
            escaping = exc
            if not quiet:
                yield slot.event
            raise
        except BaseException as exc:  # KeyboardInterrupt (abort), GeneratorExit (close)
            escaping = exc
            raise
        finally:
            if loop is not None:
                loop.close()
            for module, training in modes:
                module.training = training
            self._close_coroutines()
            self._call_each("teardown", escaping)

    def _attend(self, loop: Loop, quiet: bool) -> Generator[Event, None, None]:
        """The rare path after an event: deliver the stages handlers emitted
        (``ctx.emit``), in order, then throw a pending Ctrl-C into the loop and run the
        stages it yields, until nothing more asks for attention."""
        ctx = self.ctx
        while ctx._attention:
            while ctx._emitted:
                previous = ctx.stage
                yield from self._deliver(ctx._emitted.pop(0), quiet)
                ctx.stage = previous
            stage = self._interrupt(loop)
            if stage is None:
                return
            yield from self._deliver(stage, quiet)

    def _deliver(self, stage: str, quiet: bool) -> Generator[Event, None, None]:
        """Run ``stage``'s handlers and coroutines, and yield its event unless quiet (what
        the event loop does inline)."""
        slot = self.slots.get(stage)
        if slot is None:
            raise self._unknown(stage)
        self.ctx.stage = stage
        slot.count += 1
        if slot.watched:
            self._dispatch(slot)
        if not quiet:
            yield slot.event

    def _due(self, slot: _Slot) -> bool:
        """In a run with coroutines: count this occurrence of the slot's stage; whether a
        coroutine waits for it or a filter of one is due."""
        slot.count += 1
        return bool(slot.waiters) or slot.count >= slot.next_due

    def _unknown(self, stage: Any) -> ValueError:
        return ValueError(unknown_stage_message(stage, "the step's yields", self.stages))

    def _interrupt(self, loop: Generator[Stage | str, None, None]) -> Stage | str | None:
        """If Ctrl-C asked for a stop, throw it into the loop at this yield; return the
        next stage (``on_interrupt``), or None."""
        ctx = self.ctx
        ctx._attention = False
        if not ctx._interrupt_pending:
            return None
        ctx._interrupt_pending = False
        try:
            return loop.throw(KeyboardInterrupt())
        except StopIteration:
            return None
        except KeyboardInterrupt:
            if ctx._aborting:
                raise  # a second Ctrl-C: abort
            # No scope was left open (the run was at its last event): it simply ends here.
            ctx._stop_for_interrupt()
            return None

    # -- dispatch ------------------------------------------------------------------------------

    def _dispatch(self, slot: _Slot) -> None:
        """Run the stage's handlers with its due coroutines merged in by (weight, position).

        The event loop in :meth:`events` runs class handlers alone itself (the hot path);
        this serves stages with coroutines due, emitted stages and ``on_exception``.
        """
        __tracebackhide__ = True
        ctx = self.ctx
        stage = slot.stage
        order: Iterable[tuple[Any, Any]] = slot.order
        if slot.count >= slot.next_due:  # filters are due too: merge them in, once each
            due = dict.fromkeys(slot.waiters)
            due.update(dict.fromkeys(co for at, co in slot.filters if at <= slot.count))
            order = [(handler, owner) for _, _, handler, owner in slot.merged(due)]
        for handler, owner in order:
            if type(handler) is _Coroutine:
                self._wake(handler, slot)
                continue
            try:
                handler(ctx)
            except BaseException as exc:
                self._failed(exc, owner, stage)

    def _wake(self, co: _Coroutine, slot: _Slot) -> None:
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
            self._keyboard_interrupt()
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
            slot = self.slots[name]
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
            self._keyboard_interrupt()
        elif isinstance(exc, Exception):
            self._annotate(exc, _display(owner), stage)
            raise exc
        else:
            raise exc

    def _apply(self, signal: ControlSignal, owner: Any, stage: str) -> None:
        try:
            signal.apply(self.ctx)
        except Exception as exc:
            self._annotate(exc, _display(owner), stage)
            raise exc from None

    def _keyboard_interrupt(self) -> None:
        """Ctrl-C inside a handler: a graceful stop via the loop, unless it is a second one."""
        ctx = self.ctx
        if ctx._aborting:
            raise KeyboardInterrupt
        ctx.request_interrupt()

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


_METHOD = {
    "StopTraining": "stop_training",
    "SkipBatch": "skip_batch",
    "SkipValidation": "skip_validation",
}


_CONTEXTS: weakref.WeakKeyDictionary[Generator[Event, None, None], Context] = weakref.WeakKeyDictionary()


def context_of(events: Iterator[Event]) -> Context | None:
    """The context of a run generator made by ``Trainer.run()`` (and its siblings), known
    before its first event; None for any other iterator."""
    try:
        return _CONTEXTS.get(events)  # type: ignore[call-overload]
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def warn_if_interrupted(ctx: Context, call: str, stacklevel: int = 3) -> None:
    """Warn that a run driven to its end by ``call`` (``fit()``, ``evaluate()``,
    ``predict()``, ``Stepper.finish()``) was stopped by Ctrl-C, and say what its results
    cover."""
    if not ctx.history.interrupted:
        return
    if ctx.max_epochs:  # a training run
        message = (
            f"{call} was interrupted by Ctrl-C in epoch {ctx.epoch}; returning the history of "
            f"the {len(ctx.history)} epoch(s) recorded"
        )
    else:
        what = "the predictions" if ctx.phase == "predict" else "the metrics"
        if not ctx.iter:
            message = f"{call} was interrupted by Ctrl-C before its first batch: {what} cover no batch"
        else:
            # A Ctrl-C inside a batch drops that batch; one during its *_batch_end keeps it.
            covered = "the batches before it" if ctx.skipped else "the batches up to it"
            message = f"{call} was interrupted by Ctrl-C at batch {ctx.iter}: {what} cover {covered} only"
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


@contextlib.contextmanager
def graceful_sigint(ctx: Context) -> Iterator[None]:
    """While inside, a first Ctrl-C asks the loop for a graceful stop at the next event; a
    second restores the default handler and aborts at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        ctx._sigint_count += 1
        if ctx._aborting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        ctx.request_interrupt()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
