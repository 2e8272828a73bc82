"""Trainer arguments -> objects: device, optimizers, epochs, loss function, metrics, seeds.

Each function checks one argument and raises a TypeError/ValueError that names it, shows
what was given and says how to fix it.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from corolux._suggest import did_you_mean
from corolux.metrics import check_metric

__all__ = [
    "OptimizerSpec",
    "check_loss_fn",
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

_DEVICE_FIX = "device='auto' (CUDA, else MPS, else the CPU) or device='cpu'"


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda if available, else mps, else cpu; anything else -> ``torch.device``.

    A CUDA or MPS device that this machine does not have is a ValueError, raised here
    rather than at the first tensor moved there.
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', got {device!r}"
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this PyTorch build has no CUDA support (torch.version.cuda is None)"
                if torch.version.cuda is None
                else "torch.cuda.is_available() is False (no GPU or driver found)"
            )
            raise ValueError(
                f"device={device!r} asks for CUDA, but {why}; this machine has {_devices_here()}. "
                f"Use {_DEVICE_FIX}"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device={device!r} asks for CUDA device {resolved.index}, but this machine has "
                f"{_devices_here()}. Use one of those, or {_DEVICE_FIX}"
            )
    elif resolved.type == "mps" and not _mps_available():
        raise ValueError(
            f"device={device!r} asks for MPS (Apple-silicon GPUs), but it is not available here; "
            f"this machine has {_devices_here()}. Use {_DEVICE_FIX}"
        )
    return resolved


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def _devices_here() -> str:
    """What this machine offers, for error messages: ``"only the CPU"``, ``"the CPU and
    2 CUDA devices (cuda:0 to cuda:1)"``, ..."""
    found = []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        found.append(
            "1 CUDA device (cuda:0)" if count == 1 else f"{count} CUDA devices (cuda:0 to cuda:{count - 1})"
        )
    if _mps_available():
        found.append("MPS (mps)")
    if not found:
        return "only the CPU"
    return ", ".join(["the CPU", *found[:-1]]) + " and " + found[-1]


def resolve_optimizers(
    spec: OptimizerSpec | None,
    model: torch.nn.Module,
    *,
    extra: Iterable[torch.nn.Parameter] = (),
) -> dict[str, torch.optim.Optimizer]:
    """An Optimizer, a factory ``params -> Optimizer`` or a dict of them -> ``{name: Optimizer}``.

    Each optimizer must update at least one parameter of ``model`` or of ``extra`` (other
    parameters trained with it, e.g. a loss function's); parameters are compared by
    identity. One over only part of them, or over them and more, is fine.

    Raises:
        TypeError: ``spec`` is not an optimizer, a factory or a dict of them.
        ValueError: an empty dict; a dict factory without a submodule of its name; an
            optimizer none of whose parameters belongs to the model (its weights would
            never change).
    """
    if spec is None:
        return {}
    entries: list[tuple[str, Any, str | None]]  # (key, spec, dict name or None)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("optimizer={} is empty; give at least one name -> optimizer")
        entries = [(str(name), value, name) for name, value in spec.items()]
    else:
        entries = [("opt", spec, None)]
    owned = {id(p) for p in model.parameters()}
    owned.update(id(p) for p in extra)
    optimizers = {}
    for key, value, name in entries:
        optimizer = _one_optimizer(value, model, name)
        if not any(id(p) in owned for group in optimizer.param_groups for p in group["params"]):
            raise _foreign_optimizer(optimizer, model, name, built=optimizer is not value)
        optimizers[key] = optimizer
    return optimizers


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


def _foreign_optimizer(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, name: str | None, *, built: bool
) -> ValueError:
    """The error for an optimizer that updates none of the model's parameters."""
    cls = type(optimizer)
    spelled = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.optim") else cls.__name__
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    held = f"{cls.__name__}, {count} parameter{'s' if count != 1 else ''}"
    where = "optimizer" if name is None else f"optimizer[{name!r}]"
    what = (
        f"{where}: the factory returned an optimizer ({held}) that holds none of the model's "
        "parameters (a factory must build it on the params it is given)"
        if built
        else f"{where} ({held}) holds none of the model's parameters (was it built for another "
        "model, or before the model was created again?)"
    )
    source = "model.parameters()"
    if name is not None:
        try:
            model.get_submodule(name)
        except AttributeError:
            submodule = False
        else:
            submodule = True
            if all(part.isidentifier() for part in name.split(".")):
                source = f"model.{name}.parameters()"
    factory = f"lambda params: {spelled}(params, lr=...)"
    if name is None:
        fix = f"build it from {source}, or pass a factory: optimizer={factory}"
    elif submodule:
        fix = (
            f"build it from {source}, or pass a factory, which gets the parameters of the "
            f"submodule {name!r}: optimizer={{{name!r}: {factory}, ...}}"
        )
    else:
        fix = f"build it from the model's parameters, e.g. {source}"
    return ValueError(f"{what}, so training would never change the model's weights; {fix}")


