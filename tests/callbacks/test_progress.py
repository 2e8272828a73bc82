"""ProgressBar: where it writes, what it shows, how it is replaced or dropped, and that its
bars are closed in every outcome."""

from __future__ import annotations

import io

import pytest
import torch
from realdata import iris

import corolux
from corolux.callbacks import ProgressBar

tqdm_std = pytest.importorskip("tqdm.std")
F = torch.nn.functional


def trainer_for(progress=False, **kwargs) -> corolux.Trainer:
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
    return corolux.Trainer(torch.nn.Linear(4, 3), device="cpu", progress=progress, **kwargs)


def open_bars() -> set:
    return set(tqdm_std.tqdm._instances)


class CollectBars(corolux.Callback):
    """Remembers every tqdm bar open while a batch runs (after the progress bar, weight 200)."""

    weight = 200

    def __init__(self) -> None:
        self.bars: set = set()

    def on_train_batch_end(self, ctx):
        self.bars |= open_bars()

    on_valid_batch_end = on_predict_batch_end = on_train_batch_end


def progress_of(ctx) -> list[ProgressBar]:
    return [cb for cb in ctx.callbacks if isinstance(cb, ProgressBar)]


# -- output ----------------------------------------------------------------------------------------


def test_writes_epoch_counter_and_loss_to_the_given_file():
    x, y = iris()
    out = io.StringIO()
    trainer_for(progress=True).fit(
        (x, y), epochs=2, valid_data=(x, y), callbacks=[ProgressBar(style="bar", file=out)]
    )
    text = out.getvalue()
    assert "Epoch 1/2" in text and "Epoch 2/2" in text
    assert "train" in text
    assert "loss=" in text
    assert "5/5" in text  # 150 samples in batches of 32: the bar completes


def test_writes_to_a_real_file(tmp_path):
    x, y = iris()
    path = tmp_path / "progress.log"
    with path.open("w") as f:
        trainer_for(progress=True).fit((x, y), epochs=1, callbacks=[ProgressBar(style="bar", file=f)])
    text = path.read_text()
    assert "Epoch 1/1" in text and "loss=" in text


def test_the_final_loss_shown_is_the_epoch_loss():
    x, y = iris()
    out = io.StringIO()
    history = trainer_for(progress=True).fit((x, y), epochs=1, callbacks=[ProgressBar(style="bar", file=out)])
    assert f"loss={history['train_loss'][-1]:.4g}" in out.getvalue()


def test_evaluate_and_predict_show_bars_too():
    x, y = iris()
    trainer = trainer_for(progress=True)
    out = io.StringIO()
    trainer.evaluate((x, y), callbacks=[ProgressBar(style="bar", file=out)])
    assert "valid" in out.getvalue()
    out = io.StringIO()
    trainer.predict(x, callbacks=[ProgressBar(style="bar", file=out)])
    assert "predict" in out.getvalue()


def test_default_bar_writes_to_stderr_when_progress_is_true(capsys):
    x, y = iris()
    trainer_for(progress=True).fit((x, y), epochs=2)
    captured = capsys.readouterr()
    assert "Epoch 2/2" in captured.err
    assert captured.out == ""


def test_progress_none_prints_one_plain_line_per_epoch_when_not_attached_to_a_terminal(capsys):
    x, y = iris()
    trainer = trainer_for(progress=None, metrics=[corolux.metrics.Accuracy()])
    history = trainer.fit((x, y), epochs=3, valid_data=(x, y))  # pytest's captured stderr is no tty
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("Epoch 3/3 - ")
    loss = history["valid_loss"][2]
    assert f"valid_loss: {loss:.4g}" in lines[2] and "train_acc: " in lines[2]
    assert "\r" not in "".join(lines)  # no bar redrawn in a log file


def test_line_style_does_not_listen_to_batches_and_reports_evaluate_and_predict():
    x, y = iris()
    out = io.StringIO()
    line = ProgressBar(style="line", file=out)
    assert not hasattr(line, "on_train_batch_end") and "on_train_batch_end" not in dir(type(line))
    trainer = trainer_for(progress=True)
    trainer.evaluate((x, y), callbacks=[line])
    trainer.predict(x, callbacks=[line])
    first, second = out.getvalue().splitlines()
    assert first.startswith("evaluate: 5 batches - ") and "valid_loss: " in first
    assert second.startswith("predict: 5 batches - ")


def test_metrics_that_do_not_fit_a_narrow_terminal_go_below_the_bar_whole(monkeypatch):
    x, y = iris()
    out = io.StringIO()
    bar = ProgressBar(style="bar", file=out)
    metrics = [corolux.metrics.Accuracy(name=f"accuracy_number_{i}") for i in range(4)]
    monkeypatch.setattr(ProgressBar, "_width", lambda self, bar: 60, raising=False)
    trainer_for(progress=True, metrics=metrics).fit((x, y), epochs=1, valid_data=(x, y), callbacks=[bar])
    text = out.getvalue()
    for i in range(4):
        assert f"accuracy_number_{i}=" in text and f"valid_accuracy_number_{i}=" in text
    assert all(len(line) <= 60 for line in text.replace("\r", "\n").splitlines() if "accuracy_number" in line)


def test_bad_style_is_rejected():
    with pytest.raises(ValueError, match=r"style must be one of \('auto', 'bar', 'line'\)"):
        ProgressBar(style="bars")


# -- in the callback list ------------------------------------------------------------------------


def test_progress_false_drops_the_bar(capsys):
    x, y = iris()
    lists = []

    class Look(corolux.Callback):
        def on_fit_begin(self, ctx):
            lists.append(progress_of(ctx))

    trainer_for(progress=False).fit((x, y), epochs=1, callbacks=[Look()])
    assert lists == [[]]
    assert "Epoch" not in capsys.readouterr().err


