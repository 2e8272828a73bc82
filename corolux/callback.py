"""Declaring callbacks: the ``Callback`` base class, the ``callback()`` factory and ``@coroutine``."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import weakref
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corolux.events import Event, StageSpec

__all__ = [
    "Callback",
    "CoroutineCallback",
    "callback",
    "coroutine",
    "handlers_of",
    "listened_stages",
    "weight_of",
]


class Callback:
    """Base class of callbacks: define ``on_<stage>(self, ctx)`` methods for the stages you
    listen to, and optionally a ``weight`` (lower runs first, ties keep list order,
    ``float("inf")`` runs last).

    Only the stages a callback defines a method for cost anything: the driver dispatches
    to listeners only. An ``on_<stage>`` attribute set on the instance counts too (looked
    up once per run), so one class can listen to a stage chosen at construction.

    Optional protocol: ``setup(ctx)`` (before ``on_fit_begin``), ``teardown(ctx)`` (once,
    after the last event, in every outcome), ``state_dict()`` /
    ``load_state_dict(state)`` (saved in checkpoints; matched by a ``state_key`` attribute,
    else the class name; ``per_rank_state = True`` when it differs between DDP ranks, so that
    each rank's is saved and restored; ``reshard_state(states, rank, world) -> state`` then
    says what a rank takes when the run has another number of processes than the one that
    saved, else rank 0's), ``wrap_handler(handler, owner, stage) -> handler`` (called once
    per run for every class handler of the other callbacks: how ``Profile`` times them).

    Example:
        >>> class PrintCallback(Callback):
        ...     weight = 0
        ...     def __init__(self, message):
        ...         self.message = message
        ...     def on_epoch_end(self, ctx):
        ...         print(self.message)

    Weight may also be a mapping ``{stage: number}`` (stages not in it use 0).
    """

    weight: float | Mapping[str, float] = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def listened_stages(cls: type) -> tuple[str, ...]:
    """The ``on_*`` method names that ``cls`` (or its bases) defines, in definition order."""
    try:
        return _LISTENED[cls]
    except (KeyError, TypeError):
        pass
    names: dict[str, None] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if name.startswith("on_") and callable(value):
                names[name] = None
    stages = tuple(names)
    with contextlib.suppress(TypeError):
        _LISTENED[cls] = stages
    return stages


_LISTENED: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()


def handlers_of(cb: Any) -> dict[str, Callable[[Any], Any]]:
    """The handlers of a class callback by stage name: the ``on_*`` methods of its class and
    the callable ``on_*`` attributes set on the instance (``setattr(self, stage, fn)``), in
    definition order. The driver looks them up once per run. As for methods, an ``on_*``
    name is a stage name: one the trainer does not know is refused with a suggestion.

    Example:
        >>> class Every(Callback):
        ...     def __init__(self, stage):
        ...         setattr(self, stage, self.hit)
        ...     def hit(self, ctx):
        ...         pass
        >>> list(handlers_of(Every("on_epoch_end")))
        ['on_epoch_end']
    """
    names = dict.fromkeys(listened_stages(type(cb)))
    own = getattr(cb, "__dict__", None)
    if own:
        names.update(
            dict.fromkeys(name for name, value in own.items() if name.startswith("on_") and callable(value))
        )
    handlers = {}
    for name in names:
        handler = getattr(cb, name)
        if callable(handler):  # an instance attribute may switch a method off (= None)
            handlers[name] = handler
    return handlers


def weight_of(cb: Any, stage: str) -> float:
    """The weight ``cb`` runs with at ``stage`` (its number, or its mapping's entry, else 0).

    Raises:
        TypeError: when the weight is neither a number nor a mapping of numbers.
    """
    weight = getattr(cb, "weight", 0)
    if isinstance(weight, Mapping):
        weight = weight.get(stage, 0)
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or math.isnan(weight):
        raise TypeError(
            f"{_name_of(cb)}.weight must be a number or a mapping stage -> number, got "
            f"{getattr(cb, 'weight', None)!r}; e.g. weight = 10 or weight = float('inf')"
        )
    return float(weight)


def _name_of(cb: Any) -> str:
    return getattr(cb, "name", None) or type(cb).__name__


def callback(
    name: str,
    *,
    initialize: Callable[..., None] | None = None,
    weight: float | Mapping[str, float] = 0,
    **members: Any,
) -> type[Callback]:
    """Build a callback class from functions, as R luz's ``luz_callback()``.

    Functions become methods (``on_*`` stages, helpers, ``state_dict``...), other values
    become class attributes; calling the returned class builds an instance.

    Example:
        >>> PrintCallback = callback(
        ...     "print_callback",
        ...     initialize=lambda self, message: setattr(self, "message", message),
        ...     on_epoch_end=lambda self, ctx: print(self.message),
        ... )
        >>> PrintCallback("done")
        print_callback()
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"callback(): name must be a valid identifier, got {name!r}")
    namespace: dict[str, Any] = {"weight": weight, "__module__": "corolux.callback"}
    if initialize is not None:
        if not callable(initialize):
            raise TypeError(f"callback(): initialize must be a function, got {initialize!r}")
        namespace["__init__"] = initialize
    for key, value in members.items():
        if key.startswith("on_") and not callable(value):
            raise TypeError(f"callback(): {key}= must be a function (self, ctx) -> None, got {value!r}")
        namespace[key] = value
    return type(name, (Callback,), namespace)


