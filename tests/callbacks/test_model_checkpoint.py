"""ModelCheckpoint: file names (templates, folders), what a file holds and when it is written,
save_best_only, keep_last (delete only its own files, only after the new one is whole), resume,
bad input; and the interplay of EarlyStopping, ModelCheckpoint and KeepBestModel."""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from kill import KillAt
from realdata import digits_mlp_trainer, overfitting_split

import corolux
from corolux import checkpoint
from corolux.callbacks import AutoResume
from corolux.callbacks.early_stopping import EarlyStopping
from corolux.callbacks.keep_best import KeepBestModel
from corolux.callbacks.model_checkpoint import ModelCheckpoint

F = torch.nn.functional
EPOCHS = 6


def make_trainer(seed: int = 0) -> corolux.Trainer:
    return digits_mlp_trainer(seed, lr=3e-2)


@pytest.fixture(scope="module")
def data():
    """A small MLP overfits 200 digits: valid_loss goes down, then up and down."""
    return overfitting_split()


def fit(data, callbacks, epochs=EPOCHS, seed=0, valid=True):
    torch.manual_seed(1)
    trainer = make_trainer(seed)
    history = trainer.fit(data[0], epochs=epochs, valid_data=data[1] if valid else None, callbacks=callbacks)
    return trainer, history


class Weights(corolux.Callback):
    """Copies the model's weights at each epoch's end."""

    weight = 50

    def __init__(self) -> None:
        self.per_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, ctx):
        self.per_epoch[ctx.epoch] = {k: v.clone() for k, v in ctx.model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# -- file names --------------------------------------------------------------------------------------


def test_a_template_names_each_file_by_epoch_and_metrics(data, tmp_path):
    ckpt, weights = ModelCheckpoint(tmp_path / "ckpt" / "epoch{epoch:02d}-{valid_loss:.3f}.pt"), Weights()
    _, history = fit(data, [ckpt, weights])
    want = [f"epoch{e:02d}-{v:.3f}.pt" for e, v in zip(history["epoch"], history["valid_loss"], strict=True)]
    assert names(tmp_path / "ckpt") == want  # the missing folder was created
    assert ckpt.files == [str(tmp_path / "ckpt" / name) for name in want] and ckpt.last_path == ckpt.files[-1]
    for epoch, file in enumerate(ckpt.files, start=1):
        state = torch.load(file, weights_only=True)  # a plain, safe file
        assert state["counters"]["epoch"] == epoch == state["counters"]["completed_epochs"]
        assert same(state["model"], weights.per_epoch[epoch])


def test_a_template_may_use_any_recorded_name_and_the_history_values(data, tmp_path):
    ckpt = ModelCheckpoint(str(tmp_path / "{valid_acc:.4f}_{train_loss:.2f}_{epoch}.pt"))
    _, history = fit(data, [ckpt], epochs=(0, 2))
    assert names(tmp_path) == sorted(
        f"{a:.4f}_{t:.2f}_{e}.pt"
        for e, a, t in zip(history["epoch"], history["valid_acc"], history["train_loss"], strict=True)
    )


@pytest.mark.parametrize("as_str", [True, False])
def test_an_existing_folder_gets_numbered_files(data, tmp_path, as_str):
    ckpt = ModelCheckpoint(str(tmp_path) if as_str else tmp_path)
    fit(data, [ckpt], epochs=(0, 3))
    assert names(tmp_path) == ["epoch001.pt", "epoch002.pt", "epoch003.pt"]


def test_a_path_ending_in_a_slash_is_a_folder_that_is_created(data, tmp_path):
    ckpt = ModelCheckpoint(f"{tmp_path}/new/deeper/")
    fit(data, [ckpt], epochs=(0, 2))
    assert names(tmp_path / "new" / "deeper") == ["epoch001.pt", "epoch002.pt"]
    ckpt = ModelCheckpoint(tmp_path / "plain")  # not a folder and no slash: one file, overwritten
    fit(data, [ckpt], epochs=(0, 2))
    assert (tmp_path / "plain").is_file() and ckpt.files == [str(tmp_path / "plain")]


def test_a_metric_missing_this_epoch_formats_as_nan(data, tmp_path):
    class SkipValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 2:
                ctx.skip_validation()

    ckpt = ModelCheckpoint(tmp_path / "e{epoch}-{valid_loss:.2f}.pt")
    _, history = fit(data, [SkipValidation(), ckpt], epochs=(0, 2))
    assert names(tmp_path) == [f"e1-{history['valid_loss'][0]:.2f}.pt", "e2-nan.pt"]


# -- what a file holds and when it is written ----------------------------------------------------------


def test_the_file_is_written_after_every_epoch_end_handler(data, tmp_path):
    class LateLogger(corolux.Callback):
        weight = 1000

        def on_epoch_end(self, ctx):
            ctx.log("late", float(ctx.epoch))

    stop = EarlyStopping(monitor="train_loss", patience=0, baseline=0.0)  # stops at epoch 1
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}.pt")
    _, history = fit(data, [ckpt, LateLogger(), stop])
    assert history.stop_reason == "early_stopping" and len(history) == 1
    state = checkpoint.read(tmp_path / "e1.pt")
    assert state["history"]["records"][0]["late"] == 1.0  # a handler of weight 1000 ran before the save
    assert state["callbacks"]["EarlyStopping[train_loss|auto]"]["stopped_epoch"] == 1  # and one of weight inf