def check_loss_fn(loss_fn: Any) -> Any:
    """Return ``loss_fn`` if it is None or a callable ``(pred, target) -> loss``.

    Raises:
        TypeError: a class instead of an instance (``nn.CrossEntropyLoss`` for
            ``nn.CrossEntropyLoss()``), or anything else that is not callable.
    """
    if loss_fn is None:
        return None
    if isinstance(loss_fn, type):
        name = loss_fn.__name__
        spelled = f"nn.{name}" if loss_fn.__module__.startswith("torch.nn.") else name
        raise TypeError(
            f"loss_fn got the class {name}, not a loss function; pass an instance: loss_fn={spelled}()"
        )
    if not callable(loss_fn):
        result = (
            " (a tensor: pass the loss function itself, not its result)"
            if isinstance(loss_fn, torch.Tensor)
            else ""
        )
        raise TypeError(
            f"loss_fn must be callable (pred, target) -> loss, got {loss_fn!r}{result}; pass e.g. "
            "torch.nn.functional.cross_entropy or torch.nn.CrossEntropyLoss(), or None when the "
            "model's output carries its loss"
        )
    return loss_fn


def resolve_epochs(epochs: Any) -> tuple[int, int]:
    """``n`` -> ``(0, n)`` (DESIGN section 5: only EarlyStopping honours the minimum, and a
    bare number sets none); ``(min, max)`` checked."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if is_int(epochs):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs!r}")
        return 0, epochs
    if isinstance(epochs, (tuple, list)) and len(epochs) == 2 and all(map(is_int, epochs)):
        low, high = epochs
        if not 0 <= low <= high or high < 1:
            raise ValueError(f"epochs=(min, max) needs 0 <= min <= max and max >= 1, got {tuple(epochs)!r}")
        return low, high
    if _is_array(epochs):
        kind = "Tensor" if isinstance(epochs, torch.Tensor) else "NumPy array"
        if epochs.ndim == 0:
            raise TypeError(f"epochs must be an int, got a 0-d {kind} {epochs!r}; pass int(epochs)")
        raise TypeError(
            f"epochs got a {kind} of shape {tuple(epochs.shape)}: did you write fit(x, y)? The "
            "second argument is epochs; pass the data as one pair: fit((x, y), epochs=...)"
        )
    raise TypeError(f"epochs must be an int or a (min_epochs, max_epochs) pair, got {epochs!r}")


def _is_array(value: Any) -> bool:
    """A tensor, or a NumPy array (without importing NumPy: an array implies it is loaded)."""
    if isinstance(value, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


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
    """Seed torch (CPU and every CUDA device), ``random`` and NumPy (when installed).

    Call it at the top of a script, before building the model, so that the initial
    weights, the shuffling and dropout are the same on every run. ``Trainer(seed=...)``
    calls it at the start of each run.

    Args:
        seed: an int in ``[-2**63, 2**64)``.

    Raises:
        TypeError: ``seed`` is not an int (a bool is refused too).
        ValueError: ``seed`` does not fit in 64 bits.

    Example:
        >>> import torch, corolux
        >>> corolux.seed_everything(0)
        >>> weights = torch.nn.Linear(4, 2).weight.detach().clone()
        >>> corolux.seed_everything(0)
        >>> torch.equal(weights, torch.nn.Linear(4, 2).weight)
        True
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(
            f"seed_everything() takes an int seed, got {type(seed).__name__} {seed!r}; "
            "e.g. corolux.seed_everything(0)"
        )
    if not -(2**63) <= seed < 2**64:
        raise ValueError(
            f"seed_everything(): the seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed!r}"
        )
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)
