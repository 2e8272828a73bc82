"""GradientAccumulation: fit() with it trains bit for bit as a hand loop that accumulates (a
partial last window scaled by its real size), ctx.step counts optimizer steps only, every batch
is counted in the metrics, and a per-step LRScheduler steps once per window."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from realdata import digit_batches, small_mlp

import corolux
from corolux.callbacks.gradient_accumulation import GradientAccumulation
from corolux.callbacks.lr_scheduler import LRScheduler

F = torch.nn.functional
nn = torch.nn


def batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return digit_batches(n, size)


mlp = small_mlp


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def trainer(model: nn.Module) -> corolux.Trainer:
    return corolux.Trainer(model, loss_fn=F.cross_entropy, optimizer=sgd, device="cpu", progress=False)


class Steps(corolux.Callback):
    """Records ctx.step at every after_step and at the end."""

    def __init__(self) -> None:
        self.at_after_step: list[tuple[int, int]] = []  # (epoch, iter)
        self.final = -1

    def on_train_batch_after_step(self, ctx: Any) -> None:
        self.at_after_step.append((ctx.epoch, ctx.iter))

    def on_fit_end(self, ctx: Any) -> None:
        self.final = ctx.step


def hand_accumulation(model, opt, data, steps, epochs, last_window="real", sched=None):
    """The textbook loop: step every ``steps`` batches and at the epoch's end; the last window's
    losses are divided by its real size k (``last_window="real"``) or by ``steps`` (wrong)."""
    n = len(data)
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(data, start=1):
            start = (i - 1) // steps * steps
            window = min(steps, n - start) if last_window == "real" else steps
            (F.cross_entropy(model(x), y) / window).backward()
            if i % steps == 0 or i == n:
                opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("n_batches", "steps"), [(7, 3), (8, 3), (6, 3)], ids=["tail_1", "tail_2", "even"])
def test_bit_identical_to_a_hand_loop_that_accumulates(n_batches, steps):
    epochs = 2
    hand = mlp()
    hand_opt = sgd(hand.parameters())
    hand_accumulation(hand, hand_opt, batches(n_batches), steps, epochs)

    lux = mlp()
    rec = Steps()
    trainer(lux).fit(batches(n_batches), epochs=epochs, callbacks=[GradientAccumulation(steps), rec])

    assert same(hand, lux)
    windows = math.ceil(n_batches / steps)
    assert rec.final == epochs * windows  # optimizer steps, not batches
    expected = [(e, i) for e in (1, 2) for i in range(1, n_batches + 1) if i % steps == 0 or i == n_batches]
    assert rec.at_after_step == expected
    if n_batches % steps:  # teeth: a last window scaled by 1/steps trains differently
        wrong = mlp()
        hand_accumulation(wrong, sgd(wrong.parameters()), batches(n_batches), steps, epochs, "steps")
        assert not same(wrong, hand)


def test_one_step_is_no_accumulation():
    plain, acc = mlp(), mlp()
    trainer(plain).fit(batches(5), epochs=2)
    rec = Steps()
    trainer(acc).fit(batches(5), epochs=2, callbacks=[GradientAccumulation(1), rec])
    assert same(plain, acc)
    assert rec.final == 10


def test_every_batch_counts_in_the_metrics():
    data = batches(7)
    data[-1] = (data[-1][0][:5], data[-1][1][:5])  # a short last batch: per-sample weights matter
    losses: list[tuple[float, int]] = []

    class Losses(corolux.Callback):
        def on_train_batch_after_loss(self, ctx: Any) -> None:
            losses.append((float(ctx.loss.detach()), len(ctx.target)))

    history = trainer(mlp()).fit(data, epochs=1, callbacks=[GradientAccumulation(3), Losses()])
    assert len(losses) == 7
    mean = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    assert history["train_loss"][0] == pytest.approx(mean, rel=1e-6)


def test_max_steps_counts_optimizer_steps():
    seen = []

    class Count(corolux.Callback):
        def on_train_batch_end(self, ctx: Any) -> None:
            seen.append(ctx.iter)

    rec = Steps()
    history = trainer(mlp()).fit(
        batches(12), epochs=3, max_steps=2, callbacks=[GradientAccumulation(3), Count(), rec]
    )
    assert rec.final == 2
    assert seen == [1, 2, 3, 4, 5, 6]  # two windows of three batches
    assert history.stop_reason == "max_steps"


def test_a_per_step_schedule_steps_once_per_window():
    n_batches, steps, epochs = 7, 3, 2

    def factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.7**k)

    hand = mlp()
    hand_opt = sgd(hand.parameters())
    hand_sched = factory(hand_opt)
    hand_accumulation(hand, hand_opt, batches(n_batches), steps, epochs, sched=hand_sched)

    lux = mlp()
    sched = LRScheduler(factory, call_on="on_train_batch_after_step")
    rec = Steps()
    t = trainer(lux)
    t.fit(batches(n_batches), epochs=epochs, callbacks=[GradientAccumulation(steps), sched, rec])

    assert rec.final == epochs * 3 == sched.scheduler.last_epoch  # one schedule step per optimizer step
    assert t.optimizers["opt"].param_groups[0]["lr"] == hand_opt.param_groups[0]["lr"] == 0.1 * 0.7**6
    assert same(hand, lux)


@pytest.mark.parametrize("steps", [0, -2, 1.5, True, "4", None])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match=r"GradientAccumulation: steps must be an integer >= 1.*got"):
        GradientAccumulation(steps)


def test_evaluate_is_not_affected():
    t = trainer(mlp())
    t.fit(batches(3), epochs=1)
    plain = t.evaluate(batches(3))
    assert t.evaluate(batches(3), callbacks=[GradientAccumulation(4)]) == plain
