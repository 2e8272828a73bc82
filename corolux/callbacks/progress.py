"""ProgressBar: tqdm bars for the train, valid and predict phases, or one line per epoch
where the output is not a terminal."""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
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


def _interactive(file: IO[str] | None) -> bool:
    if file is None:
        return attached_to_terminal()
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):
        return False


STYLES = ("auto", "bar", "line")


class ProgressBar(Callback):
    """Show a bar per phase with the epoch counter and the running loss; where the output is
    not a terminal (a log file, CI, ``nohup``), one plain line per epoch instead.

    ``style="bar"``: the epoch's train bar stays open while validation runs below it, then
    ends with the epoch's metrics (``loss``, ``acc``, ``valid_loss``, ``valid_acc``); when they
    do not fit the terminal's width they are printed below the bar, wrapped, never cut. The bar
    reads the loss (a host-device sync) at most ``refresh_per_second`` times per second, never
    once per step; in a notebook it is one widget that updates in place (``tqdm.auto``).
    ``style="line"``: ``Epoch 3/10 - 1.2s - train_loss: 0.4123 - valid_loss: 0.4551 ...``, one
    line per epoch (and per ``evaluate``/``predict``), flushed, as Keras's ``verbose=2``; it does
    not listen to batches at all. ``"auto"`` picks bars in a terminal or a notebook, lines
    elsewhere.

    A default callback (weight 100, after user callbacks); pass ``ProgressBar(...)`` in
    ``callbacks`` to change it, ``Trainer(progress=False)`` to drop it
    (``progress=True`` forces bars).

    Args:
        leave: keep each epoch's finished bar on screen.
        file: where to write (default ``sys.stderr``).
        refresh_per_second: how often the bar and its loss are updated.
        style: ``"auto"``, ``"bar"`` or ``"line"``.

    Example:
        >>> trainer.fit(data, epochs=3, callbacks=[ProgressBar(style="line")])  # doctest: +SKIP
        Epoch 1/3 - 0.4s - train_loss: 1.0321 - train_acc: 0.6133
    """

    def __init__(
        self,
        leave: bool = True,
        file: IO[str] | None = None,
        refresh_per_second: float = 4.0,
        style: str = "auto",
    ) -> None:
        if refresh_per_second <= 0:
            raise ValueError(f"refresh_per_second must be > 0, got {refresh_per_second!r}")
        if style not in STYLES:
            raise ValueError(f"ProgressBar: style must be one of {STYLES}, got {style!r}")
        self.leave = leave
        self.file = file
        self.style = style if style != "auto" else ("bar" if _interactive(file) else "line")
        if self.style == "bar":  # only bars listen to batches
            self.on_train_batch_end = self.on_valid_batch_end = self.on_predict_batch_end = self._batch_end
        self._started = 0.0
        self.interval = 1.0 / refresh_per_second
        self.bars: dict[str, Any] = {}  # phase -> its open tqdm bar
        self.bar: Any = None  # the bar of the running phase
        self._next_refresh = 0.0
        self._loss = math.nan
        self._pending_lines: list[str] = []  # the metrics that did not fit beside the bar

    def _open(self, ctx: Context, phase: str) -> None:
        if self.style == "line":
            if phase != "valid" or ctx.kind != "fit":  # an epoch, an evaluate or a predict starts
                self._started = time.perf_counter()
            return
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
        if self.style == "line":
            if ctx.kind != "fit":
                what = "evaluate" if phase == "valid" else "predict"
                self._line(ctx, f"{what}: {ctx.iter} batches", (phase,))
            return
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

    def _show_metrics(self, bar: Any, ctx: Context, phases: tuple[str, ...]) -> None:
        shown = _metrics(ctx, phases)
        if not shown:
            return
        text = ", ".join(f"{k}={v}" for k, v in shown.items())
        width = self._width(bar)
        # tqdm cuts what does not fit the line: then the metrics go below the bar, wrapped
        if width and len(str(bar.desc)) + len(text) + 40 > width:
            bar.set_postfix_str("", refresh=True)
            self._pending_lines = textwrap.wrap(text, width=max(width - 2, 20), subsequent_indent="  ")
        else:
            bar.set_postfix({k: v for k, v in shown.items()}, refresh=True)

    def _width(self, bar: Any) -> int:
        """The width of the bar's line, 0 when unknown (a file: nothing is cut there)."""
        return getattr(bar, "ncols", None) or (
            shutil.get_terminal_size().columns if _interactive(self.file) else 0
        )

    def _line(self, ctx: Context, head: str, phases: tuple[str, ...]) -> None:
        if not ctx.is_main_process:
            return
        seconds = time.perf_counter() - self._started
        parts = [head, f"{seconds:.1f}s"] + [f"{k}: {v}" for k, v in _metrics(ctx, phases, full=True).items()]
        file = self.file if self.file is not None else sys.stderr
        print(" - ".join(parts), file=file, flush=True)

    def _close(self, phase: str | None = None) -> None:
        for name in [phase] if phase is not None else list(self.bars):
            bar = self.bars.pop(name, None)
            if bar is not None:
                bar.close()
                lines, self._pending_lines = self._pending_lines, []
                for line in lines:
                    bar.write(line, file=self.file)

    def on_train_begin(self, ctx: Context) -> None:
        self._open(ctx, "train")

    def on_train_end(self, ctx: Context) -> None:
        self._end(ctx, "train")

    def on_valid_begin(self, ctx: Context) -> None:
        self._open(ctx, "valid")

    def on_valid_end(self, ctx: Context) -> None:
        self._end(ctx, "valid")

    def on_epoch_end(self, ctx: Context) -> None:
        if self.style == "line":
            self._line(ctx, f"Epoch {ctx.epoch}/{ctx.max_epochs}", ("train", "valid"))
        self._close()

    def on_predict_begin(self, ctx: Context) -> None:
        self._open(ctx, "predict")

    def on_predict_end(self, ctx: Context) -> None:
        self._end(ctx, "predict")

    def teardown(self, ctx: Context) -> None:
        self._close()
        self.bar = None

    def __repr__(self) -> str:
        return f"ProgressBar(leave={self.leave}, style={self.style!r})"


def _metrics(ctx: Context, phases: tuple[str, ...], full: bool = False) -> dict[str, str]:
    """The epoch's values of ``phases`` to show: the first phase's without its prefix (unless
    ``full``), the others' with it, then what callbacks logged."""
    shown = {}
    for key, value in ctx.metrics.items():
        phase, _, name = key.partition("_")
        if key == "epoch" or not isinstance(value, float):
            continue
        if phase in phases:
            shown[name if phase == phases[0] and not full else key] = f"{value:.4g}"
        elif phase not in ("train", "valid"):
            shown[key] = f"{value:.4g}"
    return shown
