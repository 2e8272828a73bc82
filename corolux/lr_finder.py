"""The learning-rate range test: train briefly while the rate grows, and read the loss curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from corolux.callback import Callback
from corolux.context import Context
from corolux.history import finish_figure, pyplot

__all__ = ["LRFinder", "lr_finder"]


class LRFinder:
    """The result of :func:`lr_finder`: the rates tried, the loss at each, and a suggestion.

    ``losses`` are the batch losses as trained; ``smoothed`` their exponential moving
    average (bias-corrected), cut where the loss diverged (four times its best), which is
    what ``suggestion`` (the rate where the smoothed loss falls fastest) and ``plot`` use.
    """

    def __init__(self, lrs: Sequence[float], losses: Sequence[float], smoothing: float = 0.05) -> None:
        self.lrs = list(lrs)
        self.losses = list(losses)
        self.smoothed = _smooth(self.losses, smoothing)
        best = math.inf
        self.stop = len(self.smoothed)  # where the curve is cut: the loss diverged after it
        for i, loss in enumerate(self.smoothed):
            if not math.isfinite(loss) or loss > 4 * best:
                self.stop = i
                break
            best = min(best, loss)

    @property
    def suggestion(self) -> float | None:
        """The rate where the loss falls fastest (per log-rate) before it diverged, read on a
        centred moving average of the losses (no lag, unlike the EMA); None when the curve is
        too short to tell."""
        n = self.stop
        if n < 5:
            return None
        half = max(1, n // 40)
        window = [
            sum(self.losses[max(0, i - half) : i + half + 1])
            / len(self.losses[max(0, i - half) : i + half + 1])
            for i in range(n)
        ]
        logs = [math.log10(lr) for lr in self.lrs[:n]]
        slopes = [(window[i + 1] - window[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, n - 1)]
        steepest = min(range(len(slopes)), key=slopes.__getitem__)
        return self.lrs[steepest + 1]

    def plot(self, path: str | None = None) -> Any:
        """The smoothed loss against the rate (log scale), the suggestion marked; needs
        matplotlib. Returns the Figure; saves it as a PNG when ``path`` is given."""
        plt = pyplot(path, "LRFinder.plot()")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs[: self.stop], self.smoothed[: self.stop], label="loss (smoothed)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        if self.suggestion is not None:
            ax.axvline(
                self.suggestion, color="red", linestyle="--", label=f"suggestion {self.suggestion:.2e}"
            )
        ax.legend()
        return finish_figure(plt, fig, path)

    def __repr__(self) -> str:
        shown = "none" if self.suggestion is None else f"{self.suggestion:.3g}"
        span = f"{self.lrs[0]:.3g} to {self.lrs[-1]:.3g}"
        return f"LRFinder({len(self.lrs)} rates from {span}, suggestion={shown})"


class _Sweep(Callback):
    """Sets every optimizer's learning rate before each step, and keeps each batch's loss
    (detached: no sync per step)."""

    weight = float("-inf")

    def __init__(self, lrs: list[float]) -> None:
        self.lrs = lrs
        self.used: list[float] = []  # the rate of each batch (one per window under accumulation)
        self.losses: list[torch.Tensor] = []

    def on_train_batch_begin(self, ctx: Context) -> None:
        lr = self.lrs[min(ctx.step, len(self.lrs) - 1)]  # ctx.step: the optimizer steps taken
        for opt in ctx.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr
        self.used.append(lr)

    def on_train_batch_after_loss(self, ctx: Context) -> None:
        self.losses.append(ctx.loss.detach())


def lr_finder(
    trainer: Any,
    data: Any,
    start_lr: float = 1e-7,
    end_lr: float = 1e-1,
    steps: int = 100,
    *,
    batch_size: int | None = None,
    smoothing: float = 0.05,
) -> LRFinder:
    """Train ``steps`` batches of ``data`` with the learning rate growing geometrically from
    ``start_lr`` to ``end_lr`` (the range test of Smith, as in fastai and Lightning), and
    return the curve. The trainer's model, optimizers, GradScaler, history and every RNG are
    left exactly as they were (copies are taken before, and put back after, in every outcome).

    Example:
        >>> finder = corolux.lr_finder(trainer, (x, y), steps=100)     # doctest: +SKIP
        >>> finder.suggestion                                          # doctest: +SKIP
        0.0031
        >>> finder.plot("lr.png")                                      # doctest: +SKIP
    """
    if not (
        isinstance(start_lr, (int, float)) and isinstance(end_lr, (int, float)) and 0 < start_lr < end_lr
    ):
        raise ValueError(
            f"lr_finder: needs 0 < start_lr < end_lr, got start_lr={start_lr!r}, end_lr={end_lr!r}"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"lr_finder: steps must be an integer >= 2, got {steps!r}")
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"lr_finder sweeps the rate of one optimizer; this trainer has {len(trainer.optimizers)} "
            f"({list(trainer.optimizers)}): build a trainer with the one to tune"
        )
    ratio = end_lr / start_lr
    lrs = [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]
    sweep = _Sweep(lrs)
    with trainer.preserving_state():
        trainer.progress = False
        trainer.fit(data, epochs=steps, max_steps=steps, batch_size=batch_size, callbacks=[sweep])
        losses = [float(loss) for loss in sweep.losses]  # sync-ok: once, after the sweep
    return LRFinder(sweep.used[: len(losses)], losses, smoothing)


def _smooth(values: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average, as fastai's recorder smooths its losses."""
    out, average = [], 0.0
    beta = 1 - smoothing
    for i, value in enumerate(values, start=1):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta**i))
    return out
