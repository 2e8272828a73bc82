"""CSVLogger: rows per epoch and phase from real training runs, appended and flushed every epoch,
one atomic rewrite when a metric appears later, and resumed runs that keep the completed epochs'
rows (dropping what a killed run left after them)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import pytest
import torch
from kill import KillAt
from realdata import digits, iris, linear_trainer

import corolux
from corolux.callbacks import AutoResume
from corolux.callbacks.csv_logger import CSVLogger

F = torch.nn.functional


make_trainer = linear_trainer


def data() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = iris()
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:120], y[:120]), (x[120:], y[120:])


def read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def fit(trainer: corolux.Trainer, callbacks: list, epochs: int = 3, **kwargs) -> corolux.History:
    train, valid = data()
    kwargs.setdefault("valid_data", valid)
    return trainer.fit(train, epochs=epochs, batch_size=32, callbacks=callbacks, **kwargs)


class Crash(corolux.Callback):
    """Raises at ``on_epoch_end`` of ``epoch``: after the CSVLogger (50) wrote that epoch's rows,
    before AutoResume (inf) saved it, as a kill there would."""

    weight = 60

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("killed")


# -- rows ------------------------------------------------------------------------------------------


def test_one_row_per_epoch_and_phase_with_the_history_values(tmp_path):
    path = tmp_path / "metrics.csv"
    history = fit(make_trainer(), [CSVLogger(path)])
    header, rows = read(path)
    assert header == ["epoch", "phase", "loss", "acc"]
    assert [(r["epoch"], r["phase"]) for r in rows] == [
        (str(e), p) for e in (1, 2, 3) for p in ("train", "valid")
    ]
    for row in rows:
        i = int(row["epoch"]) - 1
        for metric in ("loss", "acc"):  # full precision: the history's floats exactly
            assert float(row[metric]) == history[f"{row['phase']}_{metric}"][i]


def test_custom_logged_names_keep_their_name_in_the_train_row(tmp_path):
    class LogLR(corolux.Callback):  # weight 0 at on_epoch_end: before the logger (50)
        def on_epoch_end(self, ctx):
            ctx.log("lr", ctx.opt.param_groups[0]["lr"] * ctx.epoch)

    path = tmp_path / "m.csv"
    fit(make_trainer(), [CSVLogger(path), LogLR()])
    header, rows = read(path)
    assert header == ["epoch", "phase", "loss", "acc", "lr"]
    assert [r["lr"] for r in rows if r["phase"] == "train"] == ["0.1", "0.2", "0.30000000000000004"]
    assert [r["lr"] for r in rows if r["phase"] == "valid"] == ["", "", ""]


def test_a_phase_that_did_not_run_has_no_row(tmp_path):
    class SkipSecondValidation(corolux.Callback):
        def on_epoch_begin(self, ctx):
            if ctx.epoch == 2:
                ctx.skip_validation()

    path = tmp_path / "m.csv"
    fit(make_trainer(), [CSVLogger(path), SkipSecondValidation()])
    assert [(r["epoch"], r["phase"]) for r in read(path)[1]] == [
        ("1", "train"),
        ("1", "valid"),
        ("2", "train"),
        ("3", "train"),
        ("3", "valid"),
    ]
    no_valid = tmp_path / "train_only.csv"
    fit(make_trainer(), [CSVLogger(no_valid)], epochs=2, valid_data=None)
    assert [(r["epoch"], r["phase"]) for r in read(no_valid)[1]] == [("1", "train"), ("2", "train")]


def test_each_epoch_is_appended_and_flushed_never_rewritten(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    replaced: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(dst), real_replace(src, dst)))
    seen: list[tuple[int, bytes]] = []

    class ReadBack(corolux.Callback):
        weight = 70  # after the logger, at the same on_epoch_end: is this epoch on disk?

        def on_epoch_end(self, ctx):
            seen.append((path.stat().st_ino, path.read_bytes()))

    fit(make_trainer(), [CSVLogger(path), ReadBack()], epochs=4)
    assert replaced == []  # the columns never changed: no rewrite
    assert len({ino for ino, _ in seen}) == 1  # the same file throughout
    contents = [content for _, content in seen]
    assert [c.count(b"\n") for c in contents] == [3, 5, 7, 9]  # header + 2 rows per epoch, flushed
    for before, after in zip(contents, contents[1:], strict=False):
        assert after.startswith(before)  # appended


def test_a_metric_that_appears_later_widens_the_header_in_one_atomic_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    replaced: list[tuple[str, str]] = []
    fsynced: list[int] = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda s, d: (replaced.append((s, d)), real_replace(s, d)))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))

    class LateMetrics(corolux.Callback):
        def on_train_end(self, ctx):
            if ctx.epoch >= 2:
                ctx.log("train_grad_norm", 1.5)  # -> column "grad_norm"
            if ctx.epoch >= 4:
                ctx.log("lr", 0.1)

        def on_valid_end(self, ctx):
            if ctx.epoch >= 2:
                ctx.log("valid_f1", 0.25)  # same epoch as grad_norm: the same single rewrite

    inodes = []

    class Inode(corolux.Callback):
        weight = 70

        def on_epoch_end(self, ctx):
            inodes.append(path.stat().st_ino)

    history = fit(make_trainer(), [CSVLogger(path), LateMetrics(), Inode()], epochs=5)
    header, rows = read(path)
    assert header == ["epoch", "phase", "loss", "acc", "grad_norm", "f1", "lr"]
    assert len(replaced) == 2  # epoch 2 (grad_norm and f1 at once) and epoch 4 (lr); none after
    assert [inodes[i] != inodes[i - 1] for i in range(1, 5)] == [True, False, True, False]
    assert all(Path(src).parent == tmp_path and Path(dst) == path for src, dst in replaced)
    assert len(fsynced) >= 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv"]  # no temporary file left
    by = {(r["epoch"], r["phase"]): r for r in rows}
    assert by["1", "train"]["grad_norm"] == "" and by["1", "valid"]["f1"] == ""  # earlier rows: empty
    assert by["2", "train"]["grad_norm"] == "1.5" and by["2", "valid"]["f1"] == "0.25"
    assert by["2", "valid"]["grad_norm"] == "" and by["3", "train"]["lr"] == ""
    assert by["5", "train"]["lr"] == "0.1"
    assert float(by["1", "train"]["loss"]) == history["train_loss"][0]  # kept through the rewrites


def test_the_rows_are_on_disk_before_a_weight_inf_callback_stops_training(tmp_path):
    path = tmp_path / "m.csv"

    class StopAfterTwo(corolux.Callback):  # where EarlyStopping runs
        weight = float("inf")

        def on_epoch_end(self, ctx):
            self.rows = read(path)[1]
            if ctx.epoch == 2:
                ctx.emit("on_early_stopping")
                ctx.stop_training("early_stopping")

    stopper = StopAfterTwo()
    history = fit(make_trainer(), [stopper, CSVLogger(path)], epochs=5)  # listed first, still after it
    assert history.stop_reason == "early_stopping"
    assert [(r["epoch"], r["phase"]) for r in stopper.rows][-2:] == [("2", "train"), ("2", "valid")]
    assert 0 < CSVLogger.weight < float("inf")


def test_with_the_real_early_stopping_the_stopping_epoch_has_its_rows(tmp_path):
    from corolux.callbacks.early_stopping import EarlyStopping

    path = tmp_path / "m.csv"
    history = fit(
        make_trainer(), [EarlyStopping(monitor="valid_loss", min_delta=10.0), CSVLogger(path)], epochs=(0, 9)
    )
    assert history.stop_reason == "early_stopping" and len(history) < 9
    assert [r["epoch"] for r in read(path)[1]][-2:] == [str(len(history))] * 2


def test_a_fresh_fit_starts_a_new_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("old,contents\n1,2\n")
    trainer = make_trainer()
    fit(trainer, [CSVLogger(path)], epochs=2)
    fit(trainer, [CSVLogger(path)], epochs=1)  # a new run of the same trainer: a new file
    assert [(r["epoch"], r["phase"]) for r in read(path)[1]] == [("1", "train"), ("1", "valid")]


# -- resume ------------------------------------------------------------------------------------------


def test_a_killed_run_resumed_by_autoresume_gives_the_file_of_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole.csv"
    fit(make_trainer(), [CSVLogger(whole)], epochs=5)

    path, state = tmp_path / "m.csv", tmp_path / "state.pt"
    with pytest.raises(RuntimeError, match="killed"):
        fit(make_trainer(), [CSVLogger(path), AutoResume(state), Crash(epoch=3)], epochs=5)
    assert [r["epoch"] for r in read(path)[1]][-2:] == ["3", "3"]  # epoch 3's rows, not in the checkpoint
    with open(path, "a") as f:
        f.write("4,tra")  # and a torn line, as a kill while writing leaves
    history = fit(make_trainer(), [CSVLogger(path), AutoResume(state)], epochs=5)
    assert history["epoch"] == [1, 2, 3, 4, 5]  # resumed (bit-identical, so the values match too)
    assert path.read_text() == whole.read_text()
    assert not state.exists()


def test_resume_from_a_checkpoint_appends_after_the_completed_epochs(tmp_path):
    path, ckpt = tmp_path / "m.csv", tmp_path / "ckpt.pt"
    trainer = make_trainer()
    fit(trainer, [CSVLogger(path)], epochs=2)
    trainer.save_checkpoint(ckpt)
    first = path.read_bytes()
    ino = path.stat().st_ino
    fit(make_trainer(), [CSVLogger(path)], epochs=4, resume_from=ckpt)
    assert path.read_bytes().startswith(first)  # the rows of epochs 1-2 as they were, then 3-4
    assert path.stat().st_ino == ino  # nothing to drop: appended, not rewritten
    assert [r["epoch"] for r in read(path)[1]] == ["1", "1", "2", "2", "3", "3", "4", "4"]
    fit(trainer, [CSVLogger(path)], epochs=3, resume_from="last")  # trainer's own run: epochs 1-2 then 3
    assert [r["epoch"] for r in read(path)[1]] == ["1", "1", "2", "2", "3", "3"]


def test_a_resumed_run_whose_file_is_gone_writes_the_completed_epochs_from_the_history(tmp_path):
    whole = tmp_path / "whole.csv"
    fit(make_trainer(), [CSVLogger(whole)], epochs=3)
    path, ckpt = tmp_path / "m.csv", tmp_path / "ckpt.pt"
    trainer = make_trainer()
    fit(trainer, [CSVLogger(path)], epochs=2)
    trainer.save_checkpoint(ckpt)
    path.unlink()
    fit(make_trainer(), [CSVLogger(path)], epochs=3, resume_from=ckpt)
    assert path.read_text() == whole.read_text()


def test_resume_refuses_to_append_to_a_file_that_is_not_its_own(tmp_path):
    path, ckpt = tmp_path / "m.csv", tmp_path / "ckpt.pt"
    trainer = make_trainer()
    fit(trainer, [], epochs=1)
    trainer.save_checkpoint(ckpt)
    path.write_text("name,score\nann,3\n")
    with pytest.raises(ValueError, match="not a CSVLogger file"):
        fit(make_trainer(), [CSVLogger(path)], epochs=2, resume_from=ckpt)
    assert path.read_text() == "name,score\nann,3\n"


# -- where it writes -------------------------------------------------------------------------------


def test_only_the_main_process_writes_and_missing_folders_are_created(tmp_path):
    class NotRankZero(corolux.Callback):
        weight = -1000

        def setup(self, ctx):
            ctx.is_main_process = False

    quiet = tmp_path / "rank1" / "m.csv"
    fit(make_trainer(), [CSVLogger(quiet), NotRankZero()], epochs=1)
    assert not quiet.parent.exists()
    nested = tmp_path / "a" / "b" / "m.csv"
    fit(make_trainer(), [CSVLogger(nested)], epochs=1)
    assert len(read(nested)[1]) == 2


def test_the_file_is_closed_when_training_fails(tmp_path):
    path = tmp_path / "m.csv"
    logger = CSVLogger(path)
    with pytest.raises(RuntimeError, match="killed"):
        fit(make_trainer(), [logger, Crash(epoch=2)], epochs=3)
    assert logger._file is None
    assert [r["epoch"] for r in read(path)[1]] == ["1", "1", "2", "2"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="path must be a file path"):
        CSVLogger(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is a folder"):
        CSVLogger(os.getcwd())


def test_nan_values_are_written_as_nan(tmp_path):
    class LogNaN(corolux.Callback):
        def on_valid_end(self, ctx):
            ctx.log("valid_score", math.nan)

    path = tmp_path / "m.csv"
    fit(make_trainer(), [CSVLogger(path), LogNaN()], epochs=1)
    (valid,) = [r for r in read(path)[1] if r["phase"] == "valid"]
    assert valid["score"] == "nan"


def test_a_logged_name_that_takes_a_metric_column_is_left_out_with_a_warning(tmp_path):
    class LogLoss(corolux.Callback):
        def on_epoch_end(self, ctx):
            ctx.log("loss", 123.0)

    path = tmp_path / "m.csv"
    with pytest.warns(RuntimeWarning, match="'loss' has the name of the train_loss metric's column"):
        history = fit(make_trainer(), [CSVLogger(path), LogLoss()], epochs=2)
    header, rows = read(path)
    assert header == ["epoch", "phase", "loss", "acc"]
    assert [float(r["loss"]) for r in rows if r["phase"] == "train"] == history["train_loss"]


def test_a_torn_last_line_is_dropped_on_resume_not_glued_to_the_next_row(tmp_path):
    x, y = digits()
    path, resume = tmp_path / "log.csv", tmp_path / "resume.pt"

    def trainer():
        torch.manual_seed(0)
        return corolux.Trainer(
            torch.nn.Linear(64, 10), loss_fn=torch.nn.functional.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu", progress=False,
        )  # fmt: skip

    with pytest.raises(SystemExit):
        trainer().fit(
            (x[:256], y[:256]), epochs=4, callbacks=[CSVLogger(path), AutoResume(resume), KillAt(3, 2)]
        )
    whole = path.read_text()
    path.write_text(whole + "1")  # a kill cut the next row ("11,train,...") after its first character
    trainer().fit((x[:256], y[:256]), epochs=4, callbacks=[CSVLogger(path), AutoResume(resume)])
    rows = path.read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [[str(e), "train"] for e in (1, 2, 3, 4)]
