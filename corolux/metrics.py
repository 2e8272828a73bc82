"""Metrics: the protocol and the built-ins. They accumulate on the device; only
``compute()`` syncs (once per phase).

A metric has ``name``, ``higher_is_better``, ``reset()``, ``update(pred, target)`` and
``compute() -> float``. torchmetrics objects work unchanged (their name is the class name
in snake case).

Under DDP a metric is exact (the whole data set's value on every rank) when it has the
reduction hook ``reduce_states(reduce_sum)``: called once before ``compute()``, it replaces
each accumulated state by ``reduce_sum(state)``, its sum over the ranks (a tensor or a
number). The built-ins have it; torchmetrics objects reduce themselves; a metric without it
is computed on each rank's share, with a warning.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from corolux.context import loss_problem

__all__ = [
    "MAE",
    "MSE",
    "RMSE",
    "Accuracy",
    "BinaryAUROC",
    "BinaryAccuracy",
    "LossTracker",
    "Mean",
    "Metric",
    "MulticlassAUROC",
    "load_metric_state",
    "merge_metric_states",
    "metric_name",
    "metric_state",
]


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

    def reduce_states(self, reduce_sum: Callable[[Any], Any]) -> None:
        """Replace the sums by their totals over the ranks (DDP; called before ``compute``)."""
        self.total, self.count = (
            reduce_sum(torch.as_tensor(self.total, dtype=torch.float32)),
            reduce_sum(self.count),
        )

    def state_dict(self) -> dict[str, Any]:
        """The accumulated sums (for checkpoints taken inside an epoch)."""
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = state["total"], state["count"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class Accuracy(_SumMetric):
    """Multiclass accuracy: ``argmax(pred, dim=-1) == target`` (target as class indices,
    or as one-hot / probabilities of the same shape as ``pred``).

    ``pred`` holds class scores, ``(N, ..., C)`` with ``C >= 2``. A binary output, ``(N,)``
    or ``(N, 1)``, is refused with a ValueError: its argmax is always 0. Use
    ``BinaryAccuracy`` for it.
    """

    name = "acc"
    higher_is_better = True

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim < 2 or pred.shape[-1] == 1:  # one score per sample: argmax is always 0
            raise ValueError(
                f"Accuracy expects class scores, pred of shape (N, ..., C) with C >= 2, got pred "
                f"{tuple(pred.shape)} and target {tuple(target.shape)}: one score per sample is a "
                "binary output, whose argmax is always 0. Use BinaryAccuracy() (for probabilities) "
                "or BinaryAccuracy(from_logits=True) (for logits)"
            )
        if target.shape == pred.shape and target.is_floating_point():
            target = target.argmax(dim=-1)
        if pred.shape[:-1] != target.shape:
            raise ValueError(
                f"Accuracy expects pred of shape (N, ..., C) and target (N, ...) of class "
                f"indices, got pred {tuple(pred.shape)} and target {tuple(target.shape)}; "
                "for binary outputs use BinaryAccuracy"
            )
        self._add(pred.argmax(dim=-1) == target, target.numel())


class BinaryAccuracy(_SumMetric):
    """Binary accuracy: ``(pred >= threshold) == target`` for probabilities (or logits with
    ``from_logits=True``); pred of shape (N,) or (N, 1), targets 0/1."""

    name = "binary_acc"
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, *, from_logits: bool = False, name: str | None = None) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"BinaryAccuracy: threshold must be in (0, 1), got {threshold!r}")
        self.threshold = threshold
        self.from_logits = from_logits
        super().__init__(name)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = _binary(pred, target, self.from_logits, type(self).__name__)
        self._add((pred >= self.threshold) == (target >= 0.5), target.numel())


def _binary(
    pred: torch.Tensor, target: torch.Tensor, from_logits: bool, who: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.numel() != target.numel():
        raise ValueError(
            f"{who} expects one score per target (pred (N,) or (N, 1)), got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}; for class scores use Accuracy or MulticlassAUROC"
        )
    pred = pred.detach().reshape(-1).float()
    return (pred.sigmoid() if from_logits else pred), target.detach().reshape(-1)


class _BinnedAUROC:
    """Area under the ROC curve from score histograms kept on the device: ``num_thresholds``
    bins over [0, 1], filled with ``index_add_`` (no sync); ``compute()`` reduces once."""

    higher_is_better = True

    def __init__(self, num_thresholds: int, from_logits: bool, name: str | None) -> None:
        if not isinstance(num_thresholds, int) or num_thresholds < 2:
            raise ValueError(
                f"{type(self).__name__}: num_thresholds must be an int >= 2, got {num_thresholds!r}"
            )
        self.num_thresholds = num_thresholds
        self.from_logits = from_logits
        self.name = name or "auroc"
        self.reset()

    def reset(self) -> None:
        self.positives: torch.Tensor | None = None
        self.negatives: torch.Tensor | None = None

    def reduce_states(self, reduce_sum: Callable[[Any], Any]) -> None:
        """Sum the histograms over the ranks (DDP; called before ``compute``)."""
        if self.positives is not None and self.negatives is not None:
            self.positives, self.negatives = reduce_sum(self.positives), reduce_sum(self.negatives)

    def state_dict(self) -> dict[str, Any]:
        """The score histograms (for checkpoints taken inside an epoch)."""
        return {
            "positives": self.positives,
            "negatives": self.negatives,
            "classes": getattr(self, "classes", 0),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.positives, self.negatives = state["positives"], state["negatives"]
        if "classes" in state and hasattr(self, "classes"):
            self.classes = state["classes"]

    def _fill(
        self, scores: torch.Tensor, is_positive: torch.Tensor, rows: int, offsets: torch.Tensor | int
    ) -> None:
        """Count each score in its bin, per row (class); ``is_positive`` is 0/1 per score."""
        bins = self.num_thresholds
        if self.positives is None:
            self.positives = torch.zeros(rows * bins, device=scores.device)
            self.negatives = torch.zeros(rows * bins, device=scores.device)
        assert self.negatives is not None
        index = (scores.clamp(0, 1) * (bins - 1)).round().long() + offsets
        weight = is_positive.float()
        self.positives.index_add_(0, index.reshape(-1), weight.reshape(-1))
        self.negatives.index_add_(0, index.reshape(-1), (1 - weight).reshape(-1))

    @staticmethod
    def _area(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """AUROC per row of (rows, bins) histograms: trapezoids of the ROC curve swept from
        the highest threshold down; nan for a row without positives or negatives."""
        tp = positives.flip(-1).cumsum(-1)
        fp = negatives.flip(-1).cumsum(-1)
        tpr = tp / tp[..., -1:]
        fpr = fp / fp[..., -1:]
        zero = torch.zeros_like(tpr[..., :1])
        tpr, fpr = torch.cat([zero, tpr], -1), torch.cat([zero, fpr], -1)
        return ((fpr[..., 1:] - fpr[..., :-1]) * (tpr[..., 1:] + tpr[..., :-1]) / 2).sum(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_thresholds={self.num_thresholds}, name={self.name!r})"


class BinaryAUROC(_BinnedAUROC):
    """Area under the ROC curve for one score per sample (probabilities, or logits with
    ``from_logits=True``), binned over ``num_thresholds`` thresholds."""

    def __init__(
        self, num_thresholds: int = 200, *, from_logits: bool = False, name: str | None = None
    ) -> None:
        super().__init__(num_thresholds, from_logits, name)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        scores, target = _binary(pred, target, self.from_logits, type(self).__name__)
        self._fill(scores, target >= 0.5, 1, 0)

    def compute(self) -> float:
        if self.positives is None or self.negatives is None:
            return math.nan
        return float(self._area(self.positives, self.negatives))  # sync-ok: once per phase


class MulticlassAUROC(_BinnedAUROC):
    """One-vs-rest AUROC for class scores (N, C) (probabilities, or logits with
    ``from_logits=True``: softmax) and class-index targets (N,).

    ``average``: ``"macro"`` (mean over classes), ``"weighted"`` (by class support),
    ``"micro"`` (all classes pooled) or ``"none"`` (a list, one value per class).
    """

    AVERAGES = ("macro", "weighted", "micro", "none")

    def __init__(
        self,
        num_thresholds: int = 200,
        *,
        average: str = "macro",
        from_logits: bool = False,
        name: str | None = None,
    ) -> None:
        if average not in self.AVERAGES:
            raise ValueError(f"MulticlassAUROC: average must be one of {self.AVERAGES}, got {average!r}")
        self.average = average
        self.classes = 0
        super().__init__(num_thresholds, from_logits, name)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.ndim != 2 or target.shape != pred.shape[:1]:
            raise ValueError(
                f"MulticlassAUROC expects pred (N, C) and target (N,) of class indices, got pred "
                f"{tuple(pred.shape)} and target {tuple(target.shape)}"
            )
        scores = pred.detach().float()
        if self.from_logits:
            scores = scores.softmax(-1)
        self.classes = scores.shape[1]
        onehot = torch.nn.functional.one_hot(target.detach().long(), self.classes)
        offsets = torch.arange(self.classes, device=scores.device) * self.num_thresholds
        self._fill(scores, onehot, self.classes, offsets)

    def compute(self) -> float | list[float]:
        if self.positives is None or self.negatives is None:
            return math.nan
        positives = self.positives.view(self.classes, -1)
        negatives = self.negatives.view(self.classes, -1)
        if self.average == "micro":
            return float(self._area(positives.sum(0), negatives.sum(0)))  # sync-ok: once per phase
        per_class = self._area(positives, negatives)
        if self.average == "none":
            return per_class.tolist()  # sync-ok: once per phase
        support = positives.sum(-1)
        valid = ~per_class.isnan()
        weights = support if self.average == "weighted" else torch.ones_like(support)
        weights = weights * valid
        return float((per_class.nan_to_num() * weights).sum() / weights.sum())  # sync-ok: once per phase


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
    ``fold_every`` batches, or when the batch size changes (bounded memory);
    ``compute()`` reduces once. ``no_grad=True`` (a phase under ``torch.no_grad()``): a loss
    without a graph is kept as it is, without a detached copy (one with a graph, from a step
    that enabled gradients, is still detached).
    """

    higher_is_better = False

    def __init__(self, name: str = "loss", fold_every: int = 256, *, no_grad: bool = False) -> None:
        self.name = name
        self.fold_every = fold_every
        self.no_grad = no_grad
        self.reset()

    def reset(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._size = 0  # the batch size of the losses kept
        self._total: torch.Tensor | float = 0.0
        self._count = 0

    def update(self, loss: torch.Tensor, size: int) -> None:
        losses = self._losses
        if size != self._size or len(losses) >= self.fold_every:
            self._fold()  # a new batch size (the first batch too), or enough kept
            if size != self._size:
                self._size = size
                _check_loss(loss)
        try:
            # .data: the value without its graph, as detach() gives it, in 300 instead of 500 ns
            # (and without detach's version counter, which a kept loss value does not need).
            losses.append(loss if self.no_grad and not loss.requires_grad else loss.data)
        except AttributeError:  # not a tensor; the try costs nothing on the normal path
            _check_loss(loss)
            raise

    def _fold(self) -> None:
        if self._losses:
            self._total, self._count = self._folded()
            self._losses.clear()

    def _folded(self) -> tuple[torch.Tensor | float, int]:
        """The sum and count with the losses kept folded in (nothing changes)."""
        if not self._losses:
            return self._total, self._count
        try:
            stacked = torch.stack(self._losses)
        except RuntimeError:  # the shapes differ: () beside (1,), or a non-scalar loss
            for loss in self._losses:
                _check_loss(loss)
            stacked = torch.stack([loss.reshape(()) for loss in self._losses])
        if stacked.ndim != 1:  # (1,) losses are fine; a non-scalar one after the first batch is not
            for loss in self._losses:
                _check_loss(loss)
        return self._total + stacked.float().sum() * self._size, self._count + self._size * len(self._losses)

    def reduce_states(self, reduce_sum: Callable[[Any], Any]) -> None:
        """Replace the sum and the count by their totals over the ranks (DDP)."""
        self._fold()
        self._total = reduce_sum(torch.as_tensor(self._total, dtype=torch.float32))
        self._count = reduce_sum(self._count)

    def state_dict(self) -> dict[str, Any]:
        """The losses kept and the folded sum (for checkpoints taken inside an epoch)."""
        return {"losses": list(self._losses), "size": self._size, "total": self._total, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._losses = list(state["losses"])
        self._size, self._total, self._count = state["size"], state["total"], state["count"]

    @property
    def count(self) -> int:
        """The number of samples seen."""
        return self._count + self._size * len(self._losses)

    def compute(self) -> float:
        """The per-sample mean so far; the state is left as it was (a checkpoint taken after
        it resumes the same sums)."""
        total, count = self._folded()
        if count == 0:
            return math.nan
        return float(total) / count  # sync-ok: once per phase


def _check_loss(loss: Any) -> None:
    """Raise the error for a loss that is not a scalar (one-element) tensor."""
    problem = loss_problem(loss)
    if problem is not None:
        raise ValueError(f"{problem}; ctx.loss at the batch's end") from None


def metric_state(metric: Any) -> dict[str, Any] | None:
    """The accumulated state of ``metric`` as tensors and plain values, or None when it has
    no way to give it: its ``state_dict()`` (the built-ins), or a torchmetrics object's
    ``metric_state``."""
    states = getattr(metric, "metric_state", None)  # torchmetrics: its states, by name
    if isinstance(states, dict):
        return {"torchmetrics": {k: list(v) if isinstance(v, list) else v for k, v in states.items()}}
    if callable(getattr(metric, "state_dict", None)) and callable(getattr(metric, "load_state_dict", None)):
        return {"state_dict": metric.state_dict()}
    return None


def load_metric_state(metric: Any, state: dict[str, Any]) -> None:
    """Give ``metric`` back what :func:`metric_state` returned."""
    if "torchmetrics" in state:
        for name, value in state["torchmetrics"].items():
            setattr(metric, name, list(value) if isinstance(value, list) else value)
        metric._update_count = max(getattr(metric, "_update_count", 0), 1)  # compute() would warn otherwise
    else:
        metric.load_state_dict(state["state_dict"])


def merge_metric_states(metric: Any, states: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """One state for ``metric`` holding what all of ``states`` accumulated (each what
    :func:`metric_state` gave for a copy of it, e.g. one per DDP rank): the sums of what its
    ``reduce_states`` hook hands over, or torchmetrics' ``merge_state``. ``states[0]`` when
    the metric has neither, or a state is missing.

    Example:
        >>> merged = merge_metric_states(Accuracy(), [rank0_state, rank1_state])  # doctest: +SKIP
    """
    if not states or any(state is None for state in states):
        return states[0] if states else None
    copies = []
    for state in states:
        copy_ = copy.deepcopy(metric)
        load_metric_state(copy_, state)  # type: ignore[arg-type]
        copies.append(copy_)
    first = copies[0]
    if "torchmetrics" in states[0]:  # type: ignore[operator]
        for other in copies[1:]:
            first.merge_state(other)
        return metric_state(first)
    if not callable(getattr(first, "reduce_states", None)):
        return states[0]
    handed: list[list[Any]] = []  # what each copy hands to reduce_sum, in the hook's order
    for copy_ in copies:
        values: list[Any] = []
        copy_.reduce_states(lambda value, values=values: values.append(value) or value)
        handed.append(values)
    totals = iter([functools.reduce(operator.add, values) for values in zip(*handed, strict=True)])
    first.reduce_states(lambda _value: next(totals))
    return metric_state(first)


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
