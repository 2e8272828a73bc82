"""MetricsTracker: the default callback that turns batches into epoch metrics."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from corolux.callback import Callback
from corolux.context import Context
from corolux.data import batch_size_of, to_device
from corolux.distributed import is_distributed, reduce_sum
from corolux.metrics import LossTracker, load_metric_state, merge_metric_states, metric_name, metric_state

__all__ = ["MetricsTracker"]


class MetricsTracker(Callback):
    """Update the loss and metrics at each ``*_batch_end``, compute them at ``*_end`` into
    ``ctx.metrics`` (``train_loss``, ``valid_acc``, ...) and write the epoch's record into
    the history at ``on_epoch_end``.

    A default callback (weight -100, see ``corolux.callbacks.DEFAULTS``), so callbacks at
    the default weight 0 already see this phase's metrics. Skipped batches are not counted.
    Values are per-sample means (batch values weighted by the batch size).
    """

    #: Under DDP each rank's accumulators hold its share: checkpoints keep them per rank.
    per_rank_state = True

    # Slots: the handlers read them every batch. (The driver reads each callback's __dict__
    # once per run, to find handlers set on the instance; CPython 3.11 then looks the
    # instance's own attributes up without its specialized path.)
    __slots__ = (
        "train_metrics",
        "valid_metrics",
        "_loss",
        "_losses",
        "_phase_metrics",
        "_resumed",
        "_training",
        "_warned",
    )

    def __init__(
        self,
        train_metrics: Sequence[Any] = (),
        valid_metrics: Sequence[Any] = (),
    ) -> None:
        self.train_metrics = [copy.deepcopy(m) for m in train_metrics]
        self.valid_metrics = [copy.deepcopy(m) for m in valid_metrics]
        self._loss = LossTracker()
        self._losses: dict[str, LossTracker] = {"loss": self._loss}
        self._phase_metrics: list[Any] = []
        self._resumed: dict[str, Any] | None = None  # a checkpoint's training accumulators
        self._training = False  # between on_train_begin and on_train_end (or the run's end)
        self._warned: set[int] = set()  # metrics already warned about (DDP, no reduction hook)

    # -- phases -------------------------------------------------------------------------------

    def _begin(self, ctx: Context, metrics: list[Any]) -> None:
        self._loss = LossTracker(no_grad=not ctx.training)  # validation runs under no_grad
        self._losses = {"loss": self._loss}
        self._phase_metrics = metrics
        for metric in metrics:
            if isinstance(metric, torch.nn.Module):  # torchmetrics: its state follows the device
                metric.to(ctx.device)
            metric.reset()
        resumed, self._resumed = self._resumed, None
        if resumed is not None and ctx.training and ctx.iter > 0:  # a training pass resumed mid-way
            self._load_accumulators(to_device(resumed, ctx.device))

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The training phase's accumulators, for a checkpoint taken inside an epoch: a
        resumed epoch's means then cover all its batches, bit-identical to an uninterrupted
        run's. (Between epochs there is nothing to keep; this is small either way.)"""
        if self._phase_metrics is not self.train_metrics:
            return {"train": None}
        metrics = []
        for metric in self.train_metrics:
            state = metric_state(metric)
            if state is None:
                warnings.warn(
                    f"the metric {metric_name(metric)!r} ({type(metric).__name__}) has no "
                    "state_dict()/load_state_dict(): a checkpoint taken inside an epoch does not "
                    "keep what it accumulated, so after a resume its value for that epoch covers "
                    "only the batches after the checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
            metrics.append(state)
        losses = {name: tracker.state_dict() for name, tracker in self._losses.items()}
        return {"train": {"losses": losses, "metrics": metrics}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Keep a checkpoint's accumulators until the resumed training pass begins; during a
        training pass (a rewind, ``Stepper.rewind()``), put them back at once."""
        if not self._training:
            self._resumed = state["train"]
            return
        self._loss = LossTracker()
        self._losses = {"loss": self._loss}
        if state["train"] is not None:
            self._load_accumulators(state["train"])

    def reshard_state(self, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
        """This rank's state from those saved by a DDP run of another size: rank 0 takes
        the sums over all of them, the other ranks nothing, so the reduced values (or one
        process's) are the saved run's exactly."""
        if rank != 0:
            return {"train": None}
        trains = [state["train"] for state in states]
        if any(train is None for train in trains):  # saved outside a training pass: nothing to sum
            return states[0]
        names = dict.fromkeys(name for train in trains for name in train["losses"])
        empty = LossTracker().state_dict()
        losses = {}
        for name in names:
            saved = [{"state_dict": train["losses"].get(name, empty)} for train in trains]
            losses[name] = merge_metric_states(LossTracker(name), saved)["state_dict"]  # type: ignore[index]
        metrics = [
            merge_metric_states(metric, [train["metrics"][i] for train in trains])
            for i, metric in enumerate(self.train_metrics)
        ]
        return {"train": {"losses": losses, "metrics": metrics}}

    def _load_accumulators(self, state: dict[str, Any]) -> None:
        for name, tracker_state in state["losses"].items():
            tracker = self._losses.get(name)
            if tracker is None:
                tracker = self._losses[name] = LossTracker(name)
            tracker.load_state_dict(tracker_state)
        for metric, metric_saved in zip(self.train_metrics, state["metrics"], strict=False):
            if metric_saved is not None:
                load_metric_state(metric, metric_saved)

    def _batch_end(self, ctx: Context) -> None:
        # Per batch: keep the detached loss and update the metrics on the device; no sync.
        if ctx.skipped:
            return
        target = ctx.target
        try:
            size = target.shape[0]
        except (AttributeError, IndexError, TypeError):  # not a batched tensor
            size = batch_size_of(ctx.input if target is None else target)
        if ctx.losses and ctx.training:  # several optimizers: one loss each
            losses = self._losses
            for name, loss in ctx.losses.items():
                key = f"loss_{name}"
                tracker = losses.get(key)
                if tracker is None:
                    tracker = losses[key] = LossTracker(key)
                tracker.update(loss, size)
        else:
            loss = ctx.loss
            if loss is not None:
                self._loss.update(loss, size)
        metrics = self._phase_metrics
        if metrics:  # (no iterator made for the empty list: the default, loss only)
            for metric in metrics:
                try:
                    metric.update(ctx.pred, target)
                except Exception as exc:  # free on the normal path
                    exc.add_note(f"in metric {metric_name(metric)!r}.update, {_where(ctx)}")
                    raise

    def _end(self, ctx: Context, phase: str) -> None:
        if is_distributed():
            self._reduce(ctx)
        for name, tracker in self._losses.items():
            if tracker.count or name != "loss" or not ctx.losses:  # no empty "loss" beside per-optimizer ones
                ctx.metrics[f"{phase}_{name}"] = tracker.compute()
        for metric in self._phase_metrics:
            try:
                value = metric.compute()
            except Exception as exc:
                exc.add_note(f"in metric {metric_name(metric)!r}.compute, {_where(ctx)}")
                raise
            if isinstance(value, torch.Tensor):
                value = value.item()  # sync-ok: once per phase
            ctx.metrics[f"{phase}_{metric_name(metric)}"] = value

    def _reduce(self, ctx: Context) -> None:
        """DDP: every state becomes its sum over the ranks, so every rank computes the whole
        data set's values (a collective: each rank reaches it at the same phase's end)."""
        for tracker in self._losses.values():
            tracker.reduce_states(reduce_sum)
        for metric in self._phase_metrics:
            hook = getattr(metric, "reduce_states", None)
            if callable(hook):
                hook(reduce_sum)
            elif (
                not hasattr(metric, "metric_state") and id(metric) not in self._warned
            ):  # torchmetrics syncs itself
                self._warned.add(id(metric))
                warnings.warn(
                    f"the metric {metric_name(metric)!r} has no reduce_states(reduce_sum) hook: under DDP "
                    "it is computed on each process's share of the data, so ranks may disagree; add the "
                    "hook (it replaces each accumulated state by reduce_sum(state)) to make it exact",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def on_train_begin(self, ctx: Context) -> None:
        self._begin(ctx, self.train_metrics)
        self._training = True

    on_train_batch_end = _batch_end

    def on_train_end(self, ctx: Context) -> None:
        self._training = False
        self._end(ctx, "train")

    def teardown(self, ctx: Context) -> None:
        self._training = False  # a run that ended inside its training pass

    def on_valid_begin(self, ctx: Context) -> None:
        self._begin(ctx, self.valid_metrics)

    on_valid_batch_end = _batch_end

    def on_valid_end(self, ctx: Context) -> None:
        self._end(ctx, "valid")

    def on_epoch_end(self, ctx: Context) -> None:
        ctx.commit_epoch()

    def __repr__(self) -> str:
        names = [metric_name(m) for m in self.train_metrics + self.valid_metrics]
        return f"MetricsTracker(loss, {', '.join(dict.fromkeys(names))})" if names else "MetricsTracker(loss)"


def _where(ctx: Context) -> str:
    where = f"{ctx.phase} phase"
    if ctx.kind == "fit":
        where += f", epoch {ctx.epoch}"
    return f"{where}, batch {ctx.iter}" if ctx.in_batch else where
