"""Anomaly captures: the file ``CaptureAnomaly`` writes, and the run that replays it.

A capture is a corolux checkpoint (``corolux.checkpoint``: written atomically, read with
``weights_only=True``) of the state at the start of the training batch that failed (its
weights, optimizers, GradScaler, counters, history, callbacks' states and the RNG state its
start had), plus a ``"capture"`` entry: the batch as the data gave it (on the CPU), where it
stood (epoch, iter, the number of batches), what was checked and the value found. It is not
a point to continue a run from (``fit(resume_from=...)`` refuses it): the RNG state is that
of the batch's start, after the batch was fetched. ``Stepper.from_capture`` replays it.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from typing import Any

import torch

from corolux.checkpoint import CheckpointError, callback_key, capture, check_weights, read
from corolux.context import Context
from corolux.data import BatchAt, to_device
from corolux.driver import context_of
from corolux.events import Event

__all__ = ["anomaly_state", "describe", "read_capture", "replay_run"]


def anomaly_state(ctx: Context, start: dict[str, Any], check: str, stage: str, value: str) -> dict[str, Any]:
    """The capture of the current training batch, inside it and before its optimizer step:
    the state of its start (``start`` is the ``rng_snapshot()`` taken as it began), and the
    batch, moved to the CPU."""
    state = capture(ctx, batch_start=start)
    batch = to_device(ctx.batch, torch.device("cpu"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # sync-ok: after an anomaly; the batch's copies are done
    state["capture"] = {
        "check": check,
        "stage": stage,
        "value": value,
        "epoch": ctx.epoch,
        "iter": ctx.iter,
        "num_batches": ctx.num_batches,
        "min_epochs": ctx.min_epochs,
        "max_epochs": ctx.max_epochs,
        "optimizer": ctx.opt_name,
        "batch": batch,
    }
    return state


def read_capture(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a capture: its state (a checkpoint's) and its ``"capture"`` entry.

    Raises:
        CheckpointError: not a corolux file, or a checkpoint that is not a capture.
    """
    try:
        state = read(path)
    except CheckpointError as exc:
        raise CheckpointError(f"Stepper.from_capture: {exc}; it replays what CaptureAnomaly wrote") from None
    info = state.get("capture")
    if not isinstance(info, dict):
        raise CheckpointError(
            f"Stepper.from_capture: {str(path)!r} is a corolux checkpoint, not an anomaly capture "
            "(corolux.callbacks.CaptureAnomaly(path) writes those); a checkpoint resumes with "
            "trainer.fit(..., resume_from=path)"
        )
    return state, info


def replay_run(
    trainer: Any, path: str | os.PathLike[str], callbacks: Sequence[Any] | None
) -> tuple[Generator[Event, None, None], dict[str, Any]]:
    """A run of ``trainer`` over the captured batch alone, at its place (a ``BatchAt``),
    resumed from the capture's state, up to the end of the batch's epoch; not started yet.
    Returns it with the capture's entry.

    Raises:
        CheckpointError: see :func:`read_capture`; a capture of another model or optimizers.
    """
    state, info = read_capture(path)
    epoch = info["epoch"]
    data = BatchAt(info["batch"], info["iter"], info["num_batches"])
    events = trainer.run(data, epochs=(min(info["min_epochs"], epoch), epoch), callbacks=callbacks)
    ctx = context_of(events)
    assert ctx is not None  # trainer.run() made it
    try:
        check_weights(ctx, state)
    except BaseException:
        events.close()
        raise
    # The saved states of this run's callbacks only: the failing run may have had more.
    keys = {
        key
        for key, cb in zip(callback_key(ctx.callbacks), ctx.callbacks, strict=True)
        if callable(getattr(cb, "load_state_dict", None))
    }
    ctx.resume_from = dict(state, callbacks={k: v for k, v in state["callbacks"].items() if k in keys})
    return events, info


def describe(path: str | os.PathLike[str], info: dict[str, Any]) -> str:
    """One line saying what a capture holds."""
    total = "?" if info["num_batches"] is None else info["num_batches"]
    value = info["value"]
    what = (
        f"the training loss was {value}" if info["check"] == "loss" else f"{value} had non-finite gradients"
    )
    where = f"epoch {info['epoch']} (of {info['max_epochs']}), batch {info['iter']}/{total}"
    return f"replaying {str(path)!r}: {where}, where {what} ({info['stage']})"
