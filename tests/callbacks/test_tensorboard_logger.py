"""TensorBoardLogger: scalars and histograms read back from the event files of real training runs
(tensorboard's EventAccumulator), a resumed run without duplicated epochs, the writer closed in
every outcome, and a clear ImportError without tensorboard."""

from __future__ import annotations

import sys

import pytest
import torch
from realdata import iris, linear_trainer

import corolux
from corolux.callbacks import AutoResume
from corolux.callbacks.tensorboard_logger import TensorBoardLogger

F = torch.nn.functional


@pytest.fixture
def accumulator():
    """Reads a logdir back: ``read(logdir) -> EventAccumulator`` (skips without tensorboard)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(logdir):
        acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
        acc.Reload()
        return acc

    return read


make_trainer = linear_trainer


def fit(trainer: corolux.Trainer, callbacks: list, epochs: int = 3, **kwargs) -> corolux.History:
    x, y = iris()
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return trainer.fit(
        (x[:120], y[:120]),
        epochs=epochs,
        valid_data=(x[120:], y[120:]),
        batch_size=32,
        callbacks=callbacks,
        **kwargs,
    )


def scalars(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def as_float32(values: list[float]) -> list[float]:
    return torch.tensor(values, dtype=torch.float32).tolist()  # event files hold float32


class Crash(corolux.Callback):
    """Raises at ``on_epoch_end`` of ``epoch``, after the logger (50) wrote it, before AutoResume saved it."""

    weight = 60

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            raise RuntimeError("killed")


def test_scalars_per_epoch_tagged_by_phase(tmp_path, accumulator):
    class LogLR(corolux.Callback):
        def on_epoch_end(self, ctx):
            ctx.log("lr", 0.1 * ctx.epoch)

    history = fit(make_trainer(), [TensorBoardLogger(tmp_path), LogLR()])
    acc = accumulator(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["lr", "train/acc", "train/loss", "valid/acc", "valid/loss"]
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        phase, metric = name.split("_")
        assert scalars(acc, f"{phase}/{metric}") == list(
            zip([1, 2, 3], as_float32(history[name]), strict=True)
        )
    assert scalars(acc, "lr") == list(zip([1, 2, 3], as_float32([0.1, 0.2, 0.3]), strict=True))
    assert acc.Tags()["histograms"] == []


def test_parameter_histograms_all_or_by_name(tmp_path, accumulator):
    trainer = make_trainer()
    fit(trainer, [TensorBoardLogger(tmp_path / "all", histograms=True)], epochs=2)
    acc = accumulator(tmp_path / "all")
    assert sorted(acc.Tags()["histograms"]) == ["params/bias", "params/weight"]
    (last,) = [h for h in acc.Histograms("params/weight") if h.step == 2]
    weight = trainer.model.weight.detach()
    assert last.histogram_value.num == weight.numel()
    assert last.histogram_value.min == pytest.approx(weight.min().item())
    assert last.histogram_value.max == pytest.approx(weight.max().item())

    fit(make_trainer(), [TensorBoardLogger(tmp_path / "one", histograms={"bias"})], epochs=1)
    assert accumulator(tmp_path / "one").Tags()["histograms"] == ["params/bias"]


def test_an_unknown_histogram_name_fails_before_training_with_a_suggestion(tmp_path):
    pytest.importorskip("tensorboard")
    epochs: list[int] = []

    class Seen(corolux.Callback):
        def on_epoch_begin(self, ctx):
            epochs.append(ctx.epoch)

    with pytest.raises(ValueError, match=r"\['weights'\].*did you mean 'weight'\?"):
        fit(make_trainer(), [TensorBoardLogger(tmp_path, histograms=["weights"]), Seen()])
    assert epochs == []


def test_a_resumed_run_continues_the_curves_without_duplicated_epochs(tmp_path, accumulator):
    whole = fit(make_trainer(), [], epochs=4)
    logdir, state = tmp_path / "tb", tmp_path / "state.pt"
    with pytest.raises(RuntimeError, match="killed"):
        fit(make_trainer(), [TensorBoardLogger(logdir), AutoResume(state), Crash(epoch=3)], epochs=4)
    assert [s for s, _ in scalars(accumulator(logdir), "train/loss")] == [1, 2, 3]
    fit(make_trainer(), [TensorBoardLogger(logdir), AutoResume(state)], epochs=4)
    acc = accumulator(logdir)
    assert scalars(acc, "train/loss") == list(zip([1, 2, 3, 4], as_float32(whole["train_loss"]), strict=True))
    assert scalars(acc, "valid/acc") == list(zip([1, 2, 3, 4], as_float32(whole["valid_acc"]), strict=True))


def test_a_fresh_run_in_the_same_logdir_replaces_the_old_curves(tmp_path, accumulator):
    fit(make_trainer(), [TensorBoardLogger(tmp_path)], epochs=3)
    trainer = make_trainer()
    with torch.no_grad():
        trainer.model.weight.mul_(3)  # another run: other values
    second = fit(trainer, [TensorBoardLogger(tmp_path)], epochs=2)
    assert scalars(accumulator(tmp_path), "train/loss") == list(
        zip([1, 2], as_float32(second["train_loss"]), strict=True)
    )


def test_the_writer_is_closed_in_every_outcome(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    closed: list[object] = []
    real_close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self), real_close(self)))
    logger = TensorBoardLogger(tmp_path)
    fit(make_trainer(), [logger], epochs=1)
    assert len(closed) == 1
    with pytest.raises(RuntimeError, match="killed"):
        fit(make_trainer(), [logger, Crash(epoch=1)], epochs=2)
    assert len(closed) == 2 and closed[0] is not closed[1]
    assert logger._writer is None


def test_only_the_main_process_writes(tmp_path):
    pytest.importorskip("tensorboard")

    class NotRankZero(corolux.Callback):
        weight = -1000

        def setup(self, ctx):
            ctx.is_main_process = False

    fit(make_trainer(), [TensorBoardLogger(tmp_path / "tb"), NotRankZero()], epochs=1)
    assert not (tmp_path / "tb").exists()


def test_without_tensorboard_the_run_fails_at_setup_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    epochs: list[int] = []

    class Seen(corolux.Callback):
        def on_epoch_begin(self, ctx):
            epochs.append(ctx.epoch)

    with pytest.raises(ImportError, match="pip install tensorboard"):
        fit(make_trainer(), [TensorBoardLogger(tmp_path), Seen()])
    assert epochs == []
    assert TensorBoardLogger(tmp_path).histograms is False  # constructing it needs nothing


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="logdir must be a folder path"):
        TensorBoardLogger(None)  # type: ignore[arg-type]
    for bad in ("weight", 1, [1]):
        with pytest.raises(TypeError, match="histograms must be True, False or a collection"):
            TensorBoardLogger(tmp_path, histograms=bad)  # type: ignore[arg-type]
