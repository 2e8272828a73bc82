"""Child process of tests/test_resume_process.py: a training run the test kills and runs again.

``python resume_child.py train DATA OUT [--ckpt PATH] [--every N]``
    Train a small MLP with dropout on scikit-learn's digits (DATA: ``{"x": ..., "y": ...}``,
    written by the parent, which saves this process the import of scikit-learn) through a
    shuffled DataLoader for 4 epochs, with AutoResume(PATH, every_n_steps=N) when PATH is
    given. Prints ``begin <step> <completed_epochs>`` at on_fit_begin, ``batch <epoch> <iter>
    <step>`` after every training batch and ``done`` at the end, each line flushed; writes the
    final model, optimizer and history to OUT (torch.save). With the environment variable
    ``RESUME_CHILD_SLOW_FROM="E I"``, every batch from batch I of epoch E on sleeps 1 s after
    printing its line (before the batch's other handlers and AutoResume's save), so that the
    parent's kill lands there; the command line stays the same for the run that continues.

``python resume_child.py bigsave PATH``
    Build a trainer over a model of ~72 MB of parameters, save a checkpoint to PATH with
    ``trainer.save_checkpoint`` (every parameter filled with 0.0), print ``saved 0``, then
    save version k = 1, 2, ... (every parameter filled with float(k)) in a loop, printing
    ``saved k`` after each, until killed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch

import corolux

EPOCHS = 4
BATCH_SIZE = 32
N_TRAIN = 750  # 24 batches per epoch, the last one of 14 rows
N_VALID = 250


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Report(corolux.Callback):
    """Progress lines for the parent; draws from Python's and NumPy's RNGs (logged in the
    history) so that a resume that did not restore them shows; slows down from a batch on."""

    def __init__(self, slow_from: tuple[int, int] | None) -> None:
        self.slow_from = slow_from

    def on_fit_begin(self, ctx: corolux.Context) -> None:
        say(f"begin {ctx.step} {ctx.completed_epochs}")

    def on_train_batch_end(self, ctx: corolux.Context) -> None:
        ctx.log("py_random", random.random())
        ctx.log("np_random", float(np.random.rand()))
        say(f"batch {ctx.epoch} {ctx.iter} {ctx.step}")
        if self.slow_from is not None and (ctx.epoch, ctx.iter) >= self.slow_from:
            time.sleep(1.0)


class Tally(corolux.Callback):
    """A stateful callback: the running sum of the training losses of the whole run,
    logged each epoch; a resume that lost its state shows in the history."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def on_train_batch_end(self, ctx: corolux.Context) -> None:
        self.total += float(ctx.loss.detach())
        self.count += 1

    def on_epoch_end(self, ctx: corolux.Context) -> None:
        ctx.log("tally_total", self.total)
        ctx.log("tally_count", self.count)

    def state_dict(self) -> dict[str, float | int]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


def loaders(path: str) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    data = torch.load(path, weights_only=True)
    x, y = data["x"], data["y"]
    train = torch.utils.data.TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    valid = torch.utils.data.TensorDataset(x[N_TRAIN : N_TRAIN + N_VALID], y[N_TRAIN : N_TRAIN + N_VALID])
    return (
        torch.utils.data.DataLoader(train, batch_size=BATCH_SIZE, shuffle=True),
        torch.utils.data.DataLoader(valid, batch_size=64),
    )


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    train_data, valid_data = loaders(args.data)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(64, 10),
    )
    trainer = corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        device="cpu",
        progress=False,
        metrics=[corolux.metrics.Accuracy()],
    )
    slow = os.environ.get("RESUME_CHILD_SLOW_FROM")
    slow_from = (int(slow.split()[0]), int(slow.split()[1])) if slow else None
    callbacks: list[corolux.Callback] = [Report(slow_from), Tally()]
    if args.ckpt is not None:
        callbacks.append(corolux.callbacks.AutoResume(args.ckpt, every_n_steps=args.every))
    history = trainer.fit(train_data, epochs=EPOCHS, valid_data=valid_data, callbacks=callbacks)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": next(iter(trainer.optimizers.values())).state_dict(),
            "history": history.to_dict(),
            "stop_reason": history.stop_reason,
        },
        args.out,
    )
    say("done")


def bigsave(args: argparse.Namespace) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3000, 3000), torch.nn.Linear(3000, 3000))
    trainer = corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )
    version = 0
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(version))
        trainer.save_checkpoint(args.path)
        say(f"saved {version}")
        version += 1


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train")
    p_train.add_argument("data")
    p_train.add_argument("out")
    p_train.add_argument("--ckpt", default=None)
    p_train.add_argument("--every", type=int, default=None)
    p_big = sub.add_parser("bigsave")
    p_big.add_argument("path")
    args = parser.parse_args()
    {"train": train, "bigsave": bigsave}[args.command](args)


if __name__ == "__main__":
    main()
