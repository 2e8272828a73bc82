"""History: per-epoch records by phase, nan where a phase did not run, last(), to_dict(),
plot(), ctx.log()."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from realdata import iris

import corolux
from corolux.metrics import Accuracy

F = torch.nn.functional


def trainer_for(**kwargs) -> corolux.Trainer:
    torch.manual_seed(0)
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.Adam(p, lr=0.05))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return corolux.Trainer(torch.nn.Linear(4, 3), **kwargs)


def fit(epochs: int = 3, callbacks=None, **trainer_kwargs) -> corolux.History:
    x, y = iris()
    trainer = trainer_for(metrics=[Accuracy()], **trainer_kwargs)
    return trainer.fit((x, y), epochs=epochs, valid_data=(x[::5], y[::5]), callbacks=callbacks)


def test_getitem_is_one_value_per_epoch():
    seen = []

    class Snap(corolux.Callback):
        def on_epoch_end(self, ctx):
            seen.append(dict(ctx.metrics))

    history = fit(3, callbacks=[Snap()])
    assert len(history) == 3
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        values = history[name]
        assert isinstance(values, list) and len(values) == 3
        assert all(isinstance(v, float) and math.isfinite(v) for v in values)
        assert values == [record[name] for record in seen]  # what callbacks saw at epoch end
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["epoch"] == [1, 2, 3]
    assert "train_loss" in history and "test_loss" not in history


def test_nan_where_a_phase_did_not_run():
    class SkipSecondValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 2:
                ctx.skip_validation()

    history = fit(3, callbacks=[SkipSecondValidation()])
    valid = history["valid_loss"]
    assert len(valid) == 3
    assert math.isfinite(valid[0]) and math.isnan(valid[1]) and math.isfinite(valid[2])
    assert math.isnan(history["valid_acc"][1])
    assert all(math.isfinite(v) for v in history["train_loss"])
    d = history.to_dict()
    assert all(len(v) == 3 for v in d.values())  # lists align with epochs


def test_nan_for_a_logged_value_missing_in_some_epochs():
    class LogOdd(corolux.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch % 2:
                ctx.log("odd", float(ctx.epoch))

    history = fit(3, callbacks=[LogOdd()])
    values = history["odd"]
    assert values[0] == 1.0 and math.isnan(values[1]) and values[2] == 3.0


def test_last():
    history = fit(3)
    assert history.last("train_loss") == history["train_loss"][-1]
    assert history.last("valid_acc") == history["valid_acc"][-1]


def test_to_dict_has_epoch_and_every_name():
    history = fit(2)
    d = history.to_dict()
    assert d["epoch"] == [1, 2]
    assert set(d) == {"epoch", "train_loss", "train_acc", "valid_loss", "valid_acc"}
    for name, values in d.items():
        assert values == history[name]
    assert isinstance(d, dict) and all(isinstance(v, list) for v in d.values())
    d["train_loss"].append(0.0)
    assert len(history["train_loss"]) == 2  # a copy, not the history's own lists


def test_to_dict_feeds_a_dataframe_like_table():
    """Every column has one value per epoch, so the dict is a rectangular table."""
    history = fit(2)
    d = history.to_dict()
    assert len({len(v) for v in d.values()}) == 1


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    history = fit(2)
    path = tmp_path / "curves.png"
    history.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_plot_with_str_path(tmp_path):
    pytest.importorskip("matplotlib")
    history = fit(1)
    path = tmp_path / "one.png"
    history.plot(str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_log_lands_in_the_epochs_record():
    class Logger(corolux.Callback):
        def on_train_batch_end(self, ctx):
            ctx.log("last_iter", ctx.iter)  # last write of the epoch wins

        def on_train_end(self, ctx):
            ctx.log("lr", ctx.opt.param_groups[0]["lr"] * ctx.epoch)

        def on_valid_end(self, ctx):
            ctx.log("weight_norm", ctx.model.weight.detach().norm())  # a tensor

        def on_epoch_end(self, ctx):
            ctx.log("at_end", ctx.epoch / 10)

    history = fit(3, callbacks=[Logger()])
    assert history["lr"] == pytest.approx([0.05, 0.10, 0.15])
    assert history["last_iter"] == [5, 5, 5]  # 150 samples in batches of 32
    assert history["at_end"] == pytest.approx([0.1, 0.2, 0.3])
    norms = history["weight_norm"]
    assert len(norms) == 3 and all(type(v) is float for v in norms)
    assert {"lr", "last_iter", "at_end", "weight_norm"} <= set(history.to_dict())


@pytest.mark.parametrize("stage", ["on_train_end", "on_epoch_end"])
def test_logged_tensor_is_recorded_as_a_float(stage):
    """ctx.log() says tensors become floats in the record; a callback at the default
    weight logs at on_epoch_end after the metrics tracker (-100) has written the record."""

    class Logger(corolux.Callback):
        pass

    setattr(Logger, stage, lambda self, ctx: ctx.log("norm", ctx.model.weight.detach().norm()))
    history = fit(2, callbacks=[Logger()])
    assert [type(v) for v in history["norm"]] == [float, float]


@pytest.mark.parametrize("logged_at", ["on_train_batch_end", "on_train_end", "on_epoch_end"])
def test_at_on_epoch_end_ctx_metrics_holds_the_floats_the_history_holds(logged_at):
    seen: list[tuple[Any, Any]] = []

    class Logger(corolux.Callback):
        weight = 0

    setattr(Logger, logged_at, lambda self, ctx: ctx.log("norm", ctx.model.weight.detach().norm()))

    class Reader(corolux.Callback):
        weight = 1  # after the logger, at the default weight's neighbour

        def on_epoch_end(self, ctx):
            seen.append((ctx.metrics["norm"], ctx.history.records[-1]["norm"]))

    fit(2, callbacks=[Logger(), Reader()])
    assert len(seen) == 2
    for in_metrics, in_history in seen:
        assert type(in_metrics) is float and in_metrics == in_history


def test_log_from_the_consumer_of_run():
    x, y = iris()
    trainer = trainer_for()
    for event in trainer.run((x, y), epochs=2):
        if event.stage == "on_train_end":
            event.ctx.log("seen", event.ctx.epoch * 10)
    assert trainer.history["seen"] == [10, 20]


def test_log_value_visible_in_ctx_metrics_for_later_callbacks():
    got = []

    class Writer(corolux.Callback):
        weight = 0

        def on_train_end(self, ctx):
            ctx.log("custom", 1.5)

    class Reader(corolux.Callback):
        weight = 1

        def on_epoch_end(self, ctx):
            got.append(ctx.metrics.get("custom"))

    fit(2, callbacks=[Writer(), Reader()])
    assert got == [1.5, 1.5]


def test_key_error_lists_recorded_names():
    history = fit(1)
    with pytest.raises(KeyError) as info:
        history["valid_los"]
    message = str(info.value)
    for name in ("train_loss", "valid_loss", "train_acc", "valid_acc"):
        assert name in message


def test_trainer_history_is_the_latest_runs():
    x, y = iris()
    trainer = trainer_for()
    h1 = trainer.fit((x, y), epochs=2)
    assert trainer.history is h1
    h2 = trainer.fit((x, y), epochs=1)
    assert trainer.history is h2
    assert len(h1) == 2 and len(h2) == 1
    assert h1["epoch"] == [1, 2] and h2["epoch"] == [1]


def test_not_interrupted_after_a_normal_fit():
    assert fit(1).interrupted is False


class StopMidEpoch(corolux.Callback):
    """Stops the run at the second batch of epoch 2."""

    def on_train_batch_end(self, ctx):
        if ctx.epoch == 2 and ctx.iter == 2:
            ctx.stop_training()


def test_stopped_epoch_is_recorded_with_partial_metrics():
    history = fit(3, callbacks=[StopMidEpoch()])
    assert history["epoch"] == [1, 2]
    assert math.isfinite(history["train_loss"][1])
    assert math.isnan(history["valid_loss"][1])  # validation did not run in the stopped epoch


# -- how the run ended: stop_reason and completed_epochs (DESIGN section 10) ----------------------


def test_stop_reason_and_completed_epochs_default_to_a_run_not_yet_ended():
    history = corolux.History()
    assert history.stop_reason is None
    assert history.completed_epochs == 0
    assert "stop_reason" in corolux.History.__doc__ and "completed_epochs" in corolux.History.__doc__


def test_state_dict_round_trips_how_the_run_ended():
    history = corolux.History()
    history.append({"epoch": 1, "train_loss": 0.9})
    history.append({"epoch": 2, "train_loss": 0.5})
    history.stop_reason, history.completed_epochs, history.interrupted = "interrupted", 1, True
    state = history.state_dict()
    assert state["stop_reason"] == "interrupted" and state["completed_epochs"] == 1
    restored = corolux.History()
    restored.load_state_dict(state)
    assert (restored.stop_reason, restored.completed_epochs, restored.interrupted) == ("interrupted", 1, True)
    assert restored["train_loss"] == [0.9, 0.5]


def test_an_old_state_dict_without_them_still_loads():
    restored = corolux.History()
    restored.stop_reason, restored.completed_epochs = "nan", 5  # overwritten by the load
    restored.load_state_dict({"records": [{"epoch": 1, "train_loss": 0.9}], "interrupted": False})
    assert restored.stop_reason is None and restored.completed_epochs == 0
    assert len(restored) == 1


def test_repr_says_why_the_run_stopped_and_how_many_epochs_were_full():
    history = corolux.History()
    history.append({"epoch": 1, "train_loss": 0.9})
    assert repr(history) == "History(1 epochs; last: train_loss=0.9)"
    history.append({"epoch": 2, "train_loss": 0.5})
    history.stop_reason, history.completed_epochs = "early_stopping", 2
    assert repr(history) == "History(2 epochs, stopped: early_stopping; last: train_loss=0.5)"
    history.stop_reason, history.completed_epochs = "max_steps", 1  # the second epoch was cut short
    assert repr(history) == "History(2 epochs, stopped: max_steps (1 completed); last: train_loss=0.5)"
    history.stop_reason, history.interrupted = "interrupted", True
    assert repr(history).startswith("History(2 epochs, stopped: interrupted (1 completed);")
    history.stop_reason = None  # a history the trainer did not annotate keeps the old flag
    assert repr(history).startswith("History(2 epochs, interrupted;")


def test_a_run_to_its_end_has_no_stop_reason():
    history = fit(3)
    assert history.stop_reason is None
    assert history.completed_epochs == len(history) == 3
    assert "stopped" not in repr(history)


def test_a_stop_at_an_epochs_end_keeps_the_reason_and_counts_the_epoch():
    class GoodEnough(corolux.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                ctx.stop_training("good enough")

    history = fit(5, callbacks=[GoodEnough()])
    assert history.stop_reason == "good enough"
    assert history.completed_epochs == len(history) == 2
    assert "stopped: good enough;" in repr(history)


def test_an_epoch_cut_short_shows_as_more_records_than_completed_epochs():
    history = fit(3, callbacks=[StopMidEpoch()])
    assert history.stop_reason == "stopped"
    assert len(history) == 2 and history.completed_epochs == 1
    assert "(1 completed)" in repr(history)


def test_max_steps_is_a_stop_reason():
    x, y = iris()
    history = trainer_for().fit((x, y), epochs=5, max_steps=7)  # 5 batches an epoch
    assert history.stop_reason == "max_steps"
    assert len(history) == 2 and history.completed_epochs == 1


def test_each_run_records_its_own_ending():
    x, y = iris()
    trainer = trainer_for()
    first = trainer.fit((x, y), epochs=3, max_steps=2)
    second = trainer.fit((x, y), epochs=2)
    assert (first.stop_reason, first.completed_epochs) == ("max_steps", 0)
    assert (second.stop_reason, second.completed_epochs) == (None, 2)


def test_on_fit_end_sees_how_the_run_ended():
    seen = []

    class Look(corolux.Callback):
        def on_fit_end(self, ctx):
            seen.append((ctx.history.stop_reason, ctx.history.completed_epochs))

    fit(2, callbacks=[Look()])
    assert seen == [(None, 2)]


def test_evaluate_returns_a_logged_tensor_as_a_float():
    x, y = iris()
    at_end = corolux.callback(
        "at_end", on_valid_end=lambda self, ctx: ctx.log("norm", ctx.model.weight.norm())
    )()
    results = trainer_for().evaluate((x, y), callbacks=[at_end])
    assert type(results["norm"]) is float and type(results["loss"]) is float


def test_a_value_logged_before_the_epoch_ends_is_a_float_for_every_on_epoch_end_handler():
    seen: list[Any] = []

    class Early(corolux.Callback):
        weight = -200  # before the MetricsTracker writes the record

        def on_train_end(self, ctx):
            ctx.log("norm", ctx.model.weight.detach().norm())

        def on_epoch_end(self, ctx):
            seen.append(type(ctx.metrics["norm"]))

    fit(2, callbacks=[Early()])
    assert seen == [float, float]
