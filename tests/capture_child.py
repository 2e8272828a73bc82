"""The run of tests/callbacks/test_capture_anomaly.py, and its child process.

A 64-32-10 MLP with dropout trains with Adam on 320 digits in shuffled batches of 32, one
sample of which is poisoned (1e38 in every feature): the loss stays finite for a while, then
turns NaN at a batch that the dropout masks and the weights decide (epoch 3, batch 8 here).

``python capture_child.py replay PATH``
    In a new process: build the same trainer, ``Stepper.from_capture(trainer, PATH)``, step to
    ``on_train_batch_after_loss`` and print the ``seen`` line of that batch.
"""

from __future__ import annotations

import sys

import torch
from realdata import adam_trainer, dropout_mlp
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import corolux

F = torch.nn.functional


def make_trainer() -> corolux.Trainer:
    return adam_trainer(dropout_mlp())


def loader() -> DataLoader:
    digits = load_digits()
    x = torch.tensor(digits.data[:320], dtype=torch.float32) / 16
    x[5] = 1e38  # finite, but it overflows once the weights have grown
    y = torch.tensor(digits.target[:320])
    return DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )


def seen(ctx: corolux.Context) -> str:
    """Where the batch is, its loss and the sum of its finite predictions (which the dropout
    masks decide), as exact text."""
    pred = ctx.pred.detach()
    finite = pred[torch.isfinite(pred).all(dim=1)]
    return f"seen {ctx.epoch} {ctx.iter} {float(ctx.loss.detach())!r} {float(finite.sum())!r}"


class Seen(corolux.Callback):
    """Records :func:`seen` at every training batch's ``on_train_batch_after_loss``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_train_batch_after_loss(self, ctx: corolux.Context) -> None:
        self.lines.append(seen(ctx))


def replay(path: str) -> None:
    s = corolux.Stepper.from_capture(make_trainer(), path)
    event = s.until("on_train_batch_after_loss")
    print(seen(event.ctx), flush=True)
    s.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["replay"] or len(sys.argv) != 3:
        sys.exit("usage: python capture_child.py replay PATH")
    replay(sys.argv[2])
