"""GradientClip: clip the gradients' total norm before each optimizer step."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["GradientClip"]


class GradientClip(Callback):
    """Clip the total norm of the gradients of ``ctx.opt``'s parameters to ``max_norm`` at
    ``on_train_batch_before_step`` (``torch.nn.utils.clip_grad_norm_``).

    Under ``precision="16-mixed"`` it first calls ``ctx.unscale_gradients()``, so it clips
    the true gradients, not the loss-scaled ones, and the step does not unscale them again
    (the same as ``scaler.unscale_(opt)``, clip, ``scaler.step(opt)`` by hand). Without a
    GradScaler that call does nothing. When the gradients hold inf/NaN the GradScaler still
    skips the step. With several optimizers it clips each one's parameters before its step.

    The norm before clipping goes into the history: ``history["grad_norm"]`` (one optimizer)
    or ``grad_norm_<opt>``, the norm of the epoch's last optimizer step. It is kept as a
    device tensor through ``ctx.log`` and read once per epoch: no host sync per step.

    Weight 50 at ``on_train_batch_before_step``: after user callbacks (weight 0) that change
    the gradients there, so the step is bounded by what is actually applied; a callback that
    wants to read the clipped gradients listens there with a weight above 50.

    Args:
        max_norm: the largest total norm (> 0).
        norm_type: the p of the p-norm (> 0), ``float("inf")`` for the max norm.

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` is not a positive number.

    Example:
        >>> GradientClip(max_norm=0.5)
        GradientClip(max_norm=0.5, norm_type=2.0)
        >>> trainer.fit(data, epochs=5, callbacks=[GradientClip(1.0)])  # doctest: +SKIP
    """

    weight = {"on_train_batch_before_step": 50.0}

    def __init__(self, max_norm: float = 1.0, norm_type: float = 2.0) -> None:
        self.max_norm = _positive("max_norm", max_norm)
        self.norm_type = _positive("norm_type", norm_type)
        self._name = "grad_norm"

    def setup(self, ctx: Context) -> None:
        self._name = "grad_norm" if len(ctx.optimizers) <= 1 else ""

    def on_train_batch_before_step(self, ctx: Context) -> None:
        opt = ctx.opt
        if opt is None:  # a step that updates by hand (optimizer=None)
            params: Any = ctx.model.parameters()
        else:
            ctx.unscale_gradients(opt)  # no-op without a GradScaler; the step won't unscale again
            params = [p for group in opt.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        ctx.log(self._name or f"grad_norm_{ctx.opt_name}", norm)  # a device tensor: no sync here

    def __repr__(self) -> str:
        return f"GradientClip(max_norm={self.max_norm}, norm_type={self.norm_type})"


def _positive(name: str, value: Any) -> float:
    if isinstance(value, str) and value.lower() == "inf":
        value = math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        raise ValueError(f"GradientClip: {name} must be a number > 0, got {value!r}")
    return float(value)
