"""lr_finder: the range test on real data; everything it touched is put back."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from realdata import digits

import corolux


def make_trainer(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10)
    )
    return corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        device="cpu",
        progress=False,
        **kwargs,
    )


def test_the_sweep_finds_a_sensible_rate_and_leaves_everything_as_it_was(tmp_path):
    x, y = digits()
    trainer = make_trainer()
    trainer.fit((x[:256], y[:256]), epochs=1)  # some optimizer state and a history to keep
    trainer.model.eval()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_state = trainer.optimizers["opt"].state_dict()
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt_state["state"].items()}
    history = trainer.history
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()

    finder = corolux.lr_finder(trainer, (x, y), start_lr=1e-5, end_lr=10.0, steps=60, batch_size=64)

    assert len(finder.lrs) == len(finder.losses) == 60
    assert finder.lrs[0] == pytest.approx(1e-5) and finder.lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(finder.lrs, finder.lrs[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric
    assert finder.stop < 60  # lr 10 with momentum diverges: the curve is cut there
    assert 1e-3 < finder.suggestion < finder.lrs[finder.stop]
    assert min(finder.smoothed[: finder.stop]) < finder.smoothed[0]
    # nothing of the sweep stays
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    after = trainer.optimizers["opt"].state_dict()
    assert after["param_groups"][0]["lr"] == 0.01
    assert all(torch.equal(momentum[k], v["momentum_buffer"]) for k, v in after["state"].items())
    assert trainer.history is history and not trainer.model.training
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert (np.random.get_state()[1] == rng[2]).all()
    figure = finder.plot(str(tmp_path / "lr.png"))
    assert (tmp_path / "lr.png").stat().st_size > 1000 and figure is not None
    assert "suggestion=" in repr(finder)


def test_a_failing_sweep_still_puts_everything_back():
    x, y = digits()
    trainer = make_trainer()
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    class Boom(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.step == 5:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), trainer.preserving_state():
        trainer.fit((x, y), epochs=1, callbacks=[Boom()])
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.optimizers["opt"].state_dict()["state"] == {}


def test_bad_arguments_are_refused():
    trainer = make_trainer()
    data = digits()
    with pytest.raises(ValueError, match="0 < start_lr < end_lr"):
        corolux.lr_finder(trainer, data, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        corolux.lr_finder(trainer, data, steps=1)
    two = corolux.Trainer(
        torch.nn.ModuleDict({"a": torch.nn.Linear(64, 10), "b": torch.nn.Linear(64, 10)}),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer={"a": lambda p: torch.optim.SGD(p, lr=0.1), "b": lambda p: torch.optim.SGD(p, lr=0.1)},
    )
    with pytest.raises(ValueError, match=r"one optimizer; this trainer has 2 \(\['a', 'b'\]\)"):
        corolux.lr_finder(two, data)
    assert corolux.lr_finder.__module__ == "corolux.lr_finder"
    assert math.isfinite(corolux.lr_finder(trainer, data, steps=5).losses[0])


def test_the_suggested_rate_trains_better_than_a_timid_one():
    x, y = digits()
    finder = corolux.lr_finder(make_trainer(), (x, y), steps=100, batch_size=64)
    losses = {}
    for lr in (finder.suggestion, 1e-4):
        trainer = make_trainer()
        trainer.optimizers["opt"].param_groups[0]["lr"] = lr
        losses[lr] = trainer.fit((x, y), epochs=2, batch_size=64).last("train_loss")
    assert losses[finder.suggestion] < 0.5 * losses[1e-4], losses
