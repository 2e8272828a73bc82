"""A callback that ends training as a kill would, for the resume tests."""

from __future__ import annotations

import corolux


class KillAt(corolux.Callback):
    """Raises ``SystemExit`` at ``on_train_batch_end`` of batch ``batch`` of ``epoch``, after
    every other handler of that stage (weight ``inf``, and last in the list) but before what
    ``ctx.after_stage`` queued there: AutoResume's save of that batch does not happen."""

    weight = float("inf")

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, ctx):
        if (ctx.epoch, ctx.iter) == (self.epoch, self.batch):
            raise SystemExit("killed")
