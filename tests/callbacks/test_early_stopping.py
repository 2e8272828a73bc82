"""EarlyStopping: when it stops (patience, min_delta, baseline, min_epochs, epochs without a
value), what it emits, where it runs, and that a resumed run stops at the same epoch."""

from __future__ import annotations

import math

import pytest
import torch
from kill import KillAt
from realdata import digits_mlp_trainer, overfitting_split

import corolux
from corolux import checkpoint
from corolux.callbacks import AutoResume
from corolux.callbacks.early_stopping import EarlyStopping

F = torch.nn.functional


def make_trainer(seed: int = 0) -> corolux.Trainer:
    return digits_mlp_trainer(seed, lr=1e-2)


@pytest.fixture(scope="module")
def data():
    """200 digits to train on, 300 to validate: a small MLP overfits, so valid_loss goes up
    and down after a few epochs."""
    return overfitting_split()


def fit(data, callbacks, epochs=30, seed=0, **kwargs):
    torch.manual_seed(1)
    return make_trainer(seed).fit(data[0], epochs=epochs, valid_data=data[1], callbacks=callbacks, **kwargs)


def expected_stop(values, patience, min_delta=0.0, baseline=None, min_epochs=0, higher=False):
    """The epoch an early stop should happen at for these per-epoch values (None: no value
    that epoch), or None: the rule written out independently of the callback."""
    best, wait = baseline, 0
    for epoch, value in enumerate(values, start=1):
        if value is None or math.isnan(value):
            continue
        better = best is None or (value > best + min_delta if higher else value < best - min_delta)
        if better:
            best, wait = value, 0
            continue
        wait += 1
        if wait > patience and epoch >= min_epochs:
            return epoch
    return None


class Script(corolux.Callback):
    """Logs a scripted ``score`` for each epoch (None: nothing that epoch), as a metric would."""

    def __init__(self, values) -> None:
        self.values = list(values)

    def on_train_end(self, ctx):
        value = self.values[ctx.epoch - 1]
        if value is not None:
            ctx.log("score", value)


def scripted(data, values, **es):
    stop = EarlyStopping(monitor="score", mode=es.pop("mode", "min"), **es)
    return fit_small(data, [Script(values), stop], epochs=len(values)), stop


def fit_small(data, callbacks, epochs, **kwargs):
    torch.manual_seed(1)
    x, y = data[0]
    return make_trainer().fit((x[:64], y[:64]), epochs=epochs, callbacks=callbacks, **kwargs)


# -- when it stops, on real training ---------------------------------------------------------------


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_stops_when_valid_loss_stops_improving(data, patience):
    stop = EarlyStopping(patience=patience)
    history = fit(data, [stop])
    losses = history["valid_loss"]
    want = expected_stop(losses, patience)
    assert want is not None and want < 30  # the data overfits: the test must see a stop
    assert len(history) == history.completed_epochs == want == stop.stopped_epoch
    assert history.stop_reason == "early_stopping"
    assert stop.best == min(losses)
    assert stop.wait == patience + 1


def test_mode_auto_follows_the_metric_direction(data):
    stop = EarlyStopping(monitor="valid_acc", patience=1)
    history = fit(data, [stop])
    accs = history["valid_acc"]
    want = expected_stop(accs, 1, higher=True)
    assert want is not None and len(history) == want
    assert stop.best == max(accs)
    assert expected_stop(accs, 1, higher=False) != want  # the direction matters for this run


def test_min_delta_stops_on_improvements_too_small(data):
    plain, strict = EarlyStopping(patience=0), EarlyStopping(patience=0, min_delta=0.05)
    h_plain, h_strict = fit(data, [plain]), fit(data, [strict])
    assert h_plain["valid_loss"][: len(h_strict)] == h_strict["valid_loss"]  # same run, cut earlier
    assert len(h_strict) == expected_stop(h_strict["valid_loss"], 0, min_delta=0.05) < len(h_plain)


# -- the rule, on scripted values --------------------------------------------------------------------


def test_patience_zero_never_stops_while_the_value_improves(data):
    # luz stops at epoch 2 here (counter 0 >= patience 0) although every epoch improves.
    history, stop = scripted(data, [5, 4, 3, 2, 1], patience=0)
    assert history.stop_reason is None and len(history) == 5 and stop.stopped_epoch is None


@pytest.mark.parametrize(
    ("values", "patience", "want"),
    [
        ([5, 4, 4, 3, 2, 1], 0, 3),  # equal is not better: the first epoch without improvement stops
        ([5, 4, 4.5, 3, 3.5, 3.2, 1], 1, 6),  # the count is reset by an improvement
        ([5, 6, 7, 8, 9, 1], 3, 5),  # stops when the count exceeds patience
        ([5, 6, 7, 8], 3, None),
    ],
)
def test_patience_counts_epochs_without_improvement(data, values, patience, want):
    history, stop = scripted(data, values, patience=patience)
    assert want == expected_stop(values, patience)
    assert stop.stopped_epoch == want
    assert len(history) == (want or len(values))
    assert history.stop_reason == ("early_stopping" if want else None)