class CoroutineCallback:
    """A callback written as a generator; build one with :func:`coroutine`.

    Each run starts a fresh generator (primed at once), so one instance serves several
    ``fit()`` calls.
    """

    def __init__(
        self,
        fn: Callable[..., Generator[StageSpec, Event, None]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        weight: float | Mapping[str, float],
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.weight = weight
        self.name: str = getattr(fn, "__qualname__", getattr(fn, "__name__", "coroutine"))

    def start(self) -> tuple[Generator[StageSpec, Event, None], StageSpec | None]:
        """Start a fresh generator and return it with the first stage it waits for
        (None when it returned at once)."""
        gen = self.fn(*self.args, **self.kwargs)
        if not isinstance(gen, Generator):
            raise TypeError(
                f"@coroutine {self.name}() must be a generator function (one that yields the "
                f"stage it waits for), but it returned {type(gen).__name__}"
            )
        try:
            first = next(gen)
        except StopIteration:
            return gen, None
        return gen, first

    def __repr__(self) -> str:
        return f"{self.name}()"


def coroutine(
    fn: Callable[..., Generator[StageSpec, Event, None]] | None = None,
    *,
    weight: float | Mapping[str, float] = 0,
) -> Any:
    """Turn a generator function into a callback factory; bare or called with options.

    The generator yields the stage it waits for (a stage, a collection of stages, or a
    filter such as ``every("on_train_batch_end", 100)``) and receives the ``Event``; when it
    returns, it is detached.

    Example:
        >>> import time
        >>> @coroutine(weight=5)
        ... def epoch_timer(log=print):
        ...     while True:
        ...         yield "on_epoch_begin"
        ...         t0 = time.perf_counter()
        ...         event = yield "on_epoch_end"
        ...         log(f"epoch {event.ctx.epoch}: {time.perf_counter() - t0:.2f}s")
        >>> epoch_timer()
        epoch_timer()
    """

    def decorate(
        fn: Callable[..., Generator[StageSpec, Event, None]],
    ) -> Callable[..., CoroutineCallback]:
        if not callable(fn):
            raise TypeError(f"@coroutine decorates a generator function, got {fn!r}")

        @functools.wraps(fn)
        def factory(*args: Any, **kwargs: Any) -> CoroutineCallback:
            return CoroutineCallback(fn, args, kwargs, weight)

        factory.__corolux_coroutine__ = True  # type: ignore[attr-defined]
        return factory

    if fn is not None:
        return decorate(fn)
    return decorate