def test_progress_true_has_the_default_bar():
    x, y = iris()
    lists = []

    class Look(corolux.Callback):
        def on_fit_begin(self, ctx):
            lists.append(progress_of(ctx))

    trainer_for(progress=True).fit((x, y), epochs=1, callbacks=[Look()])
    ((bar,),) = lists
    assert isinstance(bar, ProgressBar) and bar.weight == 100


def test_a_user_progress_bar_replaces_the_default():
    x, y = iris()
    mine = ProgressBar(style="bar", leave=False, file=io.StringIO())
    lists = []

    class Look(corolux.Callback):
        def on_fit_begin(self, ctx):
            lists.append(progress_of(ctx))

    trainer_for(progress=True).fit((x, y), epochs=1, callbacks=[Look(), mine])
    assert lists == [[mine]]
    assert mine.leave is False


def test_leave_false_clears_the_finished_bar():
    x, y = iris()
    kept, cleared = io.StringIO(), io.StringIO()
    trainer_for(progress=True).fit(
        (x, y), epochs=1, callbacks=[ProgressBar(style="bar", leave=True, file=kept)]
    )
    trainer_for(progress=True).fit(
        (x, y), epochs=1, callbacks=[ProgressBar(style="bar", leave=False, file=cleared)]
    )
    assert kept.getvalue().endswith("\n")  # the finished bar stays on its line
    assert not cleared.getvalue().endswith("\n")


def test_bad_refresh_rate_is_rejected():
    with pytest.raises(ValueError, match="refresh_per_second"):
        ProgressBar(refresh_per_second=0)


# -- cleanup -------------------------------------------------------------------------------------


def test_bars_are_closed_after_fit():
    x, y = iris()
    collect = CollectBars()
    trainer_for(progress=True).fit(
        (x, y), epochs=2, valid_data=(x, y), callbacks=[ProgressBar(style="bar", file=io.StringIO()), collect]
    )
    assert collect.bars  # the check below looks at real bars
    assert not (collect.bars & open_bars())
    assert all(bar.disable for bar in collect.bars)  # tqdm.close() disables the bar


def test_bars_are_closed_after_close():
    x, y = iris()
    collect = CollectBars()
    gen = trainer_for(progress=True).run(
        (x, y), epochs=3, callbacks=[ProgressBar(style="bar", file=io.StringIO()), collect]
    )
    for event in gen:
        if event.stage == "on_train_batch_end" and event.ctx.iter == 2:
            break
    assert collect.bars & open_bars()  # mid-epoch: the bar is open
    gen.close()
    assert not (collect.bars & open_bars())


def test_bars_are_closed_after_break():
    x, y = iris()
    collect = CollectBars()
    trainer = trainer_for(progress=True)
    for event in trainer.run(
        (x, y), epochs=3, callbacks=[ProgressBar(style="bar", file=io.StringIO()), collect]
    ):
        if event.stage == "on_train_batch_end" and event.ctx.iter == 2:
            break
    assert collect.bars
    assert not (collect.bars & open_bars())


def test_bars_are_closed_after_an_exception():
    x, y = iris()
    collect = CollectBars()

    class Boom(corolux.Callback):
        weight = 300

        def on_train_batch_end(self, ctx):
            if ctx.iter == 3:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer_for(progress=True).fit(
            (x, y), epochs=2, callbacks=[ProgressBar(style="bar", file=io.StringIO()), collect, Boom()]
        )
    assert collect.bars
    assert not (collect.bars & open_bars())


def test_bars_are_closed_after_an_error_in_the_step():
    x, y = iris()
    collect = CollectBars()

    def bad_loss(pred, target):
        if bad_loss.calls == 2:
            raise ArithmeticError("bad batch")
        bad_loss.calls += 1
        return F.cross_entropy(pred, target)

    bad_loss.calls = 0
    with pytest.raises(ArithmeticError):
        trainer_for(progress=True, loss_fn=bad_loss).fit(
            (x, y), callbacks=[ProgressBar(style="bar", file=io.StringIO()), collect]
        )
    assert collect.bars
    assert not (collect.bars & open_bars())


def test_one_bar_instance_serves_several_runs():
    x, y = iris()
    out = io.StringIO()
    bar = ProgressBar(style="bar", file=out)
    before = open_bars()
    trainer = trainer_for(progress=True)
    trainer.fit((x, y), epochs=1, callbacks=[bar])
    trainer.fit((x, y), epochs=2, callbacks=[bar])
    text = out.getvalue()
    for desc in ("Epoch 1/1 train: 100%", "Epoch 1/2 train: 100%", "Epoch 2/2 train: 100%"):
        assert desc in text  # each run's own epoch counter, each bar completed
    assert text.count("loss=") >= 3
    assert open_bars() <= before


def test_refreshing_the_loss_reads_a_detached_tensor(monkeypatch):
    """The bar reads the loss at each refresh. Reading a tensor that requires grad makes
    torch warn "Converting a tensor with requires_grad=True to a scalar" (once per process,
    so this test looks at the read itself rather than at the warning)."""
    reads = []
    for name in ("__float__", "item"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            reads.append(self.requires_grad)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    x, y = iris()
    out = io.StringIO()
    trainer_for(progress=True).fit(
        [(x[i : i + 8], y[i : i + 8]) for i in range(0, 150, 8)],
        callbacks=[ProgressBar(style="bar", file=out, refresh_per_second=1e9)],  # refresh at every batch
    )
    assert "loss=" in out.getvalue()
    assert reads  # the bar did read losses
    assert not any(reads), f"{sum(reads)} of {len(reads)} reads were of a tensor requiring grad"
