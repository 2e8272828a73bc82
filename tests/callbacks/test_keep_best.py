"""KeepBestModel: the model ends a fit with its best epoch's weights (after early stopping and
Ctrl-C too), kept on the CPU, and a resumed run restores the same ones."""

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
from corolux.callbacks.keep_best import KeepBestModel

F = torch.nn.functional
EPOCHS = 12


def make_trainer(seed: int = 0) -> corolux.Trainer:
    return digits_mlp_trainer(seed, lr=3e-2)


@pytest.fixture(scope="module")
def data():
    """A small MLP overfits 200 digits: the best validation epoch is not the last."""
    return overfitting_split()


class Weights(corolux.Callback):
    """Copies the model's weights at each epoch's end."""

    weight = 50

    def __init__(self) -> None:
        self.per_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, ctx):
        self.per_epoch[ctx.epoch] = {k: v.clone() for k, v in ctx.model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(data, callbacks, epochs=EPOCHS, seed=0):
    torch.manual_seed(1)
    trainer = make_trainer(seed)
    history = trainer.fit(data[0], epochs=epochs, valid_data=data[1], callbacks=callbacks)
    return trainer, history


def best_epoch(values, higher=False):
    pick = max if higher else min
    return 1 + values.index(pick(v for v in values if not math.isnan(v)))


# -- restores the best weights -------------------------------------------------------------------


def test_the_model_ends_with_the_weights_of_the_best_epoch(data):
    keep, weights = KeepBestModel(), Weights()
    trainer, history = fit(data, [keep, weights])
    losses = history["valid_loss"]
    best = best_epoch(losses)
    assert best < len(history)  # the last epoch is not the best: the test must see a restore
    assert keep.best_epoch == best and keep.best == min(losses)
    assert same(trainer.model.state_dict(), weights.per_epoch[best])
    assert not same(trainer.model.state_dict(), weights.per_epoch[len(history)])
    assert trainer.evaluate(data[1])["loss"] == pytest.approx(min(losses), rel=1e-5)


def test_mode_auto_on_accuracy_keeps_the_highest(data):
    keep, weights = KeepBestModel(monitor="valid_acc"), Weights()
    trainer, history = fit(data, [keep, weights])
    best = best_epoch(history["valid_acc"], higher=True)
    assert best != best_epoch(history["valid_acc"])  # the direction matters for this run
    assert keep.best_epoch == best and same(trainer.model.state_dict(), weights.per_epoch[best])


def test_min_delta_keeps_an_earlier_epoch(data):
    keep, weights = KeepBestModel(min_delta=0.05), Weights()
    trainer, history = fit(data, [keep, weights], epochs=(0, 14))
    losses, best, chosen = history["valid_loss"], None, None
    for epoch, value in enumerate(losses, start=1):
        if best is None or value < best - 0.05:
            best, chosen = value, epoch
    assert keep.best_epoch == chosen != best_epoch(losses)
    assert same(trainer.model.state_dict(), weights.per_epoch[chosen])


def test_the_copy_is_on_the_cpu_and_shares_no_memory_with_the_model(data):
    keep = KeepBestModel()
    trainer, _ = fit(data, [keep], epochs=(0, 2))
    params = {p.data_ptr() for p in trainer.model.parameters()}
    assert all(t.device.type == "cpu" for t in keep.best_state.values())
    assert not params & {t.data_ptr() for t in keep.best_state.values()}
    saved = {k: v.clone() for k, v in keep.best_state.items()}
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)
    assert same(keep.best_state, saved)


def test_restored_after_early_stopping(data):
    keep, weights, stop = KeepBestModel(), Weights(), EarlyStopping(patience=1)
    trainer, history = fit(data, [keep, weights, stop], epochs=(0, 30))
    assert history.stop_reason == "early_stopping"
    best = best_epoch(history["valid_loss"])
    assert best == len(history) - 2  # patience 1: two epochs without improvement
    assert same(trainer.model.state_dict(), weights.per_epoch[best])


