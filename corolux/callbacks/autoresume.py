"""AutoResume: a training that was killed continues where it stopped when run again."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from corolux import checkpoint
from corolux.callback import Callback
from corolux.context import Context

__all__ = ["AutoResume"]

#: The stop reasons after which training is done and the file goes (DESIGN section 8): it ran
#: to its end, or early stopping ended it.
_DONE = (None, "early_stopping")


class AutoResume(Callback):
    """Save the training state to ``path`` as training goes, and continue from it when the
    same script runs again: run it in a loop, under a scheduler that re-queues killed jobs,
    or after a crash, and no epoch is lost and the continuation is bit-identical.

    - If ``path`` exists when a fit starts, the run restores it (model, optimizers,
      GradScaler, counters, history, callbacks' states, RNG) after the callbacks' ``setup``
      and before ``on_fit_begin``, and continues: at the next epoch, or, for a checkpoint
      taken inside an epoch, at its next batch.
    - It saves after every completed epoch, once every ``on_epoch_end`` handler has run
      (weight ``inf`` included: schedulers stepped, early-stopping counters updated), and,
      with ``every_n_steps``, each time ``ctx.step`` reaches a multiple of it, once every
      ``on_train_batch_end`` handler of that batch has run. Writes are atomic: a kill while
      saving leaves the previous file whole.
    - It deletes the file when training is done (all epochs, or early stopping) and keeps it
      after Ctrl-C, a time limit, ``max_steps``, another stop, an exception or a kill.

    It is a resume point, not a model archive: keep the weights you want with
    ``trainer.save_checkpoint`` (or ``ModelCheckpoint``).

    Example:
        >>> trainer.fit(data, epochs=20,                            # doctest: +SKIP
        ...             callbacks=[corolux.callbacks.AutoResume("ckpt/last.pt", every_n_steps=500)])
    """

    weight = float("inf")

    def __init__(self, path: str | os.PathLike[str], every_n_steps: int | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"AutoResume: path must be a file path, got {type(path).__name__}")
        if every_n_steps is not None and (
            not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1
        ):
            raise ValueError(
                f"AutoResume: every_n_steps must be an integer >= 1 or None, got {every_n_steps!r}"
            )
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._saved_step = -1
        self._done = False
        if every_n_steps is not None:  # only then does it listen to every batch
            self.on_train_batch_end = self._batch_end

    def setup(self, ctx: Context) -> None:
        if ctx.kind != "fit":
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._saved_step = -1
        self._done = False
        if self.path.exists():
            if ctx.resume_from is not None:
                raise ValueError(
                    f"AutoResume({str(self.path)!r}) found its file, and fit() was also given "
                    "resume_from=...: pass one of them"
                )
            state = checkpoint.read(self.path)
            try:
                checkpoint.check_weights(ctx, state)
            except checkpoint.CheckpointError as exc:
                raise checkpoint.CheckpointError(
                    f"{exc}. It is AutoResume's file: to start afresh, delete it or give AutoResume "
                    "another path"
                ) from None
            ctx.resume_from = state
            # Saved after early stopping ended training, killed before its file was deleted:
            # training is done, so the run ends at once (and the file goes).
            self._done = state["counters"].get("stop_reason") == "early_stopping"

    def on_fit_begin(self, ctx: Context) -> None:
        if self._done:
            ctx.stop_training("early_stopping")

    def on_epoch_end(self, ctx: Context) -> None:
        if ctx.completed_epochs == ctx.epoch:  # a completed epoch (one cut short is not saved)
            ctx.after_stage(self._save)

    def _batch_end(self, ctx: Context) -> None:
        step = ctx.step
        due = step and step % self.every_n_steps == 0 and step != self._saved_step  # type: ignore[operator]
        # Never inside a gradient-accumulation window: its gradients would not be saved.
        if due and (ctx.accumulate_steps == 1 or not ctx.gradients_pending):
            ctx.after_stage(self._save)

    def _save(self, ctx: Context) -> None:
        self._saved_step = ctx.step
        checkpoint.save(ctx, self.path)  # under DDP on every rank: each one's RNG goes in; rank 0 writes

    def on_fit_end(self, ctx: Context) -> None:
        if ctx.history.stop_reason in _DONE and ctx.is_main_process:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __repr__(self) -> str:
        every = "" if self.every_n_steps is None else f", every_n_steps={self.every_n_steps}"
        return f"AutoResume({str(self.path)!r}{every})"
