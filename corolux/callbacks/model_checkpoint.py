"""ModelCheckpoint: write a checkpoint file at epoch ends (every epoch, or the best ones)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import string
from pathlib import Path
from typing import Any

from corolux import checkpoint
from corolux._suggest import did_you_mean
from corolux.callback import Callback
from corolux.callbacks.monitor import Monitor, available, describe
from corolux.context import Context

__all__ = ["ModelCheckpoint"]

#: The file name inside a folder given as ``path``.
FOLDER_TEMPLATE = "epoch{epoch:03d}.pt"


class ModelCheckpoint(Callback):
    """Write a checkpoint at the end of every epoch, or only of those where ``monitor``
    improved (``save_best_only=True``).

    Each file is a full corolux checkpoint written by ``corolux.checkpoint.save``: atomic (a
    crash while writing leaves no half file), readable with ``torch.load(path,
    weights_only=True)``, loadable with ``trainer.load_checkpoint(path)`` (weights) or
    ``fit(..., resume_from=path)`` (the whole training state).

    ``path`` is either

    - a template formatted with ``epoch`` and the epoch's metrics, e.g.
      ``"ckpt/epoch{epoch:02d}-{valid_loss:.3f}.pt"`` (a metric that was not produced this
      epoch, such as ``valid_loss`` when validation was skipped, formats as ``nan``); a name
      the run does not record fails at the first save, listing the names it does; or
    - an existing folder, or a path ending in ``/``: files are ``epoch{epoch:03d}.pt`` in it
      (a ``pathlib.Path`` drops a trailing ``/``: create the folder first, or pass a string).

    Missing folders are created. A template without fields (``"best.pt"``) is overwritten at
    each save.

    - The save happens once every ``on_epoch_end`` handler has run (``ctx.after_stage``), so
      the file holds the state they left: schedulers stepped, EarlyStopping's count updated.
      Weight 0 (after ``MetricsTracker``'s -100); the weight does not move the save.
    - Epochs cut short by a stop are not saved (their metrics are partial).
    - ``keep_last=N``: once a new file is safely written, the files this callback wrote
      beyond the N newest are deleted (never a file it did not write, never before the new
      one is written).
    - Under DDP it runs on every rank (each one's RNG state goes into the file) and only the
      main process writes and deletes files (``ctx.is_main_process``).
    - Its state (best value, files written) goes into checkpoints, so a resumed run goes on
      counting and deleting as an uninterrupted one.

    With ``save_best_only=False`` the monitor only tracks :attr:`best` and :attr:`best_path`;
    without validation data the default ``"valid_loss"`` is then simply not tracked.

    Args:
        path: a file-name template or a folder (see above).
        monitor: the history name whose improvement ``save_best_only`` waits for.
        save_best_only: write only when ``monitor`` improves (the first value always does).
        mode: ``"min"``, ``"max"``, or ``"auto"`` (the metric's ``higher_is_better``).
        min_delta: how much a value must beat the best by to count as an improvement (>= 0).
        keep_last: keep only the N newest files written, or None to keep them all.

    Example:
        >>> ModelCheckpoint("ckpt/").template      # a folder: numbered files in it
        'ckpt/epoch{epoch:03d}.pt'
        >>> ckpt = ModelCheckpoint("ckpt/epoch{epoch:02d}-{valid_loss:.3f}.pt", save_best_only=True)
        >>> history = trainer.fit(data, epochs=10, valid_data=0.2, callbacks=[ckpt])  # doctest: +SKIP
        >>> trainer.load_checkpoint(ckpt.best_path)                                  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        monitor: str = "valid_loss",
        save_best_only: bool = False,
        mode: str = "auto",
        min_delta: float = 0,
        keep_last: int | None = None,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                "ModelCheckpoint: path must be a file-name template such as "
                f"'ckpt/epoch{{epoch:02d}}.pt' or a folder, got {type(path).__name__} {path!r}"
            )
        if not isinstance(save_best_only, bool):
            raise TypeError(f"ModelCheckpoint: save_best_only must be True or False, got {save_best_only!r}")
        if keep_last is not None and (
            not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1
        ):
            raise ValueError(f"ModelCheckpoint: keep_last must be an integer >= 1 or None, got {keep_last!r}")
        text = os.fspath(path)
        if not text:
            raise ValueError("ModelCheckpoint: path is empty; give a file-name template or a folder")
        if text.endswith(("/", os.sep)) or os.path.isdir(text):
            text = os.path.join(text, FOLDER_TEMPLATE)
        self.template = text
        self._fields = _fields(text)
        self._pattern = _pattern(text)
        self.monitor = Monitor(monitor, mode=mode, min_delta=min_delta, owner="ModelCheckpoint")
        self.save_best_only = save_best_only
        self.keep_last = keep_last
        #: The best monitored value, or None.
        self.best: float | None = None
        #: The file written at the best epoch, or None (also when ``keep_last`` deleted it).
        self.best_path: str | None = None
        #: The files written and not deleted, oldest first.
        self.files: list[str] = []

    @property
    def state_key(self) -> str:
        """What its saved state is matched by: two ModelCheckpoints of other monitors never
        take each other's state, in whatever order they are given (the path may change on a
        resume; files of another path are never deleted)."""
        best = "best" if self.save_best_only else "all"
        return f"ModelCheckpoint[{self.monitor.name}|{best}]"

    @property
    def last_path(self) -> str | None:
        """The newest file written, or None."""
        return self.files[-1] if self.files else None

    def setup(self, ctx: Context) -> None:
        self.best, self.best_path, self.files = None, None, []  # a checkpoint may restore them

    def on_epoch_end(self, ctx: Context) -> None:
        if ctx.completed_epochs == ctx.epoch:  # an epoch cut short is not saved
            ctx.after_stage(self._save)

    def _save(self, ctx: Context) -> None:
        value = self._value(ctx)
        improved = value is not None and self.monitor.improves(value, self.best)
        if self.save_best_only and not improved:
            return
        target = self._path(ctx)
        if ctx.is_main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
        name = str(target)
        before = (self.files, self.best, self.best_path)
        files = [f for f in self.files if f != name] + [name]
        stale = files[: -self.keep_last] if self.keep_last is not None else []
        # The state the new file holds is the state after this save: it lists the new file
        # and not those about to be deleted (put back if the write fails).
        self.files = files[len(stale) :]
        if improved:
            self.best, self.best_path = value, name
        if self.best_path in stale:
            self.best_path = None
        try:
            checkpoint.save(ctx, target)
        except BaseException:
            self.files, self.best, self.best_path = before
            raise
        for old in stale if ctx.is_main_process else ():  # only now that the new file is whole
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)

    def _value(self, ctx: Context) -> float | None:
        if not self.save_best_only and self.monitor.name == "valid_loss" and ctx.valid_data is None:
            return None  # the default monitor of a run without validation: not tracked
        return self.monitor.value(ctx)

    def _path(self, ctx: Context) -> Path:
        values: dict[str, Any] = {}
        if self._fields:
            values = {name: math.nan for name in available(ctx)}
            values.update({k: v for k, v in ctx.metrics.items() if v is not None})
            values["epoch"] = ctx.epoch
            unknown = [name for name in self._fields if name not in values]
            if unknown:
                names = sorted(values)
                raise ValueError(
                    f"ModelCheckpoint: the path template {self.template!r} names {unknown[0]!r}, which "
                    f"this run does not record;{did_you_mean(unknown[0], names) or ''} "
                    f"available: {', '.join(names)}"
                )
        try:
            return Path(self.template.format_map(values))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise ValueError(
                f"ModelCheckpoint: cannot format the path template {self.template!r} at epoch "
                f"{ctx.epoch}: {exc} (values: {', '.join(f'{k}={values[k]!r}' for k in self._fields)})"
            ) from None

    def state_dict(self) -> dict[str, Any]:
        """The best value, the best file and the files written (oldest first)."""
        return {"best": self.best, "best_path": self.best_path, "files": list(self.files)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best = state["best"]
        # Only files of this callback's own path are kept (and so ever deleted by keep_last):
        # never one a run with another path wrote, such as the checkpoint resumed from.
        self.files = [str(f) for f in state["files"] if self._pattern.fullmatch(str(f))]
        best_path = state.get("best_path")
        self.best_path = best_path if best_path in self.files else None

    def __repr__(self) -> str:
        best_only = ", save_best_only=True" if self.save_best_only else ""
        keep = "" if self.keep_last is None else f", keep_last={self.keep_last}"
        return (
            f"ModelCheckpoint({self.template!r}, monitor={self.monitor.name!r}{best_only}{keep}, "
            f"best={describe(self.best)})"
        )


def _fields(template: str) -> tuple[str, ...]:
    """The names a path template formats (``{valid_loss:.3f}`` -> ``valid_loss``).

    Raises:
        ValueError: a malformed template, or a positional field (``{}``, ``{0}``).
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(
            f"ModelCheckpoint: the path template {template!r} is malformed ({exc}); fields are "
            "written {epoch:02d} or {valid_loss:.3f}, a literal brace is doubled ({{ or }})"
        ) from None
    names: dict[str, None] = {}
    for _, field, _, _ in parsed:
        if field is None:
            continue
        root = field.split(".", 1)[0].split("[", 1)[0]
        if not root or root.isdigit():
            raise ValueError(
                f"ModelCheckpoint: the path template {template!r} has a positional field "
                f"{{{field}}}; name what goes there, e.g. {{epoch:02d}} or {{valid_loss:.3f}}"
            )
        names[root] = None
    return tuple(names)


def _pattern(template: str) -> re.Pattern[str]:
    """A regex that the paths formatted from ``template`` match (each field: anything)."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".*?")
    return re.compile("".join(parts))
