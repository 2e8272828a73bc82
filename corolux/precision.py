"""Precision: "32" / "bf16-mixed" / "16-mixed" -> an autocast context and a GradScaler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PRECISIONS", "autocast_factory", "make_scaler"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def _check(precision: str) -> str:
    precision = str(precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return precision


def autocast_factory(precision: str, device: torch.device) -> Callable[[], Any] | None:
    """Return a function building the autocast context for the forward, or None for "32"."""
    precision = _check(precision)
    if precision == "32":
        return None
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    device_type = device.type
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)


def make_scaler(precision: str, device: torch.device) -> Any:
    """A GradScaler for "16-mixed" (fp16 gradients underflow without one), else None."""
    if _check(precision) != "16-mixed":
        return None
    return torch.amp.GradScaler(device.type)
