"""Precision: "32" / "bf16-mixed" / "16-mixed" -> one object that owns autocast, the
GradScaler's scaling, unscaling, stepping and its once-per-batch ``update()``."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PRECISIONS", "Precision"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


class Precision:
    """The numeric precision of a trainer's steps.

    ``"32"`` runs everything in float32. ``"bf16-mixed"`` runs the forward and the loss
    under ``torch.autocast`` to bfloat16. ``"16-mixed"`` autocasts to float16 and scales the
    loss with a ``GradScaler``, since float16 gradients underflow without it (on CUDA; on the
    CPU it runs too, for testing, with a warning that ``bf16-mixed`` is the CPU's mixed
    precision).

    The steps go through it: :meth:`scale` (in ``ctx.backward``), :meth:`unscale`
    (``ctx.unscale_gradients()``, for callbacks that clip or read gradients), :meth:`step`
    (``ctx.step_optimizer``) and :meth:`update` (the loop, once per batch).

    ``autocast`` and ``scaler`` are set when it is built and never change (a ``Context`` keeps
    the scaler it reads every batch).

    Invariant: between two :meth:`update` calls each optimizer is unscaled at most once
    (``_unscaled`` holds those already unscaled, so :meth:`unscale` is idempotent) and
    stepped at most once; ``_stepped`` is true when a step awaits the scaler's update.

    Example:
        >>> p = Precision("bf16-mixed", torch.device("cpu"))
        >>> with p.autocast():
        ...     y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        precision = str(precision)
        if precision not in PRECISIONS:
            choices = ", ".join(map(repr, PRECISIONS))
            raise ValueError(f"precision must be one of {choices}, got {precision!r}")
        self.name = precision
        #: Builds the autocast context of the forward and the loss; None at full precision.
        self.autocast: Callable[[], Any] | None = None
        #: The GradScaler of "16-mixed", else None (``ctx.scaler``).
        self.scaler: torch.amp.GradScaler | None = None
        if precision != "32":
            dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
            device_type = device.type
            self.autocast = lambda: torch.autocast(device_type=device_type, dtype=dtype)
        if precision == "16-mixed":
            if device.type == "cpu":
                warnings.warn(
                    "precision='16-mixed' on the CPU runs float16 autocast with a GradScaler, "
                    "which is slow there; bf16-mixed is the CPU's mixed precision "
                    "(Trainer(precision='bf16-mixed'))",
                    UserWarning,
                    stacklevel=3,
                )
            self.scaler = torch.amp.GradScaler(device.type)
        self._unscaled: set[int] = set()
        self._stepped = False
        self._hooked: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()
        self._ran = True  # the optimizer's own step() ran in the last step()
        self._found_inf: torch.Tensor | None = None  # a fused optimizer's own skip flag

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: multiplied by the GradScaler's scale, if any."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, opt: torch.optim.Optimizer) -> None:
        """Divide ``opt``'s gradients by the scale, once per step (later calls do nothing);
        a no-op without a GradScaler. No host-device sync."""
        if self.scaler is not None and id(opt) not in self._unscaled:
            self.scaler.unscale_(opt)
            self._unscaled.add(id(opt))

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Step ``opt``: through the GradScaler, which skips the step when the gradients hold
        inf or NaN (:attr:`step_skipped`), or plainly."""
        scaler = self.scaler
        if scaler is None:
            opt.step()
            return
        if opt not in self._hooked:  # its step post-hook tells whether it ran
            self._hooked[opt] = opt.register_step_post_hook(self._optimizer_stepped)
        self._ran = False
        self._found_inf = None
        scaler.step(opt)
        self._stepped = True

    def _optimizer_stepped(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._ran = True
        # A fused optimizer runs even on inf gradients and skips inside; the scaler hands it
        # the flag as opt.found_inf for the duration of its step.
        self._found_inf = getattr(opt, "found_inf", None)

    @property
    def step_skipped(self) -> bool:
        """The GradScaler skipped the last optimizer step (inf/NaN gradients); always False
        without one. For a fused optimizer, reading it syncs with the device."""
        if not self._ran:
            return True
        return self._found_inf is not None and bool(self._found_inf)  # sync-ok: only when read

    def update(self) -> None:
        """Update the GradScaler's scale once, after every optimizer of the batch stepped (or
        was unscaled, then skipped); a no-op when neither happened since the last update."""
        if self._stepped or self._unscaled:
            self.scaler.update()  # type: ignore[union-attr]
            self._stepped = False
            self._unscaled.clear()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The GradScaler's scale and growth tracker, cloned on their device, for a rewind
        (``corolux.rewind``): no host sync, where ``state_dict()`` would read the scale on
        the host. None without a GradScaler, or before its first ``scale()``."""
        scaler = self.scaler
        # torch's GradScaler keeps what update() changes in these two device tensors.
        if scaler is None or scaler._scale is None or scaler._growth_tracker is None:
            return None
        return scaler._scale.clone(), scaler._growth_tracker.clone()

    def restore(self, kept: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Put back what :meth:`snapshot` returned, as if the current batch had not scaled,
        unscaled or stepped anything (a rewind)."""
        scaler = self.scaler
        if scaler is None:
            return
        self.update()  # forgets this batch's unscaling and steps (the scale it sets is replaced)
        if kept is None:
            scaler._scale = scaler._growth_tracker = None  # made again at the next scale()
        else:
            assert scaler._scale is not None and scaler._growth_tracker is not None
            scaler._scale.copy_(kept[0])
            scaler._growth_tracker.copy_(kept[1])
        self._ran, self._found_inf = True, None

    def __repr__(self) -> str:
        return f"Precision({self.name!r})"