def test_restored_after_ctrl_c(data):
    class CtrlC(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (10, 2):
                raise KeyboardInterrupt

    keep, weights = KeepBestModel(), Weights()
    with pytest.warns(RuntimeWarning, match="interrupted by Ctrl-C"):
        trainer, history = fit(data, [keep, weights, CtrlC()])
    assert history.interrupted and history.completed_epochs == 9
    best = best_epoch(history["valid_loss"][:9])
    assert best < 9 and keep.best_epoch == best  # epoch 10 (cut short) was not considered
    assert same(trainer.model.state_dict(), weights.per_epoch[best])


def test_an_exception_leaves_the_last_weights_and_the_best_in_best_state(data):
    class Boom(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (10, 2):
                raise RuntimeError("boom")

    keep, weights = KeepBestModel(), Weights()
    torch.manual_seed(1)
    trainer = make_trainer()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(data[0], epochs=EPOCHS, valid_data=data[1], callbacks=[keep, weights, Boom()])
    assert keep.best_epoch < 9
    assert not same(trainer.model.state_dict(), keep.best_state)  # not restored: on_fit_end did not run
    assert same(keep.best_state, weights.per_epoch[keep.best_epoch])


def test_epochs_without_the_value_are_not_considered(data):
    class SkipValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch >= 3:
                ctx.skip_validation()

    keep, weights = KeepBestModel(), Weights()
    trainer, history = fit(data, [SkipValidation(), keep, weights], epochs=(0, 5))
    assert math.isnan(history["valid_loss"][3])
    assert keep.best_epoch == best_epoch(history["valid_loss"][:2]) == 2
    assert same(trainer.model.state_dict(), weights.per_epoch[2])


def test_an_epoch_cut_short_by_a_stop_is_not_considered(data):
    class StopInside(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (4, 2):
                ctx.stop_training("time_limit")

    keep, weights = KeepBestModel(monitor="train_loss"), Weights()
    trainer, history = fit(data, [StopInside(), keep, weights])
    losses = history["train_loss"]
    assert len(losses) == 4 and history.completed_epochs == 3
    assert losses[3] < min(losses[:3])  # the partial epoch looks best: it must not be taken
    assert keep.best_epoch == 3 and same(trainer.model.state_dict(), weights.per_epoch[3])


def test_no_value_at_all_leaves_the_model_as_it_is(data):
    class SkipValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            ctx.skip_validation()

    keep, weights = KeepBestModel(), Weights()
    trainer, _ = fit(data, [SkipValidation(), keep, weights], epochs=(0, 2))
    assert keep.best_state is None and same(trainer.model.state_dict(), weights.per_epoch[2])


def test_a_new_fit_starts_fresh(data):
    keep = KeepBestModel()
    trainer, history = fit(data, [keep])
    first = keep.best
    history = trainer.fit(data[0], epochs=(0, 1), valid_data=data[1], callbacks=[keep])
    assert keep.best_epoch == 1 and keep.best == history["valid_loss"][0] != first


# -- resume ------------------------------------------------------------------------------------------


def test_a_resumed_run_restores_the_same_best_weights(data, tmp_path):
    ref_keep = KeepBestModel()
    ref, ref_history = fit(data, [ref_keep])
    best = ref_keep.best_epoch
    killed_after = best + 1  # the best epoch is before the kill: only the saved state knows it
    assert killed_after < len(ref_history)
    path = tmp_path / "auto.pt"
    with pytest.raises(SystemExit):
        fit(data, [AutoResume(path), KeepBestModel(), KillAt(killed_after + 1)])
    saved = checkpoint.read(path)["callbacks"]["KeepBestModel[valid_loss|auto]"]
    assert saved["best_epoch"] == best and same(saved["best_state"], ref_keep.best_state)
    torch.manual_seed(123)  # another process
    keep = KeepBestModel()
    trainer, history = fit(data, [AutoResume(path), keep], seed=7)
    assert history.to_dict() == ref_history.to_dict()
    assert keep.best_epoch == best
    assert same(trainer.model.state_dict(), ref.model.state_dict())
    assert same(trainer.model.state_dict(), ref_keep.best_state)


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "lowest"}, ValueError, r"mode must be one of \('auto', 'min', 'max'\), got 'lowest'"),
        ({"min_delta": -1}, ValueError, "min_delta must be a finite number >= 0, got -1"),
        ({"min_delta": "0"}, ValueError, "min_delta must be a finite number >= 0, got '0'"),
        ({"monitor": ""}, TypeError, "monitor must be a history name such as 'valid_loss', got ''"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=f"KeepBestModel: {match}"):
        KeepBestModel(**kwargs)


def test_an_unknown_monitor_fails_at_the_first_epoch_end(data):
    with pytest.raises(
        ValueError, match="KeepBestModel: unknown monitor 'valid_accuracy'; did you mean 'valid_acc'"
    ):
        fit(data, [KeepBestModel(monitor="valid_accuracy")])
