"""TerminateOnNaN: stop training at the first non-finite training loss, before its step."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Stop training when a training loss is NaN or infinite, without stepping on it.

    At ``on_train_batch_after_loss`` it checks ``ctx.loss``; a non-finite one skips the rest
    of the batch (no backward, no optimizer step: the weights stay those the previous step
    left) and stops training with reason ``"nan"`` (``history.stop_reason``), with a
    ``RuntimeWarning`` naming the epoch and the batch. Under gradient accumulation the
    window's earlier gradients are dropped, not stepped.

    .. warning::
       Each check reads the loss on the host: one device sync per training batch (per
       optimizer, with several). That is why it is opt-in, not a default callback.

    Weight ``inf`` at ``on_train_batch_after_loss``: it checks the loss that the backward
    will use, after the callbacks (e.g. MixUp) that rewrite ``ctx.loss`` there.

    Example:
        >>> TerminateOnNaN()
        TerminateOnNaN()
        >>> history = trainer.fit(data, epochs=10, callbacks=[TerminateOnNaN()])  # doctest: +SKIP
        >>> history.stop_reason  # doctest: +SKIP
        'nan'
    """

    weight = {"on_train_batch_after_loss": float("inf")}

    def on_train_batch_after_loss(self, ctx: Context) -> None:
        loss = ctx.loss
        if is_finite(loss):  # sync: one host read of the loss per check (opt-in, see the docstring)
            return
        stop_before_step(ctx, "nan", f"TerminateOnNaN: the training loss is {shown(loss)}")


def stop_before_step(ctx: Context, reason: str, what: str, then: str = "") -> None:
    """Skip the rest of this training batch (no optimizer step on it) and stop training with
    ``reason``, warning ``"<what> at epoch E, batch i/n; <then>training stops ..."``."""
    ctx.skip_batch()
    ctx.stop_training(reason)
    batches = "" if ctx.num_batches is None else f"/{ctx.num_batches}"
    which = f" (optimizer {ctx.opt_name!r})" if len(ctx.optimizers) > 1 else ""
    warnings.warn(
        f"{what} at epoch {ctx.epoch}, batch {ctx.iter}{batches}{which}; {then}training stops "
        f"(reason {reason!r}) without stepping on it",
        RuntimeWarning,
        stacklevel=3,
    )


def is_finite(loss: Any) -> bool:
    """Whether ``loss`` is finite (a tensor: every element); one host read of a tensor."""
    if isinstance(loss, torch.Tensor):
        return bool(torch.isfinite(loss.detach()).all())
    try:
        return math.isfinite(float(loss))
    except (TypeError, ValueError):
        return True  # not a number: the backward reports it


def shown(loss: Any) -> str:
    """``loss`` as a message shows it (a one-element tensor as its float)."""
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return repr(float(loss.detach()))
    return repr(loss)
