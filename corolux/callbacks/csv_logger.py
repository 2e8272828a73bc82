"""CSVLogger: the history as a CSV file, one row per epoch and phase, appended as training goes."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from corolux.callback import Callback
from corolux.context import Context

__all__ = ["CSVLogger"]

_PHASES = ("train", "valid")
_KEYS = ["epoch", "phase"]


class CSVLogger(Callback):
    """Write the epoch metrics to a CSV file: columns ``epoch``, ``phase``, then one per
    metric; one row per epoch and phase.

    ``history["train_loss"]`` goes to the ``loss`` column of the epoch's ``train`` row,
    ``valid_acc`` to the ``acc`` column of its ``valid`` row. A name without a phase
    prefix (``ctx.log("lr", ...)``) keeps its name and goes into the ``train`` row. A phase
    that did not run in an epoch (validation skipped, or none given) has no row there.

    - Each epoch's rows are appended and flushed at ``on_epoch_end``; the file is never
      rewritten per epoch. When a metric appears that the header lacks, the file is rewritten
      once, atomically (a temporary file in the same folder, ``fsync``, ``os.replace``), with
      the widened header: earlier rows get empty cells.
    - A fresh run (no epoch completed yet) starts a new file. A resumed run
      (``fit(..., resume_from=...)``, ``AutoResume``) keeps the rows of the epochs already
      completed and appends after them; rows of later epochs, which a killed run may have
      left, are dropped (atomically). A resumed run whose file is gone writes the completed
      epochs' rows again from the history.
    - Rank 0 only (``ctx.is_main_process``); missing folders are created.

    Weight 50: after callbacks at the default weight 0 that ``ctx.log`` at ``on_epoch_end``
    (they appear in the same epoch's row), before the ``ProgressBar`` (100) and
    ``EarlyStopping`` and ``AutoResume`` (``inf``), so an epoch's rows are on disk before
    training stops after it or a checkpoint records it.

    Args:
        path: the CSV file to write (its folder is created when missing).

    Raises:
        TypeError: ``path`` is not a path.
        ValueError: ``path`` is a folder; on resume, the file exists but is not a CSVLogger
            file (its header does not start with ``epoch,phase``).

    Example:
        >>> from corolux.callbacks.csv_logger import CSVLogger
        >>> history = trainer.fit(data, epochs=3, valid_data=0.2,  # doctest: +SKIP
        ...                       callbacks=[CSVLogger("logs/metrics.csv")])
        >>> print(open("logs/metrics.csv").read())  # doctest: +SKIP
        epoch,phase,loss,acc
        1,train,1.0132,0.6204
        1,valid,0.7713,0.7917
        ...
    """

    weight = 50.0

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                f"CSVLogger: path must be a file path (str or os.PathLike), got {type(path).__name__} "
                f"{path!r}; e.g. CSVLogger('logs/metrics.csv')"
            )
        self.path = Path(path)
        self._torn = False  # the file read on resume ended in a torn line
        if self.path.is_dir():
            raise ValueError(
                f"CSVLogger: path {str(self.path)!r} is a folder; give a file name inside it, e.g. "
                f"CSVLogger({str(self.path / 'metrics.csv')!r})"
            )
        #: The header: ``epoch``, ``phase``, then the metric names in first-seen order.
        self.columns: list[str] = []
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._active = False
        self._header_written = False
        self._warned: set[str] = set()

    # -- the run -----------------------------------------------------------------------------

    def on_fit_begin(self, ctx: Context) -> None:
        # After the restore of a checkpoint: ctx.completed_epochs says what is already done.
        self._close()
        self.columns = []
        self._active = ctx.is_main_process
        if not self._active:
            return
        if self.path.is_dir():
            raise ValueError(f"CSVLogger: path {str(self.path)!r} is a folder; give a file name inside it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        done = ctx.completed_epochs
        if done == 0:  # a fresh run: a new file (its header comes with the first rows)
            self._open("w")
            return
        if self.path.exists() and self.path.stat().st_size:
            columns, rows = self._read()
            kept = [row for row in rows if _epoch_of(row) <= done]
            self.columns = columns
            if len(kept) != len(rows) or self._torn:  # rows the checkpoint does not have
                self._rewrite(kept)
        else:  # the file is gone: the completed epochs' rows again, from the history
            rows = [
                r for record in ctx.history.records if record["epoch"] <= done for r in self._rows(record)
            ]
            self._widen(rows)
            self._rewrite(rows)
        self._open("a")

    def on_epoch_end(self, ctx: Context) -> None:
        if not self._active:
            return
        rows = self._rows(ctx.metrics)  # keyed as the history, "epoch" included, at this weight
        if not rows:
            return
        if not self._widen(rows):
            self._writer.writerows(rows)
        elif not self._header_written:  # the first rows of a new file
            assert self._file is not None  # opened at on_fit_begin
            self._writer = csv.DictWriter(self._file, self.columns, restval="")
            self._writer.writeheader()
            self._writer.writerows(rows)
            self._header_written = True
        else:  # a new metric: the file is rewritten once, with the wider header
            self._close()
            _, old = self._read() if self.path.exists() else ([], [])
            self._rewrite(old + rows)
            self._open("a")
        assert self._file is not None
        self._file.flush()

    def teardown(self, ctx: Context) -> None:
        self._close()
        self._active = False

    # -- rows --------------------------------------------------------------------------------

    def _rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The epoch's rows: one per phase that recorded a value, metric names without their
        phase prefix; names without one go into the train row."""
        by_phase: dict[str, dict[str, Any]] = {phase: {} for phase in _PHASES}
        bare: dict[str, Any] = {}
        for key, value in record.items():
            if key == "epoch":
                continue
            phase, sep, name = key.partition("_")
            if sep and name and phase in by_phase:
                by_phase[phase][name] = _cell(value)
            else:
                bare[key] = _cell(value)
        train = by_phase["train"]
        for key, value in bare.items():
            if key in train:
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(
                        f"CSVLogger: the logged value {key!r} has the name of the train_{key} metric's "
                        f"column; it is left out of the file (log it under another name)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                continue
            train[key] = value
        epoch = record["epoch"]
        return [{"epoch": epoch, "phase": phase, **cells} for phase, cells in by_phase.items() if cells]

    def _widen(self, rows: Iterable[Mapping[str, Any]]) -> bool:
        """Add the rows' new metric names to the header; True when there were any."""
        columns = list(self.columns or _KEYS)
        for row in rows:
            columns.extend(name for name in row if name not in columns)
        widened = columns != self.columns
        self.columns = columns
        return widened

    # -- the file ----------------------------------------------------------------------------

    def _open(self, mode: str) -> None:
        self._file = open(self.path, mode, newline="", encoding="utf-8")  # noqa: SIM115 (held across epochs)
        self._writer = csv.DictWriter(self._file, self.columns, restval="")
        self._header_written = mode == "a"  # appending: the file has its header

    def _close(self) -> None:
        file, self._file, self._writer = self._file, None, None
        if file is not None:
            file.close()

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        with open(self.path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            columns = list(reader.fieldnames or [])
            if columns[:2] != _KEYS:
                raise ValueError(
                    f"CSVLogger: {str(self.path)!r} exists but is not a CSVLogger file (its header is "
                    f"{columns[:4]!r}..., not 'epoch,phase,...'), so resuming cannot append to it; "
                    "move it away or give another path"
                )
            rows = list(reader)
        with open(self.path, "rb") as raw:  # a last line without its newline: a kill while writing
            raw.seek(-1, os.SEEK_END)
            torn = raw.read(1) != b"\n"
        if torn and rows:
            rows.pop()  # dropped: the file is rewritten without it
        self._torn = torn
        return columns, rows

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Write the header and ``rows`` to ``path`` atomically: a crash leaves the old file."""
        folder = self.path.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, self.columns, restval="")
                writer.writeheader()
                writer.writerows(rows)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def __repr__(self) -> str:
        return f"CSVLogger({str(self.path)!r})"


def _epoch_of(row: Mapping[str, str]) -> float:
    try:
        epoch = int(row["epoch"])
    except (TypeError, ValueError):
        return math.inf  # a torn line (a kill while writing): dropped
    return epoch if row.get("phase") in _PHASES else math.inf


def _cell(value: Any) -> Any:
    """A history value as a cell: floats at full precision (``repr``), None as empty."""
    return "" if value is None else value