def test_min_delta_on_scripted_values(data):
    values = [1.0, 0.95, 0.91, 0.5, 0.49]
    assert scripted(data, values, patience=0, min_delta=0.1)[1].stopped_epoch == 2
    assert scripted(data, values, patience=1, min_delta=0.1)[1].stopped_epoch == 3
    assert scripted(data, values, patience=0, min_delta=0.01)[1].stopped_epoch == 5


def test_baseline_is_the_best_before_the_first_epoch(data):
    values = [0.9, 0.8, 0.7, 0.6]
    assert scripted(data, values, patience=1)[1].stopped_epoch is None
    history, stop = scripted(data, values, patience=1, baseline=0.5)
    assert stop.stopped_epoch == 2 and len(history) == 2 and stop.best == 0.5
    _, stop = scripted(data, [0.4, 0.45, 0.3], patience=0, baseline=0.5)
    assert stop.stopped_epoch == 2 and stop.best == 0.4  # the first epoch beat it
    _, stop = scripted(data, [0.6, 0.7, 0.8], patience=0, baseline=0.5, mode="max")
    assert stop.stopped_epoch is None and stop.best == 0.8


def test_never_stops_before_min_epochs(data):
    values = [1, 2, 3, 4, 5, 6, 7, 8]
    stop = EarlyStopping(monitor="score", mode="min")
    history = fit_small(data, [Script(values), stop], epochs=(5, 8))
    assert stop.stopped_epoch == 5 == len(history) == expected_stop(values, 0, min_epochs=5)
    assert stop.wait == 4  # counting went on before the minimum
    stop = EarlyStopping(monitor="score", mode="min")
    assert len(fit_small(data, [Script(values), stop], epochs=(0, 8))) == 2


def test_epochs_n_has_no_minimum(data):
    stop = EarlyStopping(monitor="score", mode="min")
    torch.manual_seed(1)
    x, y = data[0]
    history = make_trainer().fit((x[:64], y[:64]), epochs=8, callbacks=[Script(range(1, 9)), stop])
    assert len(history) == 2 and stop.stopped_epoch == 2


