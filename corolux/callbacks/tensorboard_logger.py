"""TensorBoardLogger: the epoch metrics (and optionally parameter histograms) as TensorBoard events."""

from __future__ import annotations

import numbers
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from corolux._suggest import did_you_mean
from corolux.callback import Callback
from corolux.context import Context

__all__ = ["TensorBoardLogger"]

_PHASES = ("train", "valid")


def _summary_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "TensorBoardLogger needs the tensorboard package: pip install tensorboard "
            "(or pip install 'corolux[tensorboard]')"
        ) from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Write each epoch's metrics to TensorBoard event files in ``logdir``.

    At ``on_epoch_end``, every value of the epoch's record becomes a scalar at step
    ``epoch``, tagged by phase: ``train_loss`` as ``train/loss``, ``valid_acc`` as
    ``valid/acc``; a name without a phase prefix (``ctx.log("lr", ...)``) keeps its name.
    With ``histograms``, the model's parameters are also written as histograms
    (``params/<name>``) once per epoch (one device-to-host copy per parameter per epoch).
    Events are flushed every epoch, and the writer is closed at teardown in every outcome.

    A run writes its events from epoch ``ctx.completed_epochs + 1`` on and purges the ones
    an earlier run left in ``logdir`` from that epoch on (``SummaryWriter(purge_step=...)``):
    a resumed run continues its curves without the duplicates of the epoch a kill cut short,
    and a fresh run in the same ``logdir`` replaces the old curves rather than drawing over
    them (give each experiment its own ``logdir`` to compare them).

    Needs the optional ``tensorboard`` package (``pip install 'corolux[tensorboard]'``),
    imported when the run starts. Rank 0 only (``ctx.is_main_process``). Weight 50, as the
    ``CSVLogger``: after callbacks at 0 that ``ctx.log`` at ``on_epoch_end``, before
    ``EarlyStopping`` (``inf``).

    Args:
        logdir: the folder of the event files (created when missing).
        histograms: False; True for every parameter; or a collection of parameter names
            (``model.named_parameters()``, e.g. ``{"0.weight"}``).

    Raises:
        TypeError: ``logdir`` is not a path, or ``histograms`` is neither a bool nor names.
        ValueError: at setup, a name in ``histograms`` that is not a parameter of the model.
        ImportError: at setup, when tensorboard is not installed.

    Example:
        >>> from corolux.callbacks.tensorboard_logger import TensorBoardLogger
        >>> trainer.fit(data, epochs=10, valid_data=0.2,  # doctest: +SKIP
        ...             callbacks=[TensorBoardLogger("runs/mlp", histograms=True)])
        >>> # then: tensorboard --logdir runs
    """

    weight = 50.0

    def __init__(self, logdir: str | os.PathLike[str], histograms: bool | Collection[str] = False) -> None:
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(
                f"TensorBoardLogger: logdir must be a folder path (str or os.PathLike), got "
                f"{type(logdir).__name__} {logdir!r}; e.g. TensorBoardLogger('runs/mlp')"
            )
        if isinstance(histograms, str) or not (
            isinstance(histograms, bool)
            or (isinstance(histograms, Collection) and all(isinstance(n, str) for n in histograms))
        ):
            raise TypeError(
                f"TensorBoardLogger: histograms must be True, False or a collection of parameter "
                f"names, got {histograms!r}; e.g. histograms={{'0.weight'}}"
            )
        self.logdir = Path(logdir)
        self.histograms: bool | frozenset[str] = (
            histograms if isinstance(histograms, bool) else frozenset(histograms)
        )
        self._writer_class: Any = None
        self._writer: Any = None

    def setup(self, ctx: Context) -> None:
        if ctx.kind != "fit" or not ctx.is_main_process:
            return
        self._writer_class = _summary_writer()  # fail before training, not at the first epoch's end
        if isinstance(self.histograms, frozenset):
            names = dict(ctx.model.named_parameters())
            unknown = sorted(self.histograms - names.keys())
            if unknown:
                raise ValueError(
                    f"TensorBoardLogger: histograms names {unknown!r}, which the model does not "
                    f"have;{did_you_mean(unknown[0], names) or ''} its parameters: {', '.join(names)}"
                )

    def on_fit_begin(self, ctx: Context) -> None:
        # After the restore of a checkpoint: the run's events start after its completed epochs.
        if self._writer_class is None:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = self._writer_class(log_dir=str(self.logdir), purge_step=ctx.completed_epochs + 1)

    def on_epoch_end(self, ctx: Context) -> None:
        writer = self._writer
        if writer is None:
            return
        epoch = ctx.epoch
        for key, value in ctx.metrics.items():  # keyed as the history, at this weight
            if key == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            phase, sep, name = key.partition("_")
            tag = f"{phase}/{name}" if sep and name and phase in _PHASES else key
            writer.add_scalar(tag, float(value), epoch)
        if self.histograms:  # one device-to-host copy per parameter per epoch (sync-ok)
            chosen = self.histograms
            for name, param in ctx.model.named_parameters():
                if chosen is True or name in chosen:  # type: ignore[operator]
                    writer.add_histogram(f"params/{name}", param.detach().float().cpu(), epoch)
        writer.flush()

    def teardown(self, ctx: Context) -> None:
        writer, self._writer = self._writer, None
        self._writer_class = None
        if writer is not None:
            writer.close()

    def __repr__(self) -> str:
        hist = "" if self.histograms is False else f", histograms={self.histograms!r}"
        return f"TensorBoardLogger({str(self.logdir)!r}{hist})"