def test_a_file_resumes_the_run_exactly(data, tmp_path):
    ref, ref_history = fit(data, [ModelCheckpoint(tmp_path / "e{epoch}.pt")])
    torch.manual_seed(123)
    trainer = make_trainer(seed=7)
    history = trainer.fit(
        data[0],
        epochs=EPOCHS,
        valid_data=data[1],
        callbacks=[ModelCheckpoint(tmp_path / "again{epoch}.pt")],
        resume_from=tmp_path / "e3.pt",
    )
    assert history.to_dict() == ref_history.to_dict()
    assert same(trainer.model.state_dict(), ref.model.state_dict())
    other = make_trainer(seed=3)
    other.load_checkpoint(tmp_path / "e6.pt")
    assert same(other.model.state_dict(), ref.model.state_dict())


def test_an_epoch_cut_short_is_not_saved(data, tmp_path):
    class StopInside(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (3, 2):
                ctx.stop_training("time_limit")

    ckpt = ModelCheckpoint(tmp_path)
    _, history = fit(data, [StopInside(), ckpt])
    assert len(history) == 3 and history.completed_epochs == 2
    assert names(tmp_path) == ["epoch001.pt", "epoch002.pt"]


def test_only_the_main_process_writes(data, tmp_path):
    class OtherRank(corolux.Callback):
        weight = -1000

        def setup(self, ctx):
            ctx.is_main_process = False

    ckpt = ModelCheckpoint(tmp_path / "out")
    fit(data, [OtherRank(), ckpt], epochs=(0, 2))
    assert not (tmp_path / "out").exists()  # its state is every rank's; the files are rank 0's


# -- save_best_only ------------------------------------------------------------------------------------


def improving_epochs(values, higher=False, min_delta=0.0):
    best, epochs = None, []
    for epoch, value in enumerate(values, start=1):
        if math.isnan(value):
            continue
        if best is None or (value > best + min_delta if higher else value < best - min_delta):
            best = value
            epochs.append(epoch)
    return epochs


@pytest.mark.parametrize(
    ("monitor", "higher", "min_delta"),
    [("valid_loss", False, 0.0), ("valid_acc", True, 0.0), ("valid_loss", False, 0.1)],
)
def test_save_best_only_writes_the_improving_epochs(data, tmp_path, monitor, higher, min_delta):
    weights = Weights()
    ckpt = ModelCheckpoint(tmp_path, monitor=monitor, save_best_only=True, min_delta=min_delta)
    _, history = fit(data, [ckpt, weights], epochs=(0, 10))
    want = improving_epochs(history[monitor], higher, min_delta)
    assert 1 < len(want) < 9  # some epochs improve, some do not
    assert want[0] == 1  # the first epoch always counts as an improvement (luz #39)
    assert names(tmp_path) == [f"epoch{e:03d}.pt" for e in want]
    assert ckpt.best == history[monitor][want[-1] - 1]
    assert ckpt.best_path == str(tmp_path / f"epoch{want[-1]:03d}.pt")
    assert same(checkpoint.read(ckpt.best_path)["model"], weights.per_epoch[want[-1]])


def test_save_best_only_into_one_file_keeps_the_best(data, tmp_path):
    ckpt, weights = ModelCheckpoint(tmp_path / "best.pt", save_best_only=True, keep_last=1), Weights()
    _, history = fit(data, [ckpt, weights], epochs=(0, 10))
    best = improving_epochs(history["valid_loss"])[-1]
    assert best < 10 and names(tmp_path) == ["best.pt"]  # keep_last=1 never deletes the file just written
    assert same(checkpoint.read(tmp_path / "best.pt")["model"], weights.per_epoch[best])
    assert ckpt.files == [str(tmp_path / "best.pt")]


def test_without_validation_the_default_monitor_is_not_needed_unless_asked_for(data, tmp_path):
    ckpt = ModelCheckpoint(f"{tmp_path}/a/")
    fit(data, [ckpt], epochs=(0, 2), valid=False)
    assert names(tmp_path / "a") == ["epoch001.pt", "epoch002.pt"] and ckpt.best is None
    with pytest.raises(
        ValueError, match="ModelCheckpoint: unknown monitor 'valid_loss'; this run has no validation"
    ):
        fit(data, [ModelCheckpoint(f"{tmp_path}/b/", save_best_only=True)], epochs=(0, 2), valid=False)
    ckpt = ModelCheckpoint(f"{tmp_path}/c/", monitor="train_loss", save_best_only=True)
    _, history = fit(data, [ckpt], epochs=(0, 3), valid=False)
    assert len(ckpt.files) == len(improving_epochs(history["train_loss"]))


# -- keep_last -----------------------------------------------------------------------------------------


def test_keep_last_keeps_the_newest_files_and_never_a_foreign_one(data, tmp_path):
    (tmp_path / "epoch001.pt").write_bytes(b"not mine")  # same name: overwritten, then it is its own
    (tmp_path / "notes.pt").write_bytes(b"not mine")
    ckpt = ModelCheckpoint(tmp_path, keep_last=2)
    fit(data, [ckpt])
    assert names(tmp_path) == ["epoch005.pt", "epoch006.pt", "notes.pt"]
    assert (tmp_path / "notes.pt").read_bytes() == b"not mine"
    assert ckpt.files == [str(tmp_path / "epoch005.pt"), str(tmp_path / "epoch006.pt")]
    assert (
        checkpoint.read(tmp_path / "epoch006.pt")["callbacks"]["ModelCheckpoint[valid_loss|all]"]["files"]
        == ckpt.files
    )


def test_keep_last_deletes_only_once_the_new_file_is_written(data, tmp_path, monkeypatch):
    removed = []
    real_remove = os.remove

    def remove(path, *args, **kwargs):
        newest = ckpt.files[-1]
        assert os.path.exists(newest) and checkpoint.read(newest)  # whole before any deletion
        removed.append(os.path.basename(path))
        real_remove(path, *args, **kwargs)

    real_save = checkpoint.save

    def save(ctx, path):
        if ctx.epoch == 4:
            raise OSError("disk full")
        return real_save(ctx, path)

    ckpt = ModelCheckpoint(tmp_path, keep_last=2)
    monkeypatch.setattr(os, "remove", remove)
    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(OSError, match="disk full"):
        fit(data, [ckpt])
    assert removed == ["epoch001.pt"]  # at epoch 3; nothing at the failed epoch 4
    assert names(tmp_path) == ["epoch002.pt", "epoch003.pt"]
    assert ckpt.files == [str(tmp_path / f"epoch00{e}.pt") for e in (2, 3)]  # as before the failure


def test_a_resumed_run_goes_on_deleting_the_files_of_the_first(data, tmp_path):
    folder, path = tmp_path / "ckpt", tmp_path / "auto.pt"
    folder.mkdir()
    with pytest.raises(SystemExit):
        fit(data, [ModelCheckpoint(folder, keep_last=3), AutoResume(path), KillAt(4)])
    assert names(folder) == ["epoch001.pt", "epoch002.pt", "epoch003.pt"]
    ckpt = ModelCheckpoint(folder, keep_last=3)
    _, history = fit(data, [ckpt, AutoResume(path)], seed=5)
    assert history["epoch"] == [1, 2, 3, 4, 5, 6] and history.completed_epochs == 6
    assert names(folder) == ["epoch004.pt", "epoch005.pt", "epoch006.pt"]


# -- together with EarlyStopping and KeepBestModel -------------------------------------------------------


def test_early_stopping_checkpoints_and_best_model_together(data, tmp_path):
    stop, keep, weights = EarlyStopping(patience=2), KeepBestModel(), Weights()
    every = ModelCheckpoint(tmp_path / "all" / "e{epoch:02d}.pt", keep_last=2)
    best = ModelCheckpoint(tmp_path / "best" / "e{epoch:02d}-{valid_loss:.4f}.pt", save_best_only=True)
    trainer, history = fit(data, [stop, every, best, keep, weights], epochs=(0, 30))
    losses = history["valid_loss"]
    n = len(history)
    assert history.stop_reason == "early_stopping" and n == stop.stopped_epoch < 30
    best_epoch = 1 + losses.index(min(losses))
    assert best_epoch == n - 3 == keep.best_epoch  # patience 2: three epochs without improvement
    assert names(tmp_path / "all") == [f"e{n - 1:02d}.pt", f"e{n:02d}.pt"]  # the stop epoch is saved
    assert names(tmp_path / "best")[-1] == f"e{best_epoch:02d}-{min(losses):.4f}.pt"
    assert best.best_path.endswith(names(tmp_path / "best")[-1]) and best.best == stop.best == keep.best
    assert same(trainer.model.state_dict(), weights.per_epoch[best_epoch])  # restored
    assert same(checkpoint.read(best.best_path)["model"], trainer.model.state_dict())
    last = checkpoint.read(every.last_path)
    assert same(last["model"], weights.per_epoch[n])  # the last file has the last weights
    assert last["callbacks"]["EarlyStopping[valid_loss|auto]"]["stopped_epoch"] == n
    assert same(
        last["callbacks"]["KeepBestModel[valid_loss|auto]"]["best_state"], weights.per_epoch[best_epoch]
    )


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"path": 3},
            TypeError,
            "path must be a file-name template such as 'ckpt/epoch{epoch:02d}.pt' or a folder, got int 3",
        ),
        ({"path": ""}, ValueError, "path is empty"),
        ({"keep_last": 0}, ValueError, "keep_last must be an integer >= 1 or None, got 0"),
        ({"keep_last": True}, ValueError, "keep_last must be an integer >= 1 or None, got True"),
        ({"save_best_only": "yes"}, TypeError, "save_best_only must be True or False, got 'yes'"),
        ({"mode": "up"}, ValueError, "mode must be one of"),
        ({"min_delta": -1}, ValueError, "min_delta must be a finite number >= 0, got -1"),
        ({"path": "ckpt/{epoch"}, ValueError, "the path template 'ckpt/{epoch' is malformed"),
        (
            {"path": "ckpt/{}.pt"},
            ValueError,
            "the path template 'ckpt/{}.pt' has a positional field {}; name",
        ),
        (
            {"path": "ckpt/{0:02d}.pt"},
            ValueError,
            "the path template 'ckpt/{0:02d}.pt' has a positional field {0}",
        ),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    kwargs.setdefault("path", "ckpt/")
    with pytest.raises(error, match=re.escape(f"ModelCheckpoint: {match}")):
        ModelCheckpoint(**kwargs)


