"""ProgressBar: tqdm bars for the train, valid and predict phases."""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["ProgressBar", "attached_to_terminal"]


def attached_to_terminal() -> bool:
    """True in a terminal or a notebook: where ``progress=None`` shows bars."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class ProgressBar(Callback):
    """Show a bar per phase with the epoch counter and the running loss.

    The epoch's train bar stays open while validation runs below it, then ends with the
    epoch's metrics on one line (``loss``, ``acc``, ``valid_loss``, ``valid_acc``). The bar
    reads the loss (a host-device sync) at most ``refresh_per_second`` times per second,
    never once per step. A default callback (weight 100, after user callbacks); pass
    ``ProgressBar(...)`` in ``callbacks`` to change it, ``Trainer(progress=False)`` to drop it.

    Args:
        leave: keep each epoch's finished bar on screen.
        file: where to write (default ``sys.stderr``).
        refresh_per_second: how often the bar and its loss are updated.
    """

    def __init__(
        self, leave: bool = True, file: IO[str] | None = None, refresh_per_second: float = 4.0
    ) -> None:
        if refresh_per_second <= 0:
            raise ValueError(f"refresh_per_second must be > 0, got {refresh_per_second!r}")
        self.leave = leave
        self.file = file
        self.interval = 1.0 / refresh_per_second
        self.bars: dict[str, Any] = {}  # phase -> its open tqdm bar
        self.bar: Any = None  # the bar of the running phase
        self._next_refresh = 0.0
        self._loss = math.nan

    def _open(self, ctx: Context, phase: str) -> None:
        from tqdm.auto import tqdm

        self._close(phase)
        if not ctx.is_main_process:
            return
        in_epoch = ctx.kind == "fit"
        desc = f"Epoch {ctx.epoch}/{ctx.max_epochs} {phase}" if in_epoch else phase
        # Validation inside an epoch is a transient bar under the epoch's train bar.
        nested = phase == "valid" and "train" in self.bars
        self.bar = self.bars[phase] = tqdm(
            total=ctx.num_batches,
            desc=desc,
            leave=self.leave and not nested,
            file=self.file,
            dynamic_ncols=True,
            mininterval=self.interval,
        )
        self._loss = math.nan
        self._next_refresh = time.perf_counter() + self.interval

    def _batch_end(self, ctx: Context) -> None:
        now = time.perf_counter()
        if now < self._next_refresh or self.bar is None:
            return
        self._next_refresh = now + self.interval
        self.bar.update(ctx.iter - self.bar.n)
        if ctx.loss is not None and not ctx.skipped:
            loss = float(ctx.loss.detach())  # sync-ok: a few times per second at most
            self._loss = loss if math.isnan(self._loss) else 0.9 * self._loss + 0.1 * loss
            self.bar.set_postfix(loss=f"{self._loss:.4g}", refresh=False)

    def _end(self, ctx: Context, phase: str) -> None:
        bar = self.bars.get(phase)
        if bar is None:
            return
        bar.update(ctx.iter - bar.n)
        self.bar = None
        if phase == "valid" and "train" in self.bars:  # the epoch line gets the valid metrics
            self._close(phase)
            self._show_metrics(self.bars["train"], ctx, ("train", "valid"))
            return
        self._show_metrics(bar, ctx, (phase,))
        if phase != "train" or ctx.kind != "fit":
            self._close(phase)
        # An epoch's train bar stays open until on_epoch_end, for the validation metrics.

    @staticmethod
    def _show_metrics(bar: Any, ctx: Context, phases: tuple[str, ...]) -> None:
        shown = {}
        for key, value in ctx.metrics.items():
            phase, _, name = key.partition("_")
            if phase in phases and isinstance(value, float):
                shown[name if phase == phases[0] else key] = f"{value:.4g}"
        if shown:
            bar.set_postfix(shown, refresh=True)

    def _close(self, phase: str | None = None) -> None:
        for name in [phase] if phase is not None else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()

    def on_train_begin(self, ctx: Context) -> None:
        self._open(ctx, "train")

    on_train_batch_end = _batch_end

    def on_train_end(self, ctx: Context) -> None:
        self._end(ctx, "train")

    def on_valid_begin(self, ctx: Context) -> None:
        self._open(ctx, "valid")

    on_valid_batch_end = _batch_end

    def on_valid_end(self, ctx: Context) -> None:
        self._end(ctx, "valid")

    def on_epoch_end(self, ctx: Context) -> None:
        self._close()

    def on_predict_begin(self, ctx: Context) -> None:
        self._open(ctx, "predict")

    on_predict_batch_end = _batch_end

    def on_predict_end(self, ctx: Context) -> None:
        self._end(ctx, "predict")

    def teardown(self, ctx: Context) -> None:
        self._close()
        self.bar = None

    def __repr__(self) -> str:
        return f"ProgressBar(leave={self.leave})"