def test_the_minimum_does_not_hold_other_stops(data):
    class Stop(corolux.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                ctx.stop_training("mine")

    history = fit_small(data, [Stop(), EarlyStopping(monitor="train_loss")], epochs=(5, 8))
    assert history.stop_reason == "mine" and len(history) == 2


def test_an_epoch_without_the_value_counts_neither_way(data):
    values = [5, None, None, 6, 4, None, 4]
    _, stop = scripted(data, values, patience=0)
    assert stop.stopped_epoch == 4 == expected_stop(values, 0)
    _, stop = scripted(data, values, patience=1)
    assert stop.stopped_epoch is None and stop.wait == 1

    class SkipValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch > 1:
                ctx.skip_validation()

    stop = EarlyStopping(patience=0)  # valid_loss is nan in the history from epoch 2: nothing counts
    history = fit(data, [SkipValidation(), stop], epochs=4)
    assert history.stop_reason is None and stop.wait == 0
    assert math.isnan(history["valid_loss"][1]) and stop.best == history["valid_loss"][0]


def test_an_epoch_cut_short_by_another_stop_does_not_count(data):
    class StopInside(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (2, 1):
                ctx.stop_training("time_limit")

    seen = []

    class Watch(corolux.Callback):
        def on_early_stopping(self, ctx):
            seen.append(ctx.epoch)

    stop = EarlyStopping(monitor="train_loss", patience=0)
    history = fit_small(data, [StopInside(), stop, Watch()], epochs=4)
    assert history.stop_reason == "time_limit" and history.completed_epochs == 1
    assert stop.best == history["train_loss"][0] and stop.wait == 0 and seen == []


# -- what it emits and where it runs -------------------------------------------------------------------


def test_emits_on_early_stopping_once_after_every_epoch_end_handler(data):
    events = []

    class Logger(corolux.Callback):
        weight = 1000  # a logger with a high weight still runs before early stopping

        def on_epoch_end(self, ctx):
            events.append(("logger", ctx.epoch, ctx.stop_reason))

        def on_early_stopping(self, ctx):
            events.append(("on_early_stopping", ctx.epoch, ctx.stop_reason))

        def on_fit_end(self, ctx):
            events.append(("on_fit_end", ctx.epoch, ctx.stop_reason))

    stop = EarlyStopping(patience=1)
    trainer = make_trainer()
    torch.manual_seed(1)
    stages = [
        ev.stage for ev in trainer.run(data[0], epochs=30, valid_data=data[1], callbacks=[stop, Logger()])
    ]
    n = stop.stopped_epoch
    assert n is not None and n < 30
    assert stages.count("on_early_stopping") == 1
    assert stages[-3:] == ["on_epoch_end", "on_early_stopping", "on_fit_end"]
    assert events[-3:] == [
        ("logger", n, None),
        ("on_early_stopping", n, "early_stopping"),
        ("on_fit_end", n, "early_stopping"),
    ]


def test_a_new_fit_starts_fresh(data):
    stop = EarlyStopping(monitor="score", mode="min")
    fit_small(data, [Script([1, 2, 3])], epochs=1)
    assert len(fit_small(data, [Script([1, 2, 3]), stop], epochs=3)) == 2
    assert len(fit_small(data, [Script([1, 0.5, 0.2]), stop], epochs=3)) == 3  # best, wait reset
    assert stop.best == 0.2 and stop.stopped_epoch is None


def test_state_dict_round_trips():
    stop = EarlyStopping(patience=3)
    stop.best, stop.wait, stop.stopped_epoch = 0.25, 2, None
    other = EarlyStopping(patience=3)
    other.load_state_dict(stop.state_dict())
    assert other.state_dict() == {"best": 0.25, "wait": 2, "stopped_epoch": None}


# -- resume --------------------------------------------------------------------------------------------


def test_a_resumed_run_stops_at_the_same_epoch(data, tmp_path):
    patience = 2
    reference = EarlyStopping(patience=patience)
    ref_history = fit(data, [reference])
    losses = ref_history["valid_loss"]
    # Kill after an epoch that left a count > 0, so a stop that forgot its state would come later.
    killed_after = next(
        e
        for e in range(2, len(losses))
        if expected_stop(losses[:e], patience) is None and losses[e - 1] > min(losses[:e])
    )
    assert killed_after < reference.stopped_epoch
    path = tmp_path / "auto.pt"
    with pytest.raises(SystemExit):
        fit(data, [AutoResume(path), EarlyStopping(patience=patience), KillAt(killed_after + 1)])
    saved = checkpoint.read(path)["callbacks"]["EarlyStopping[valid_loss|auto]"]
    assert saved["wait"] > 0 and saved["best"] == min(losses[:killed_after])
    torch.manual_seed(123)  # another process
    resumed = EarlyStopping(patience=patience)
    history = fit(data, [AutoResume(path), resumed], seed=7)
    assert history.to_dict() == ref_history.to_dict()
    assert resumed.stopped_epoch == reference.stopped_epoch == len(history)
    assert history.stop_reason == "early_stopping" and not path.exists()  # done: the resume file goes


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"patience": -1}, ValueError, "patience must be an integer >= 0, got -1"),
        ({"patience": 1.5}, ValueError, "patience must be an integer >= 0, got 1.5"),
        ({"patience": True}, ValueError, "patience must be an integer >= 0, got True"),
        ({"min_delta": -0.1}, ValueError, "min_delta must be a finite number >= 0, got -0.1"),
        ({"min_delta": float("nan")}, ValueError, "min_delta must be a finite number >= 0, got nan"),
        ({"mode": "minimum"}, ValueError, r"mode must be one of \('auto', 'min', 'max'\), got 'minimum'"),
        ({"monitor": 3}, TypeError, "monitor must be a history name such as 'valid_loss', got 3"),
        ({"baseline": "0.5"}, TypeError, "baseline must be a number or None, got '0.5'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=f"EarlyStopping: {match}"):
        EarlyStopping(**kwargs)


def test_an_unknown_monitor_fails_at_the_first_epoch_end_with_the_names_recorded(data):
    count = []

    class Count(corolux.Callback):
        def on_epoch_end(self, ctx):
            count.append(ctx.epoch)

    with pytest.raises(ValueError, match="unknown monitor 'val_loss'; did you mean 'valid_loss'?") as info:
        fit(data, [Count(), EarlyStopping(monitor="val_loss")], epochs=3)
    assert "available: train_acc, train_loss, valid_acc, valid_loss" in str(info.value)
    assert count == [1]
    with pytest.raises(
        ValueError, match="no validation data .pass valid_data= to fit.; available: train_acc, train_loss\n"
    ):
        fit_small(data, [EarlyStopping()], epochs=2)  # valid_loss without validation data


def test_mode_auto_on_a_custom_name_asks_for_a_mode(data):
    with pytest.raises(ValueError, match="cannot tell whether a higher 'score' is better.*mode='max'"):
        fit_small(data, [Script([1, 2]), EarlyStopping(monitor="score")], epochs=2)


def test_a_run_killed_after_early_stopping_ended_it_ends_at_once_when_run_again(data, tmp_path):
    from corolux.callbacks import AutoResume

    path = tmp_path / "auto.pt"

    class DieAtTheEnd(corolux.Callback):
        def on_fit_end(self, ctx):
            raise SystemExit  # killed before AutoResume deleted its file

    stop = EarlyStopping(monitor="valid_loss", patience=1)
    with pytest.raises(SystemExit):
        fit(data, [stop, AutoResume(path), DieAtTheEnd()], epochs=60)
    stopped = stop.stopped_epoch
    assert stopped is not None and stopped < 60 and path.exists()
    history = fit(data, [EarlyStopping(monitor="valid_loss", patience=1), AutoResume(path)], epochs=60)
    assert len(history) == stopped and history.stop_reason == "early_stopping"
    assert not path.exists()
