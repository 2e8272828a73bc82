"""TerminateOnNaN: a non-finite training loss skips its batch and stops training (reason "nan")
with a warning naming the epoch and the batch; no optimizer step is ever taken on it."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from realdata import digits

import corolux
from corolux.callbacks.gradient_accumulation import GradientAccumulation
from corolux.callbacks.terminate_on_nan import TerminateOnNaN

F = torch.nn.functional
nn = torch.nn


def poisoned(n: int = 6, size: int = 32, bad: int | None = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Digits batches where one sample of batch ``bad`` (1-based; None: none) is corrupt (a NaN pixel)."""
    x, y = digits()
    x = x[: n * size].clone()
    if bad is not None:
        x[(bad - 1) * size + 7, 12] = math.nan
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]


def make_trainer() -> corolux.Trainer:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return corolux.Trainer(
        model,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        device="cpu",
        progress=False,
    )


class Snapshot(corolux.Callback):
    """The weights at the start of each training batch, and the optimizer steps taken."""

    def __init__(self) -> None:
        self.before: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.steps: list[tuple[int, int]] = []

    def on_train_batch_begin(self, ctx: Any) -> None:
        self.before[ctx.epoch, ctx.iter] = {k: v.clone() for k, v in ctx.model.state_dict().items()}

    def on_train_batch_after_step(self, ctx: Any) -> None:
        self.steps.append((ctx.epoch, ctx.iter))


def weights_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_nan_loss_stops_before_its_step_with_the_weights_from_before_it():
    t = make_trainer()
    snap = Snapshot()
    with pytest.warns(
        RuntimeWarning, match=r"TerminateOnNaN: the training loss is nan at epoch 1, batch 4/6"
    ):
        history = t.fit(poisoned(bad=4), epochs=3, callbacks=[TerminateOnNaN(), snap])
    assert history.stop_reason == "nan"
    assert history.completed_epochs == 0 and len(history) == 1
    assert snap.steps == [(1, 1), (1, 2), (1, 3)]  # no step on batch 4, no batch after it
    assert weights_equal(t.model, snap.before[1, 4])
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert math.isfinite(history["train_loss"][0])  # the skipped batch is not counted


def test_without_it_the_nan_reaches_the_weights():
    t = make_trainer()
    t.fit(poisoned(bad=4), epochs=1)  # teeth for the test above
    assert not all(torch.isfinite(p).all() for p in t.model.parameters())


def test_an_infinite_loss_in_a_later_epoch():
    class Explode(corolux.Callback):  # weight 0: before TerminateOnNaN's check (weight inf)
        def on_train_batch_after_loss(self, ctx: Any) -> None:
            if ctx.epoch == 2 and ctx.iter == 2:
                ctx.loss = ctx.loss * math.inf

    t = make_trainer()
    snap = Snapshot()
    with pytest.warns(RuntimeWarning, match=r"loss is inf at epoch 2, batch 2/6"):
        history = t.fit(poisoned(bad=None), epochs=3, callbacks=[TerminateOnNaN(), Explode(), snap])
    assert history.stop_reason == "nan" and history.completed_epochs == 1
    assert weights_equal(t.model, snap.before[2, 2])
    assert snap.steps[-1] == (2, 1)


def test_under_accumulation_the_open_window_is_dropped_not_stepped():
    t = make_trainer()
    snap = Snapshot()
    with pytest.warns(RuntimeWarning, match=r"epoch 1, batch 5/6"):
        t.fit(poisoned(bad=5), epochs=2, callbacks=[GradientAccumulation(3), TerminateOnNaN(), snap])
    assert snap.steps == [(1, 3)]  # batch 4's gradients waited for a step that never came
    assert weights_equal(t.model, snap.before[1, 4]) and weights_equal(t.model, snap.before[1, 5])
    assert all(p.grad is None for p in t.model.parameters())


def test_finite_losses_train_as_without_it():
    plain, watched = make_trainer(), make_trainer()
    plain.fit(poisoned(bad=None), epochs=2)
    history = watched.fit(poisoned(bad=None), epochs=2, callbacks=[TerminateOnNaN()])
    assert history.stop_reason is None
    assert all(
        torch.equal(a, b) for a, b in zip(plain.model.parameters(), watched.model.parameters(), strict=True)
    )
