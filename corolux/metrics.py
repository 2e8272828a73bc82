"""Metrics: the protocol and the built-ins. They accumulate on the device; only
``compute()`` syncs (once per phase).

A metric has ``name``, ``higher_is_better``, ``reset()``, ``update(pred, target)`` and
``compute() -> float``. torchmetrics objects work unchanged (their name is the class name
in snake case).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["MAE", "MSE", "RMSE", "Accuracy", "LossTracker", "Mean", "Metric", "metric_name"]


@runtime_checkable
class Metric(Protocol):
    """What the metrics tracker needs from a metric."""

    name: str
    higher_is_better: bool

    def reset(self) -> None: ...
    def update(self, pred: Any, target: Any) -> None: ...
    def compute(self) -> Any: ...


class _SumMetric:
    """Keeps a device-side ``total`` and a host-side ``count``: no sync per update."""

    name = "metric"
    higher_is_better = False

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"{type(self).__name__}: name must be a non-empty string, got {name!r}")
            self.name = name
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def _add(self, values: torch.Tensor, count: int) -> None:
        self.total = self.total + values.detach().sum(dtype=torch.float32)
        self.count += count

    def _mean(self) -> float:
        if self.count == 0:
            return math.nan
        return float(self.total) / self.count  # sync-ok: once per phase

    def compute(self) -> float:
        return self._mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Accuracy(_SumMetric):
    """Multiclass accuracy: ``argmax(pred, dim=-1) == target`` (target as class indices,
    or as one-hot / probabilities of the same shape as ``pred``)."""

    name = "acc"
    higher_is_better = True

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if target.shape == pred.shape and target.is_floating_point():
            target = target.argmax(dim=-1)
        if pred.shape[:-1] != target.shape:
            raise ValueError(
                f"Accuracy expects pred of shape (N, ..., C) and target (N, ...) of class "
                f"indices, got pred {tuple(pred.shape)} and target {tuple(target.shape)}; "
                "for binary outputs use BinaryAccuracy"
            )
        self._add(pred.argmax(dim=-1) == target, target.numel())


class Mean(_SumMetric):
    """The mean of ``fn(pred, target)`` over the samples (default: of ``pred``).

    Example:
        >>> l1 = Mean(lambda pred, target: (pred - target).abs(), name="l1")
    """

    name = "mean"
    higher_is_better = False

    def __init__(
        self,
        fn: Callable[[Any, Any], torch.Tensor] | None = None,
        *,
        name: str | None = None,
        higher_is_better: bool = False,
    ) -> None:
        self.fn = fn
        self.higher_is_better = higher_is_better
        super().__init__(name)

    def update(self, pred: Any, target: Any) -> None:
        values = pred if self.fn is None else self.fn(pred, target)
        values = torch.as_tensor(values)
        self._add(values, values.numel())


class MAE(_SumMetric):
    """Mean absolute error."""

    name = "mae"

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self._add((pred - target.view_as(pred)).abs(), pred.numel())


class MSE(_SumMetric):
    """Mean squared error."""

    name = "mse"

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self._add((pred - target.view_as(pred)).square(), pred.numel())


class RMSE(MSE):
    """Root mean squared error (over the whole phase, not averaged per batch)."""

    name = "rmse"

    def compute(self) -> float:
        return math.sqrt(self._mean())


class LossTracker:
    """The per-sample mean of the batch losses, with no tensor op and no sync per step.

    It keeps the detached losses and folds them into a device-side sum every
    ``fold_every`` batches (bounded memory); ``compute()`` reduces once.
    """

    higher_is_better = False

    def __init__(self, name: str = "loss", fold_every: int = 256) -> None:
        self.name = name
        self.fold_every = fold_every
        self.reset()

    def reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._sizes: list[int] = []
        self._total: torch.Tensor | float = 0.0
        self._count = 0

    def update(self, loss: torch.Tensor, size: int) -> None:
        self._losses.append(loss.detach())
        self._sizes.append(size)
        if len(self._losses) >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        groups: dict[int, list[torch.Tensor]] = {}
        for loss, size in zip(self._losses, self._sizes, strict=True):
            groups.setdefault(size, []).append(loss)
        for size, losses in groups.items():
            self._total = self._total + torch.stack(losses).float().sum() * size
            self._count += size * len(losses)
        self._losses.clear()
        self._sizes.clear()

    @property
    def count(self) -> int:
        """The number of samples seen."""
        return self._count + sum(self._sizes)

    def compute(self) -> float:
        self._fold()
        if self._count == 0:
            return math.nan
        return float(self._total) / self._count  # sync-ok: once per phase


def metric_name(metric: Any) -> str:
    """The history name of ``metric``: its ``name``, else its class name in snake case."""
    name = getattr(metric, "name", None)
    if isinstance(name, str) and name:
        return name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(metric).__name__).lower()


def higher_is_better(metric: Any) -> bool:
    """Whether larger values of ``metric`` are better (False when it does not say)."""
    return bool(getattr(metric, "higher_is_better", False))


def check_metric(metric: Any, argument: str) -> None:
    """Raise a TypeError naming ``argument`` when ``metric`` lacks the protocol's methods."""
    if isinstance(metric, type):
        raise TypeError(f"{argument}: got the class {metric.__name__}; pass an instance: {metric.__name__}()")
    missing = [m for m in ("reset", "update", "compute") if not callable(getattr(metric, m, None))]
    if missing:
        raise TypeError(
            f"{argument}: {metric!r} is not a metric (missing {', '.join(missing)}); a metric "
            "has reset(), update(pred, target) and compute(), e.g. corolux.metrics.Accuracy()"
        )
