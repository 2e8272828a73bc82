"""Timer: the run's wall-clock time per phase, and a graceful stop when a time budget is spent."""

from __future__ import annotations

import datetime
import math
import numbers
import time
from typing import Any

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["Timer", "parse_max_time"]

#: The clock (seconds, monotonic): one C call, no host-device sync. A module global so that
#: the per-batch check is a global lookup, and so that tests can drive a fake clock.
_clock = time.monotonic

_PHASES = ("train", "valid")


def parse_max_time(max_time: float | datetime.timedelta | str | None) -> float | None:
    """``max_time`` as seconds: a positive number of seconds, a ``timedelta``, or a string
    ``"DD:HH:MM:SS"`` (as Lightning's ``Trainer(max_time=...)``); None stays None.

    Raises:
        TypeError: another type.
        ValueError: a budget that is not positive, or a malformed string.

    Example:
        >>> parse_max_time("00:01:30:00"), parse_max_time(datetime.timedelta(minutes=2)), parse_max_time(90)
        (5400.0, 120.0, 90.0)
    """
    if max_time is None:
        return None
    if isinstance(max_time, datetime.timedelta):
        seconds = max_time.total_seconds()
    elif isinstance(max_time, str):
        parts = max_time.split(":")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"Timer: max_time as a string must be 'DD:HH:MM:SS' (days, hours, minutes, seconds), "
                f"got {max_time!r}; e.g. '00:12:00:00' for 12 hours"
            )
        days, hours, minutes, secs = (int(p) for p in parts)
        seconds = datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=secs).total_seconds()
    elif isinstance(max_time, numbers.Real) and not isinstance(max_time, bool):
        seconds = float(max_time)
    else:
        raise TypeError(
            "Timer: max_time must be seconds (a number), a datetime.timedelta or a string "
            f"'DD:HH:MM:SS', got {type(max_time).__name__} {max_time!r}"
        )
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(
            f"Timer: max_time must be a positive, finite time budget, got {max_time!r}; "
            "pass max_time=None to time the run without a limit"
        )
    return seconds


class Timer(Callback):
    """Time the run and its phases, and stop training gracefully once ``max_time`` is spent.

    The budget is checked at every ``on_train_batch_end``, ``on_valid_batch_end`` and
    ``on_epoch_end`` with ``time.monotonic()`` (tens of nanoseconds, no host-device sync).
    When it is spent, the Timer calls ``ctx.stop_training("time_limit")``: the current batch
    finishes, no further batch, validation or epoch runs, every open scope ends and
    ``on_fit_end`` fires (``history.stop_reason == "time_limit"``). As for any stop but early
    stopping, ``min_epochs`` does not delay it. An epoch cut short is not counted in
    ``ctx.completed_epochs``, and ``AutoResume`` keeps its file after a time limit.

    The budget counts the wall-clock time of this run, from ``on_fit_begin`` (after a
    checkpoint was restored), resumed or not: a job under a scheduler's time limit sets
    ``max_time`` a little under it, stops cleanly, and the next job continues from the
    checkpoint with a fresh budget. (A budget counted across resumes would stop the
    continued job at its first batch.)

    Args:
        max_time: the budget: seconds (a number), a ``datetime.timedelta``, or a string
            ``"DD:HH:MM:SS"``; None times the run without a limit.
        log: also record each epoch's phase times in the history, as ``train_time`` and
            ``valid_time`` (seconds; ``nan`` where validation did not run).

    Attributes:
        max_time: the budget in seconds (None: no limit).
        elapsed: seconds since this run's ``on_fit_begin`` (live during the run, then final).
        remaining: seconds left of the budget (None without one; 0.0 once spent).
        phase_elapsed: seconds spent in each phase over the run, ``{"train": ..., "valid": ...}``
            (from ``on_<phase>_begin`` to ``on_<phase>_end``).

    Example:
        >>> timer = Timer(max_time="00:11:45:00")  # stop after 11 h 45 min
        >>> timer.max_time
        42300.0
        >>> history = trainer.fit(data, epochs=1000, callbacks=[timer])  # doctest: +SKIP
        >>> history.stop_reason, timer.elapsed, timer.phase_elapsed  # doctest: +SKIP
        ('time_limit', 42300.1, {'train': 39012.4, 'valid': 3281.0})
    """

    weight = 0

    def __init__(
        self, max_time: float | datetime.timedelta | str | None = None, *, log: bool = False
    ) -> None:
        if not isinstance(log, bool):
            raise TypeError(f"Timer: log must be True or False, got {log!r}")
        self.max_time = parse_max_time(max_time)
        self.log = log
        self.phase_elapsed: dict[str, float] = dict.fromkeys(_PHASES, 0.0)
        self._start: float | None = None  # this run's on_fit_begin
        self._end: float | None = None  # this run's on_fit_end (None while it runs)
        self._deadline = math.inf
        self._phase_start = 0.0
        if self.max_time is not None:  # only then does it listen to every batch
            self.on_train_batch_end = self._check
            self.on_valid_batch_end = self._check

    @property
    def elapsed(self) -> float:
        """Seconds since this run's ``on_fit_begin`` (0.0 before a run)."""
        if self._start is None:
            return 0.0
        end = _clock() if self._end is None else self._end
        return end - self._start

    @property
    def remaining(self) -> float | None:
        """Seconds left of the budget (None without ``max_time``)."""
        if self.max_time is None:
            return None
        return max(0.0, self.max_time - self.elapsed)

    def on_fit_begin(self, ctx: Context) -> None:
        self._start = now = _clock()
        self._end = None
        self.phase_elapsed = dict.fromkeys(_PHASES, 0.0)
        self._deadline = math.inf if self.max_time is None else now + self.max_time

    def _check(self, ctx: Context) -> None:
        # Per batch: one clock read and one comparison.
        if _clock() >= self._deadline:
            ctx.stop_training("time_limit")

    def on_epoch_end(self, ctx: Context) -> None:
        self._check(ctx)

    def on_train_begin(self, ctx: Context) -> None:
        self._phase_start = _clock()

    on_valid_begin = on_train_begin

    def _phase_end(self, ctx: Context, phase: str) -> None:
        spent = _clock() - self._phase_start
        self.phase_elapsed[phase] += spent
        if self.log:
            ctx.log(f"{phase}_time", spent)

    def on_train_end(self, ctx: Context) -> None:
        self._phase_end(ctx, "train")

    def on_valid_end(self, ctx: Context) -> None:
        if ctx.kind == "fit":  # evaluate() has no epoch to record it in
            self._phase_end(ctx, "valid")

    def teardown(self, ctx: Context) -> None:
        if ctx.kind == "fit" and self._start is not None and self._end is None:
            self._end = _clock()  # in every outcome, an exception included
            self._deadline = math.inf  # an evaluate() with this Timer is never stopped

    def __repr__(self) -> str:
        parts: list[Any] = [] if self.max_time is None else [f"max_time={self.max_time:g}"]
        if self.log:
            parts.append("log=True")
        return f"Timer({', '.join(parts)})"
