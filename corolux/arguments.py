"""Trainer arguments -> objects: device, optimizers, epochs, metrics, seeds.

Each function checks one argument and raises a TypeError/ValueError that names it, shows
what was given and says how to fix it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from corolux._suggest import did_you_mean
from corolux.metrics import check_metric

__all__ = [
    "OptimizerSpec",
    "check_metrics",
    "resolve_device",
    "resolve_epochs",
    "resolve_optimizers",
    "seed_everything",
]

OptimizerSpec = (
    torch.optim.Optimizer
    | Callable[[Iterator[torch.nn.Parameter]], torch.optim.Optimizer]
    | Mapping[str, Any]
)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu; anything else -> ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from None


def resolve_optimizers(
    spec: OptimizerSpec | None, model: torch.nn.Module
) -> dict[str, torch.optim.Optimizer]:
    """An Optimizer, a factory ``params -> Optimizer`` or a dict of them -> ``{name: Optimizer}``."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("optimizer={} is empty; give at least one name -> optimizer")
        return {str(name): _one_optimizer(value, model, name) for name, value in spec.items()}
    return {"opt": _one_optimizer(spec, model, None)}


def _one_optimizer(value: Any, model: torch.nn.Module, name: str | None) -> torch.optim.Optimizer:
    if isinstance(value, torch.optim.Optimizer):
        return value
    where = "optimizer" if name is None else f"optimizer[{name!r}]"
    if callable(value) and not isinstance(value, type):
        if name is None:
            params = model.parameters()
        else:
            try:
                params = model.get_submodule(name).parameters()
            except AttributeError:
                children = [n for n, _ in model.named_children()]
                raise ValueError(
                    f"{where} is a factory, so it gets the parameters of the submodule "
                    f"{name!r}, but the model has none;{did_you_mean(name, children) or ''} "
                    f"submodules: {children}. Name the optimizer after a submodule, or pass "
                    "an Optimizer built on the parameters you want"
                ) from None
        optimizer = value(params)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where}: the factory returned {type(optimizer).__name__}, not an Optimizer")
        return optimizer
    hint = (
        f" (call it with the parameters: lambda p: {value.__name__}(p, lr=...))"
        if isinstance(value, type)
        else ""
    )
    raise TypeError(
        f"{where} must be a torch.optim.Optimizer, a factory params -> Optimizer, or a dict of "
        f"them, got {type(value).__name__}{hint}"
    )


def resolve_epochs(epochs: Any) -> tuple[int, int]:
    """``n`` -> ``(n, n)``; ``(min, max)`` checked."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if is_int(epochs):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs!r}")
        return epochs, epochs
    if isinstance(epochs, (tuple, list)) and len(epochs) == 2 and all(map(is_int, epochs)):
        low, high = epochs
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"epochs=(min, max) needs 0 <= min <= max and max >= 1, got {tuple(epochs)!r}")
        return low, high
    raise TypeError(f"epochs must be an int or a (min_epochs, max_epochs) pair, got {epochs!r}")


def check_metrics(metrics: Sequence[Any] | None, argument: str) -> list[Any]:
    if metrics is None:
        return []
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(
            f"{argument} must be a list of metrics, got {type(metrics).__name__}; wrap it: [metric]"
        )
    for metric in metrics:
        check_metric(metric, argument)
    return list(metrics)


def seed_everything(seed: int) -> None:
    """Seed torch, ``random`` and NumPy (when installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)