def test_a_template_naming_an_unknown_name_fails_at_the_first_save_with_the_names(data, tmp_path):
    ckpt = ModelCheckpoint(tmp_path / "e{epoch}-{val_loss:.3f}.pt")
    with pytest.raises(
        ValueError, match="names 'val_loss', which this run does not record; did you mean 'valid_loss'"
    ) as info:
        fit(data, [ckpt])
    assert "available: epoch, train_acc, train_loss, valid_acc, valid_loss" in str(info.value)
    assert names(tmp_path) == [] and ckpt.files == []


def test_a_template_whose_format_does_not_fit_the_value_says_so(data, tmp_path):
    with pytest.raises(ValueError, match=r"cannot format the path template .* at epoch 1: .*epoch=1"):
        fit(data, [ModelCheckpoint(tmp_path / "e{epoch:.3s}.pt")])


def test_keep_last_after_a_resume_never_deletes_the_files_of_another_path(data, tmp_path):
    first, second = tmp_path / "run1", tmp_path / "run2"
    fit(data, [ModelCheckpoint(f"{first}/", keep_last=2)], epochs=4)
    kept = sorted(p.name for p in first.iterdir())
    assert kept == ["epoch003.pt", "epoch004.pt"]
    trainer = make_trainer()
    trainer.fit(
        data[0],
        epochs=6,
        valid_data=data[1],
        callbacks=[ModelCheckpoint(f"{second}/", keep_last=2)],
        resume_from=first / "epoch004.pt",
    )
    assert sorted(p.name for p in first.iterdir()) == kept  # the file resumed from is still there
    assert sorted(p.name for p in second.iterdir()) == ["epoch005.pt", "epoch006.pt"]


def test_two_checkpoints_keep_their_own_state_in_whatever_order_they_come_back(data, tmp_path):
    path = tmp_path / "auto.pt"

    def pair():
        return (
            ModelCheckpoint(f"{tmp_path}/all/", keep_last=2),
            ModelCheckpoint(f"{tmp_path}/best/", monitor="valid_acc", save_best_only=True),
        )

    every, best = pair()
    with pytest.raises(SystemExit):
        fit(data, [every, best, AutoResume(path), KillAt(3, 1)])
    best_before = best.best
    every, best = pair()
    fit(data, [best, every, AutoResume(path)])  # given in the other order
    assert best.best >= best_before and best.best <= 1.0  # an accuracy, not the other's loss
    assert best.best_path is not None and best.best_path.startswith(f"{tmp_path}/best/")
    assert os.path.exists(best.best_path)
    assert all(f.startswith(f"{tmp_path}/all/") for f in every.files)
