"""LRMonitor: history["lr"] (or lr_<opt>, lr_<opt>_<group>) holds, for each epoch, the learning
rate that epoch trained with, whatever the weights of the schedulers that step at its end."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from realdata import iris

import corolux
from corolux.callbacks.lr_monitor import LRMonitor
from corolux.callbacks.lr_scheduler import LRScheduler

F = torch.nn.functional
nn = torch.nn
lr_scheduler = torch.optim.lr_scheduler


def make_trainer(optimizer: Any = None, model: nn.Module | None = None) -> corolux.Trainer:
    torch.manual_seed(0)
    return corolux.Trainer(
        model if model is not None else nn.Linear(4, 3),
        loss_fn=F.cross_entropy,
        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.1)),
        device="cpu",
        progress=False,
    )


class FirstBatchLR(corolux.Callback):
    """The learning rates each epoch's first batch trained with, and a naive read at the epoch's end."""

    def __init__(self) -> None:
        self.first: list[list[float]] = []
        self.at_end: list[float] = []

    def on_train_batch_begin(self, ctx: Any) -> None:
        if ctx.iter == 1:
            self.first.append([g["lr"] for o in ctx.optimizers.values() for g in o.param_groups])

    def on_epoch_end(self, ctx: Any) -> None:
        self.at_end.append(ctx.opt.param_groups[0]["lr"])


def halving(call_on: str = "on_epoch_end") -> LRScheduler:
    return LRScheduler(lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), call_on=call_on)


@pytest.mark.parametrize("order", ["monitor_first", "scheduler_first", "scheduler_weight_-1000"])
def test_epoch_k_records_the_rate_epoch_k_trained_with(order):
    sched, monitor, probe = halving(), LRMonitor(), FirstBatchLR()
    if order == "monitor_first":
        callbacks = [monitor, sched, probe]
    else:
        callbacks = [sched, monitor, probe]
        if order == "scheduler_weight_-1000":
            sched.weight = -1000  # steps before every other on_epoch_end handler
    history = make_trainer().fit(iris(), epochs=4, callbacks=callbacks)
    assert history["lr"] == [0.1, 0.05, 0.025, 0.0125]
    assert history["lr"] == [lrs[0] for lrs in probe.first]
    # Teeth: the rate read when on_epoch_end's handlers run is already the next epoch's.
    if order != "monitor_first":
        assert probe.at_end == [0.05, 0.025, 0.0125, 0.00625]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")
def test_a_schedule_stepped_at_epoch_begin_shows_in_the_epoch_it_starts():
    history = make_trainer().fit(iris(), epochs=3, callbacks=[LRMonitor(), halving("on_epoch_begin")])
    assert history["lr"] == [0.05, 0.025, 0.0125]


def test_a_per_step_schedule_records_each_epochs_starting_rate():
    sched = LRScheduler(
        lambda opt: lr_scheduler.LambdaLR(opt, lambda k: 0.9**k), call_on="on_train_batch_after_step"
    )
    probe = FirstBatchLR()
    history = make_trainer().fit(iris(), epochs=3, batch_size=50, callbacks=[sched, LRMonitor(), probe])
    assert history["lr"] == [lrs[0] for lrs in probe.first]
    assert history["lr"] == pytest.approx([0.1, 0.1 * 0.9**3, 0.1 * 0.9**6], rel=1e-12)


def test_names_for_param_groups_and_several_optimizers():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def groups(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.01}], lr=0.1
        )

    history = make_trainer(groups, model).fit(iris(), epochs=2, callbacks=[LRMonitor()])
    assert history["lr_opt_0"] == [0.1, 0.1] and history["lr_opt_1"] == [0.01, 0.01]
    assert "lr" not in history

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gen = nn.Linear(4, 3)
            self.disc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gen(x) + self.disc(x)

    two = {"gen": lambda p: torch.optim.SGD(p, lr=0.2), "disc": lambda p: torch.optim.Adam(p, lr=1e-3)}
    callbacks = [LRMonitor(), LRScheduler(lambda opt: lr_scheduler.StepLR(opt, 1, 0.5), opt_name="disc")]
    history = make_trainer(two, Two()).fit(iris(), epochs=2, callbacks=callbacks)
    assert history["lr_gen"] == [0.2, 0.2]
    assert history["lr_disc"] == [1e-3, 5e-4]


def test_a_tensor_learning_rate_is_copied_and_recorded_as_a_float():
    sched = halving()
    history = make_trainer(lambda p: torch.optim.Adam(p, lr=torch.tensor(0.01))).fit(
        iris(), epochs=3, callbacks=[sched, LRMonitor()]
    )
    assert history["lr"] == pytest.approx([0.01, 0.005, 0.0025])
    assert all(type(v) is float for v in history["lr"])


def test_the_recorded_rate_is_in_the_epoch_metrics_for_later_callbacks():
    seen = []

    class After(corolux.Callback):
        def on_epoch_end(self, ctx: Any) -> None:
            seen.append(ctx.metrics["lr"])

    make_trainer().fit(iris(), epochs=2, callbacks=[After(), LRMonitor(), halving()])
    assert seen == [0.1, 0.05]
