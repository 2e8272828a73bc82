"""Distributed helpers: rank detection and rank-0 guards (DDP wiring comes with its issue)."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["is_distributed", "is_main_process"]


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True on rank 0, or when not running distributed."""
    return not is_distributed() or dist.get_rank() == 0
