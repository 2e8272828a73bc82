"""Timer: a graceful stop with reason "time_limit" once the budget is spent (in real time, and
batch by batch on a fake clock), per-phase times, a fresh budget for a resumed run, and the
forms of ``max_time``."""

from __future__ import annotations

import datetime
import math
import time

import pytest
import torch
from realdata import iris, linear_trainer

import corolux
from corolux.callback import handlers_of
from corolux.callbacks import AutoResume
from corolux.callbacks import timer as timer_module
from corolux.callbacks.timer import Timer, parse_max_time

F = torch.nn.functional


def make_trainer() -> corolux.Trainer:
    return linear_trainer(metrics=False)


def fit(trainer: corolux.Trainer, callbacks: list, epochs: int | tuple[int, int] = 3, **kwargs):
    """Iris: 120 training flowers in 4 batches of 32, 30 for validation in 1 batch."""
    x, y = iris()
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    kwargs.setdefault("valid_data", (x[120:], y[120:]))
    return trainer.fit((x[:120], y[:120]), epochs=epochs, batch_size=32, callbacks=callbacks, **kwargs)


class FakeClock:
    """Stands in for the Timer's clock; the Slow callback below advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timer_module, "_clock", fake)
    return fake


class Slow(corolux.Callback):
    """Each training batch takes ``train`` seconds, each validation batch ``valid``, on the clock;
    records where each batch ended and whether a stop was given there."""

    weight = -1  # before the Timer, so the time is spent when it checks

    def __init__(self, clock: FakeClock, train: float = 1.0, valid: float = 0.25, epoch_end: float = 0.0):
        self.clock, self.train, self.valid, self.epoch_end = clock, train, valid, epoch_end
        self.batches: list[tuple[int, str, int]] = []

    def on_train_batch_begin(self, ctx):
        self.clock.now += self.train

    def on_valid_batch_begin(self, ctx):
        self.clock.now += self.valid

    def on_train_batch_end(self, ctx):
        self.batches.append((ctx.epoch, ctx.phase, ctx.iter))

    on_valid_batch_end = on_train_batch_end

    def on_epoch_end(self, ctx):
        self.clock.now += self.epoch_end


# -- real time ----------------------------------------------------------------------------------------


def test_a_tiny_budget_stops_a_slow_run_early_in_real_time():
    class Sleepy(corolux.Callback):
        def on_train_batch_begin(self, ctx):
            time.sleep(0.01)

    timer = Timer(max_time=0.1)
    t0 = time.monotonic()
    history = fit(make_trainer(), [timer, Sleepy()], epochs=100)
    wall = time.monotonic() - t0
    assert history.stop_reason == "time_limit"
    assert len(history) < 10  # 100 epochs of 4 batches would take more than 4 s
    assert 0.1 <= timer.elapsed <= wall
    assert timer.remaining == 0.0
    assert timer.elapsed < 0.1 + 1.0  # it stopped soon after the budget, not at the end


# -- exactly where it stops (fake clock) -----------------------------------------------------------


def test_stops_at_the_first_batch_end_past_the_budget_and_runs_nothing_after(clock):
    slow = Slow(clock)  # an epoch: 4 training seconds, then 0.25 s of validation
    timer = Timer(max_time=7.5)
    history = fit(make_trainer(), [timer, slow], epochs=10)
    assert history.stop_reason == "time_limit"
    # epoch 2's batches end at 5.25, 6.25, 7.25, 8.25 s: the stop comes at its 4th; no validation after
    assert slow.batches[-3:] == [(2, "train", 2), (2, "train", 3), (2, "train", 4)]
    assert history["epoch"] == [1, 2] and history.completed_epochs == 1  # epoch 2 was cut short
    assert timer.elapsed == 8.25
    assert timer.phase_elapsed == {"train": 8.0, "valid": 0.25}
    assert math.isnan(history["valid_loss"][1])


def test_a_budget_spent_in_validation_stops_there(clock):
    slow = Slow(clock, train=1.0, valid=0.25)
    history = fit(make_trainer(), [Timer(max_time=4.1), slow], epochs=10)
    assert history.stop_reason == "time_limit"
    assert slow.batches[-1] == (1, "valid", 1)
    assert history.completed_epochs == 0


def test_a_budget_spent_at_the_epoch_end_keeps_that_epoch_completed(clock):
    slow = Slow(clock, train=0.5, valid=0.0, epoch_end=10.0)  # the epoch's work is fast, its end slow
    history = fit(make_trainer(), [Timer(max_time=5), slow], epochs=10)
    assert history.stop_reason == "time_limit"
    assert history["epoch"] == [1] and history.completed_epochs == 1


def test_min_epochs_does_not_delay_the_stop(clock):
    history = fit(make_trainer(), [Timer(max_time=2.5), Slow(clock)], epochs=(5, 10))
    assert history.stop_reason == "time_limit"
    assert history["epoch"] == [1]


def test_log_records_each_epochs_phase_times_in_the_history(clock):
    history = fit(make_trainer(), [Timer(log=True), Slow(clock, train=1.0, valid=0.5)], epochs=2)
    assert history.stop_reason is None
    assert history["train_time"] == [4.0, 4.0]
    assert history["valid_time"] == [0.5, 0.5]
    assert "train_time" not in fit(make_trainer(), [Timer(), Slow(clock)], epochs=1)


def test_without_a_budget_it_times_and_never_stops_nor_listens_to_batches(clock):
    timer = Timer()
    history = fit(make_trainer(), [timer, Slow(clock, train=100.0)], epochs=2)
    assert history.stop_reason is None and len(history) == 2
    assert timer.elapsed == 800.5 and timer.remaining is None
    assert not {"on_train_batch_end", "on_valid_batch_end"} & set(handlers_of(timer))
    assert {"on_train_batch_end", "on_valid_batch_end"} <= set(handlers_of(Timer(60)))


def test_a_resumed_run_gets_a_fresh_budget_and_autoresume_keeps_its_file(clock, tmp_path):
    state = tmp_path / "state.pt"
    first = fit(make_trainer(), [Timer(max_time=6), Slow(clock), AutoResume(state)], epochs=4)
    assert first.stop_reason == "time_limit" and first.completed_epochs == 1
    assert state.exists()  # a time limit is not the end of training: the next job continues
    second = fit(make_trainer(), [Timer(max_time=6), Slow(clock), AutoResume(state)], epochs=4)
    assert second.stop_reason == "time_limit" and second.completed_epochs == 2  # it ran epoch 2 again
    third = fit(make_trainer(), [Timer(max_time=100), Slow(clock), AutoResume(state)], epochs=4)
    assert third.stop_reason is None and third["epoch"] == [1, 2, 3, 4]
    assert not state.exists()


def test_after_the_run_elapsed_is_final_and_evaluate_is_not_stopped(clock):
    trainer = make_trainer()
    timer, slow = Timer(max_time=2), Slow(clock)
    fit(trainer, [timer, slow], epochs=3)
    assert timer.elapsed == 2.0
    clock.now += 100
    assert timer.elapsed == 2.0  # frozen at the run's end
    x, y = iris()
    slow.batches.clear()
    trainer.evaluate((x, y), batch_size=32, callbacks=[timer, slow])  # the budget is the fit's
    assert len(slow.batches) == 5


# -- max_time ---------------------------------------------------------------------------------------


def test_max_time_forms():
    assert parse_max_time("01:02:03:04") == 93784.0
    assert parse_max_time(datetime.timedelta(hours=1, milliseconds=500)) == 3600.5
    assert parse_max_time(0.25) == 0.25 and parse_max_time(None) is None
    assert Timer("00:00:00:30").max_time == 30.0
    for bad in ("1:2:3", "aa:bb:cc:dd", "00:00:-1:00", "00:00:00:00"):
        with pytest.raises(ValueError, match="max_time"):
            Timer(bad)
    for bad in (0, -1, math.inf, math.nan, datetime.timedelta(0)):
        with pytest.raises(ValueError, match="positive, finite"):
            Timer(bad)
    for bad in (True, [60], object()):
        with pytest.raises(TypeError, match="max_time must be seconds"):
            Timer(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log must be True or False"):
        Timer(60, log="yes")  # type: ignore[arg-type]
