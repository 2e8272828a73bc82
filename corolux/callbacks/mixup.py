"""MixUp: train on convex combinations of pairs of samples and of their losses."""

from __future__ import annotations

import math
import numbers

import torch

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["MixUp"]


class MixUp(Callback):
    """Mix each training batch with a shuffled copy of itself (Zhang et al., *mixup*, 2018).

    At ``on_train_batch_begin`` it draws ``lam ~ Beta(alpha, alpha)`` and a permutation
    ``perm`` of the batch, then sets ``ctx.input = lam * x + (1 - lam) * x[perm]``. At
    ``on_train_batch_after_loss`` it sets ``ctx.loss = lam * ctx.loss + (1 - lam) *
    ctx.loss_fn(ctx.pred, ctx.target[perm])``, which equals the loss on the mixed targets
    for any loss that is linear in its target (cross-entropy, with class indices or
    probabilities): no loss wrapper is needed, and the trainer's ``loss_fn`` is unchanged.

    The draws come from torch's global RNG, so a run is reproducible under
    ``torch.manual_seed``, in this order per batch: ``lam`` from the CPU generator
    (``torch.distributions.Beta(alpha, alpha).sample()``, read as a float: no device sync),
    then ``perm = torch.randperm(batch_size, device=x.device)``. Training batches only;
    validation sees the data as it is. With several optimizers, each one's loss is mixed
    with the same draws.

    .. warning::
        The training metrics compare predictions on mixed inputs with the unmixed targets,
        and ``train_loss`` is the mixed loss: judge the model by its validation metrics
        (``train_metrics=`` / ``valid_metrics=`` on the Trainer choose where each metric runs).

    Args:
        alpha: the concentration of the Beta distribution (> 0). Small values (0.1 to 0.4)
            keep most mixes close to one of the two samples; ``alpha=1`` mixes uniformly.

    Attributes:
        lam: the mixing weight of the current batch (a float; None before the first batch).
        perm: the current batch's permutation (a tensor on the input's device; None before).

    Raises:
        TypeError, ValueError: at construction, for an ``alpha`` that is not a positive number;
            during ``fit``, when the trainer has no ``loss_fn`` or a training batch's input is
            not a floating-point tensor (or its target not a tensor of the same length).

    Example:
        >>> import torch, corolux
        >>> from corolux.callbacks.mixup import MixUp
        >>> trainer = corolux.Trainer(torch.nn.Linear(4, 3), loss_fn=torch.nn.functional.cross_entropy,
        ...                           optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> history = trainer.fit((x, y), epochs=2, callbacks=[MixUp(alpha=0.4)])
        >>> len(history)
        2
    """

    weight = 0

    def __init__(self, alpha: float = 0.4) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"MixUp: alpha must be a positive number, got {type(alpha).__name__} {alpha!r}")
        if not alpha > 0 or math.isinf(alpha):
            raise ValueError(
                f"MixUp: alpha must be a positive, finite number, got {alpha!r}; e.g. MixUp(alpha=0.4)"
            )
        self.alpha: float = float(alpha)
        concentration = torch.tensor(self.alpha)  # on the CPU: lam is drawn by the CPU generator
        self._beta: torch.distributions.Beta = torch.distributions.Beta(concentration, concentration)
        self.lam: float | None = None
        self.perm: torch.Tensor | None = None

    def setup(self, ctx: Context) -> None:
        if ctx.kind == "fit" and ctx.loss_fn is None:
            raise ValueError(
                "MixUp needs the trainer's loss_fn to compute the loss on the permuted targets, but "
                "loss_fn is None (the model's output carries its loss); pass Trainer(loss_fn=...), or "
                "mix the loss in your own callback at on_train_batch_after_loss"
            )
        self.lam = None
        self.perm = None

    def on_train_batch_begin(self, ctx: Context) -> None:
        x, y = ctx.input, ctx.target
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            shown = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"MixUp mixes a floating-point input tensor, but the training batch's input is "
                f"{shown}; for several inputs (a tuple or dict) or token ids, mix what can be mixed "
                "(e.g. the embeddings) in your own callback or step"
            )
        n = x.shape[0] if x.dim() else 0
        if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != n:
            shown = f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(
                f"MixUp permutes the target along with the input, so it needs a target tensor with "
                f"one row per sample ({n}), got {shown}; give (input, target) batches"
            )
        # Per batch: one CPU draw for lam (no device sync) and one randperm on the input's device.
        lam = float(self._beta.sample())
        perm = torch.randperm(n, device=x.device)
        self.lam, self.perm = lam, perm
        ctx.input = lam * x + (1 - lam) * x[perm]

    def on_train_batch_after_loss(self, ctx: Context) -> None:
        lam, perm = self.lam, self.perm
        assert lam is not None and perm is not None  # drawn at this batch's on_train_batch_begin
        loss_fn, target = ctx.loss_fn, ctx.target[perm]
        assert loss_fn is not None  # checked in setup
        autocast = ctx.precision.autocast  # under autocast, as the step computed ctx.loss
        if autocast is None:
            other = loss_fn(ctx.pred, target)
        else:
            with autocast():
                other = loss_fn(ctx.pred, target)
        ctx.loss = lam * ctx.loss + (1 - lam) * other

    def __repr__(self) -> str:
        return f"MixUp(alpha={self.alpha:g})"
