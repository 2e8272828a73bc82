"""CaptureAnomaly: write the training batch whose loss or gradients are not finite, with its
starting state, then stop: ``Stepper.from_capture`` replays it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from corolux import checkpoint
from corolux.callback import Callback
from corolux.callbacks.terminate_on_nan import is_finite, shown, stop_before_step
from corolux.capture import anomaly_state
from corolux.context import Context

__all__ = ["CaptureAnomaly"]

_CHECKS = {"loss": "on_train_batch_after_loss", "grads": "on_train_batch_before_step"}


class CaptureAnomaly(Callback):
    """Capture the first training batch whose loss (or gradients) is not finite, then stop.

    With ``check="loss"`` it reads ``ctx.loss`` at ``on_train_batch_after_loss``; with
    ``check="grads"``, the gradients of ``ctx.opt``'s parameters at
    ``on_train_batch_before_step`` (after clipping). On a NaN or infinite value it writes to
    ``path``, through ``corolux.checkpoint`` (atomically; ``torch.load(weights_only=True)``
    reads it), the batch as the data gave it, the RNG state at that batch's start and the
    training state (model, optimizers, GradScaler, counters, history, callbacks' states):
    no optimizer step is taken on the batch, so these weights are the batch's starting weights.
    Then it skips the batch and stops training with reason ``"anomaly"`` (as ``TerminateOnNaN``
    does), with a ``RuntimeWarning`` naming the epoch, the batch and the file.

    ``corolux.Stepper.from_capture(trainer, path)``, in any process, pauses at that batch's
    ``on_train_batch_begin`` with the same weights and RNG: stepping to the checked stage shows
    the same non-finite value. ``trainer.load_checkpoint(path)`` loads its weights alone.

    .. warning::
       Each check reads one value on the host: one device sync per training batch. That is
       why it is opt-in, not a default callback. Besides the check, each batch costs one RNG
       snapshot at ``on_train_batch_begin`` (no sync).

    One optimizer only (with several, the earlier ones have stepped when a later one's check
    fails: refused at the start). What the capture does not hold: the gradients a
    gradient-accumulation window gathered before the batch (a ``"grads"`` replay then
    differs), and the buffers as they were before the batch's forward (BatchNorm's running
    statistics are saved as that forward left them; in training mode the forward does not
    read them).

    Args:
        path: the file to write (its folder must exist); written once, at the first anomaly.
        check: ``"loss"`` or ``"grads"``. Under ``precision="16-mixed"`` the GradScaler
            skips steps on non-finite gradients as routine, so only ``"loss"`` is allowed.

    Weights: ``-inf`` at ``on_train_batch_begin`` (the RNG state before any callback draws,
    e.g. MixUp) and ``inf`` at the checked stage (after the callbacks that rewrite the loss
    or clip the gradients).

    Example:
        >>> CaptureAnomaly("anomaly.pt")
        CaptureAnomaly('anomaly.pt', check='loss')
        >>> history = trainer.fit(data, epochs=10, callbacks=[CaptureAnomaly("anomaly.pt")])  # doctest: +SKIP
        >>> history.stop_reason                                          # doctest: +SKIP
        'anomaly'
        >>> s = corolux.Stepper.from_capture(trainer, "anomaly.pt")      # doctest: +SKIP
        >>> s.until("on_train_batch_after_loss").ctx.loss                # doctest: +SKIP
        tensor(nan, grad_fn=<NllLossBackward0>)
    """

    weight = {
        "on_train_batch_begin": float("-inf"),
        "on_train_batch_after_loss": float("inf"),
        "on_train_batch_before_step": float("inf"),
    }

    def __init__(self, path: str | os.PathLike[str], check: str = "loss") -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"CaptureAnomaly: path must be a file path, got {type(path).__name__} {path!r}")
        if check not in _CHECKS:
            raise ValueError(f"CaptureAnomaly: check must be 'loss' or 'grads', got {check!r}")
        self.path = Path(path)
        self.check = check
        self._start: dict[str, Any] | None = None  # the RNG snapshot of this batch's start
        # The check listens to its stage alone (an instance attribute counts as a handler).
        setattr(self, _CHECKS[check], self._check_loss if check == "loss" else self._check_grads)

    def setup(self, ctx: Context) -> None:
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"CaptureAnomaly: no folder {str(self.path.parent)!r} to write {str(self.path)!r} "
                "in; create it first"
            )
        if self.check == "grads" and ctx.precision.scaler is not None:
            raise ValueError(
                "CaptureAnomaly(check='grads') under precision='16-mixed': the GradScaler skips the "
                "steps whose gradients are not finite and lowers its scale, as routine; use "
                "check='loss', or read ctx.step_skipped at on_train_batch_after_step"
            )
        if len(ctx.optimizers) > 1:
            raise ValueError(
                f"CaptureAnomaly: this trainer has {len(ctx.optimizers)} optimizers "
                f"({', '.join(ctx.optimizers)}); the step runs them in turn, so when a later one's "
                "loss or gradients fail the earlier ones have stepped, and the batch's starting "
                "weights, which the capture must hold, are gone. It supports one optimizer; with "
                "several, use TerminateOnNaN, or a rewindable Stepper (s.rewind() at on_exception)"
            )
        self._start = None

    def on_train_batch_begin(self, ctx: Context) -> None:
        self._start = checkpoint.rng_snapshot()  # per batch: no sync

    def _check_loss(self, ctx: Context) -> None:
        loss = ctx.loss
        if not is_finite(loss):  # sync: one host read per check (opt-in, see the docstring)
            self._capture(ctx, f"the training loss is {shown(loss)}", shown(loss))

    def _check_grads(self, ctx: Context) -> None:
        opt = ctx.opt
        if opt is None:
            return
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # sync: once
            return
        names = {id(p): name for name, p in ctx.model.named_parameters()}
        bad = [
            names.get(id(p), "?")
            for g in opt.param_groups
            for p in g["params"]
            if p.grad is not None and not bool(torch.isfinite(p.grad).all())  # sync-ok: after an anomaly
        ]
        shown_names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        self._capture(ctx, f"the gradients of {shown_names} are not finite", shown_names)

    def _capture(self, ctx: Context, what: str, value: str) -> None:
        assert self._start is not None  # taken at this batch's on_train_batch_begin
        state = anomaly_state(ctx, self._start, self.check, _CHECKS[self.check], value)
        try:
            checkpoint.write(state, self.path)
        except TypeError as exc:
            if "['capture']['batch']" not in str(exc):
                raise
            raise TypeError(
                f"CaptureAnomaly: the batch ({type(ctx.batch).__name__}) holds values that "
                "torch.load(weights_only=True) would not read back, so it cannot be captured: "
                f"{exc}. Give batches of tensors, tuples, lists and dicts"
            ) from None
        where = str(self.path)
        stop_before_step(
            ctx,
            "anomaly",
            f"CaptureAnomaly: {what}",
            f"the batch and its starting state are in {where!r} (replay it with "
            f"corolux.Stepper.from_capture(trainer, {where!r})); ",
        )

    def __repr__(self) -> str:
        return f"CaptureAnomaly({str(self.path)!r}, check={self.check!r})"
