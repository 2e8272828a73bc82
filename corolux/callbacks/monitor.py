"""Monitor: a history value a callback watches at each epoch's end (early stopping, best
model, checkpoints, plateau schedules), and whether it improved."""

from __future__ import annotations

import math
from typing import Any

from corolux._suggest import did_you_mean
from corolux.callbacks.metrics_tracker import MetricsTracker
from corolux.context import Context
from corolux.metrics import higher_is_better, metric_name

__all__ = ["Monitor"]

MODES = ("auto", "min", "max")


class Monitor:
    """The value named ``name`` in the epoch's metrics (``ctx.metrics`` at ``on_epoch_end``:
    ``"valid_loss"``, ``"train_acc"``, a ``ctx.log`` name), compared with the best so far.

    ``mode="auto"`` follows the metric's ``higher_is_better`` (a loss is lower-is-better); a
    value is an improvement when it beats the best by more than ``min_delta``.

    Example:
        >>> m = Monitor("valid_loss", mode="min", min_delta=0.01, owner="EarlyStopping")
        >>> m.improves(0.50, None), m.improves(0.495, 0.50), m.improves(0.48, 0.50)
        (True, False, True)
    """

    def __init__(self, name: str, *, mode: str = "auto", min_delta: float = 0.0, owner: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{owner}: monitor must be a history name such as 'valid_loss', got {name!r}")
        if mode not in MODES:
            raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")
        if (
            not isinstance(min_delta, (int, float))
            or isinstance(min_delta, bool)
            or not math.isfinite(min_delta)  # nan would make every comparison false: nothing improves
            or min_delta < 0
        ):
            raise ValueError(f"{owner}: min_delta must be a finite number >= 0, got {min_delta!r}")
        self.name = name
        self.mode = mode
        self.min_delta = float(min_delta)
        self.owner = owner
        self._higher: bool | None = None if mode == "auto" else mode == "max"

    @property
    def higher_is_better(self) -> bool:
        """Whether larger values are better (known once :meth:`value` has run, for ``"auto"``)."""
        if self._higher is None:
            raise RuntimeError(f"{self.owner}: the direction of {self.name!r} is known after the first epoch")
        return self._higher

    def value(self, ctx: Context) -> float | None:
        """This epoch's value, or None when it was not produced this epoch (e.g. validation
        skipped); call at ``on_epoch_end``.

        Raises:
            ValueError: the name is not one this run records (with the names it does), or
                ``mode="auto"`` cannot tell which direction is better.
        """
        value = ctx.metrics.get(self.name)
        if value is None:
            names = available(ctx)
            if self.name not in names:
                hint = did_you_mean(self.name, names) or ""
                if self.name.startswith("valid_") and ctx.valid_data is None:
                    hint = " this run has no validation data (pass valid_data= to fit);"
                raise ValueError(
                    f"{self.owner}: unknown monitor {self.name!r};{hint} "
                    f"available: {', '.join(sorted(names)) or 'none'}"
                )
            return None
        if self._higher is None:
            self._higher = _direction(ctx, self.name, self.owner)
        value = float(value)
        return None if math.isnan(value) else value

    def improves(self, value: float, best: float | None) -> bool:
        """``value`` beats ``best`` by more than ``min_delta`` (any value beats None)."""
        if best is None:
            return True
        if self._higher is None:
            raise RuntimeError(f"{self.owner}: call value(ctx) first, which finds the direction")
        if self._higher:
            return value > best + self.min_delta
        return value < best - self.min_delta

    def __repr__(self) -> str:
        return f"Monitor({self.name!r}, mode={self.mode!r}, min_delta={self.min_delta})"


def _tracker(ctx: Context) -> MetricsTracker | None:
    return next((cb for cb in ctx.callbacks if isinstance(cb, MetricsTracker)), None)


def available(ctx: Context) -> set[str]:
    """The names this run records: what this epoch and earlier ones recorded, and the loss and
    metrics of each phase that has data."""
    names = set(ctx.metrics) | set(ctx.history.names)
    tracker = _tracker(ctx)
    phases = [("train", tracker.train_metrics if tracker else [])]
    if ctx.valid_data is not None:
        phases.append(("valid", tracker.valid_metrics if tracker else []))
    for phase, metrics in phases:
        names.add(f"{phase}_loss")
        names.update(f"{phase}_{metric_name(m)}" for m in metrics)
    names.discard("epoch")
    return names


def _direction(ctx: Context, name: str, owner: str) -> bool:
    """Whether higher is better for ``name``, from the metric that records it."""
    phase, _, metric = name.partition("_")
    if phase in ("train", "valid") and metric.startswith("loss"):
        return False
    tracker = _tracker(ctx)
    if tracker is not None and phase in ("train", "valid"):
        for m in tracker.train_metrics if phase == "train" else tracker.valid_metrics:
            if metric_name(m) == metric:
                return higher_is_better(m)
    raise ValueError(
        f"{owner}: mode='auto' cannot tell whether a higher {name!r} is better (it is not a loss "
        "or one of the trainer's metrics); pass mode='max' or mode='min'"
    )


def describe(value: Any) -> str:
    """A monitored value for messages."""
    return "none" if value is None else f"{value:.6g}"
