"""Stepper: step/until/where/show/finish/close/repr on real training (iris), Ctrl-C and
errors while stepping, the tutorial as a doctest, and a real `python -i` session."""

from __future__ import annotations

import doctest
import functools
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch
from sklearn.datasets import load_iris

import corolux
from corolux import Stage, Stepper

F = torch.nn.functional
ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def _iris() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_iris()
    x = torch.tensor(d.data, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return ((x - x.mean(0)) / x.std(0))[order], torch.tensor(d.target)[order]


def iris_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    x, y = _iris()
    return (x[:96].clone(), y[:96].clone()), (x[96:].clone(), y[96:].clone())  # 3 + 2 batches of 32


def make_trainer(cls: type[corolux.Trainer] = corolux.Trainer, **kwargs) -> corolux.Trainer:
    torch.manual_seed(0)
    return cls(
        torch.nn.Linear(4, 3),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),  # plain SGD: a zero loss moves nothing
        device="cpu",
        progress=False,
        **kwargs,
    )


def stepper(epochs: int = 2, valid: bool = True, **kwargs) -> tuple[corolux.Trainer, Stepper]:
    trainer = make_trainer()
    train, valid_data = iris_split()
    valid_data = valid_data if valid else None
    s = trainer.stepper(train, epochs=epochs, valid_data=valid_data, batch_size=32, **kwargs)
    return trainer, s


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Counter(corolux.Callback):
    def __init__(self) -> None:
        self.stages: list[str] = []
        self.torn_down = 0

    def on_train_batch_end(self, ctx):
        self.stages.append("on_train_batch_end")

    def on_epoch_end(self, ctx):
        self.stages.append("on_epoch_end")

    def teardown(self, ctx):
        self.torn_down += 1


# -- stepping --------------------------------------------------------------------------------


def test_step_walks_the_same_stream_as_run_and_runs_callbacks_as_fit():
    trainer = make_trainer()
    train, valid = iris_split()
    expected = [str(e.stage) for e in trainer.run(train, epochs=2, valid_data=valid, batch_size=32)]
    counter = Counter()
    s = make_trainer().stepper(train, epochs=2, valid_data=valid, batch_size=32, callbacks=[counter])
    seen = []
    while (event := s.step()) is not None:
        seen.append(str(event.stage))
    assert seen == expected
    assert counter.stages.count("on_train_batch_end") == 6 and counter.stages.count("on_epoch_end") == 2
    assert counter.torn_down == 1
    assert s.finished and repr(s) == "<Stepper finished>"


def test_step_n_returns_the_nth_event():
    _, s = stepper()
    assert s.step().stage == Stage.on_fit_begin
    event = s.step(4)  # epoch_begin, train_begin, train_batch_begin, after_pred
    assert event.stage == Stage.on_train_batch_after_pred and event is s.event
    assert (event.ctx.epoch, event.ctx.iter) == (1, 1)
    s.close()


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_step_rejects_bad_counts(n):
    _, s = stepper()
    with pytest.raises(ValueError, match="integer >= 1"):
        s.step(n)
    assert s.where() == "not started"


def test_until_stage_with_when_collection_and_predicate():
    _, s = stepper(epochs=3)
    event = s.until("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 2)
    assert (event.stage, event.ctx.epoch, event.ctx.iter) == ("on_train_batch_after_loss", 1, 2)
    event = s.until({"on_valid_begin", Stage.on_epoch_end})
    assert event.stage == "on_valid_begin"
    event = s.until(lambda ev: ev.stage == "on_train_batch_end" and ev.ctx.epoch == 3)
    assert (event.ctx.epoch, event.ctx.iter) == (3, 1)
    event = s.until(when=lambda ctx: ctx.stage == "on_epoch_end")
    assert (event.stage, event.ctx.epoch) == ("on_epoch_end", 3)
    s.close()


def test_until_always_advances():
    _, s = stepper()
    s.until("on_train_batch_end")
    assert s.until("on_train_batch_end").ctx.iter == 2


def test_until_rejects_unknown_stage_before_advancing():
    _, s = stepper()
    with pytest.raises(ValueError, match="did you mean 'on_train_batch_end'"):
        s.until("on_train_batch_ned")
    assert s.where() == "not started"
    s.until("on_train_begin")
    with pytest.raises(ValueError, match="did you mean 'on_valid_end'"):
        s.until(["on_epoch_end", "on_valid_edn"])
    assert s.event.stage == "on_train_begin"
    s.close()


def test_until_rejects_stages_the_run_never_reaches():
    _, s = stepper(valid=False)
    with pytest.raises(ValueError, match="never reaches 'on_valid_begin'.*no validation data"):
        s.until("on_valid_begin")
    with pytest.raises(ValueError, match="never reaches 'on_predict_batch_end'"):
        s.until("on_predict_batch_end")
    assert s.until(["on_valid_begin", "on_train_end"]).stage == "on_train_end"
    s.close()


@pytest.mark.parametrize(
    "target, kwargs, error",
    [(None, {}, TypeError), (42, {}, TypeError), ([], {}, TypeError), ("on_fit_end", {"when": 3}, TypeError)],
)
def test_until_rejects_bad_arguments(target, kwargs, error):
    _, s = stepper()
    with pytest.raises(error, match="until"):
        s.until(target, **kwargs)


def test_until_without_a_match_says_so_and_returns_none(capsys):
    trainer, s = stepper(epochs=1)
    assert s.until("on_train_batch_end", when=lambda ctx: ctx.iter == 99) is None
    out = capsys.readouterr().out
    assert "no match" in out and "the run has ended" in out and "'on_fit_end'" in out
    assert s.finished and s.where() == "finished"
    assert s.step() is None and s.until("on_fit_end") is None  # no StopIteration, ever
    assert "the run is over" in capsys.readouterr().out
    assert len(s.finish()) == 1
    trainer.fit(iris_split()[0], epochs=1)  # the run is closed: the trainer is free again


def test_step_past_the_end(capsys):
    _, s = stepper(epochs=1, valid=False)
    assert s.step(1000) is None
    assert "step(1000) after 27 event(s): the run has ended" in capsys.readouterr().out


def test_a_predicate_error_leaves_the_stepper_paused_where_it_was():
    _, s = stepper()
    with pytest.raises(AttributeError):
        s.until("on_train_batch_after_loss", when=lambda ctx: ctx.los > 0)
    assert not s.finished and s.event.stage == "on_train_batch_after_loss"
    assert s.until("on_train_batch_end").ctx.iter == 1
    s.close()


# -- looking and changing ------------------------------------------------------------------


def test_where_and_repr():
    _, s = stepper(epochs=10)
    assert s.where() == "not started" and repr(s) == "<Stepper not started>"
    s.step()
    assert s.where() == "on_fit_begin"
    s.until("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 2 and ctx.epoch == 2)
    assert s.where() == "epoch 2/10 · train · batch 2/3 · on_train_batch_after_loss"
    assert repr(s) == f"<Stepper {s.where()}>"
    s.until("on_train_end")
    assert s.where() == "epoch 2/10 · train · on_train_end"
    s.until("on_valid_batch_end")
    assert s.where() == "epoch 2/10 · valid · batch 1/2 · on_valid_batch_end"
    s.until("on_epoch_end")
    assert s.where() == "epoch 2/10 · on_epoch_end"
    s.close()
    assert s.where() == "closed" and repr(s) == "<Stepper closed>"


class Unsized:
    """A re-iterable of batches without a length: the batch count is unknown."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_where_with_data_of_unknown_length():
    x, y = iris_split()[0]
    trainer = make_trainer()
    s = trainer.stepper(Unsized([(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]), epochs=2)
    s.until("on_train_batch_begin", when=lambda ctx: ctx.iter == 2)
    assert s.where() == "epoch 1/2 · train · batch 2/? · on_train_batch_begin"
    s.close()


def test_where_in_evaluate_and_predict_runs():
    trainer = make_trainer()
    x, y = iris_split()[1]
    s = Stepper(trainer.run_evaluate((x, y), batch_size=32))
    assert s.until("on_valid_batch_after_loss").ctx.iter == 1
    assert s.where() == "valid · batch 1/2 · on_valid_batch_after_loss"
    with pytest.raises(ValueError, match="run_evaluate"):
        s.until("on_epoch_end")
    s.finish()
    assert set(s.ctx.metrics) == {"valid_loss"}
    p = Stepper(trainer.run_predict(x, batch_size=32))
    p.until("on_predict_batch_end")
    assert p.where() == "predict · batch 1/2 · on_predict_batch_end"
    p.finish()
    assert p.ctx.predictions.shape == (54, 3)


def test_show_marks_the_current_stage(capsys):
    _, s = stepper()
    s.until("on_train_batch_after_loss")
    capsys.readouterr()
    s.show()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == s.where()
    marked = [line for line in lines if line.startswith("-->")]
    assert marked == ["-->         on_train_batch_after_loss"]
    assert "    on_fit_begin" in lines and "        on_valid_begin" in lines
    s.until("on_valid_end")
    s.show()
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("-->")] == [
        "-->     on_valid_end"
    ]
    s.close()


def test_show_follows_the_run():
    _, s = stepper(valid=False)
    lines = _shown(s)
    assert lines[0] == "not started" and not any(line.startswith("-->") for line in lines)
    assert not any("on_valid" in line for line in lines)  # no validation data in this run


def _shown(s: Stepper) -> list[str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        s.show()
    return buffer.getvalue().splitlines()


def test_ctx_changes_take_effect_on_resume():
    trainer, s = stepper()
    assert s.ctx is s.until("on_train_batch_after_loss").ctx  # known before, live after
    before = params(trainer.model)
    s.ctx.loss = s.ctx.loss * 0  # zero loss -> zero gradients -> plain SGD does not move
    s.until("on_train_batch_end")
    assert same(before, params(trainer.model))
    s.until("on_train_batch_end")  # the next batch trains as usual
    assert not same(before, params(trainer.model))
    s.ctx.stop_training("seen enough")
    assert s.until("on_fit_end").ctx.stop_reason == "seen enough"
    s.finish()


def test_custom_stages_are_known_before_the_first_event(capsys):
    class Custom(corolux.Trainer):
        stages = ("on_custom_after_loss",)

        def train_step(self, ctx):
            ctx.pred = ctx.model(ctx.input)
            ctx.loss = ctx.loss_fn(ctx.pred, ctx.target)
            yield "on_custom_after_loss"
            ctx.backward(ctx.loss)
            yield "on_train_batch_before_step"
            ctx.step_optimizer()
            yield "on_train_batch_after_step"

    trainer = make_trainer(Custom)
    s = trainer.stepper(iris_split()[0], epochs=1, batch_size=32)
    assert s.until("on_custom_after_loss", when=lambda ctx: ctx.iter == 2).ctx.iter == 2
    assert s.where() == "epoch 1/1 · train · batch 2/3 · on_custom_after_loss"
    with pytest.raises(ValueError, match="did you mean 'on_custom_after_loss'"):
        s.until("on_custom_after_los")
    s.show()
    assert "-->   on_custom_after_loss" in capsys.readouterr().out
    s.close()


# -- ending ----------------------------------------------------------------------------------


def test_finish_returns_the_history_like_fit():
    train, valid = iris_split()
    expected = make_trainer().fit(train, epochs=2, valid_data=valid, batch_size=32)
    trainer, s = stepper()
    s.until("on_valid_begin")
    history = s.finish()
    assert history is s.ctx.history and history.to_dict() == expected.to_dict()
    assert s.finished and s.finish() is history  # finishing twice is harmless
    trainer.fit(train, epochs=1)  # the run is over: the trainer is free


def test_close_abandons_cleanly():
    counter = Counter()
    trainer, s = stepper(callbacks=[counter])
    s.until("on_train_batch_after_loss")
    with pytest.raises(RuntimeError, match="already has an open run"):
        trainer.fit(iris_split()[0], epochs=1)
    s.close()
    s.close()
    assert counter.torn_down == 1 and s.where() == "closed"
    assert s.step() is None
    trainer.fit(iris_split()[0], epochs=1)


def test_context_manager_closes():
    counter = Counter()
    _, s = stepper(callbacks=[counter])
    with s:
        s.until("on_train_begin")
    assert counter.torn_down == 1 and s.finished


def test_pauses_at_on_exception_then_reraises(capsys):
    class Boom(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.iter == 2:
                raise ValueError("boom")

    counter = Counter()
    _, s = stepper(callbacks=[Boom(), counter])
    event = s.until("on_epoch_end")
    assert event.stage == "on_exception" and isinstance(s.ctx.exception, ValueError)
    assert "paused at on_exception" in capsys.readouterr().out
    assert s.ctx.iter == 2 and counter.torn_down == 0  # inspect before cleanup
    with pytest.raises(ValueError, match="boom") as info:
        s.step()
    assert any("Boom.on_train_batch_end" in note for note in info.value.__notes__)
    assert s.where().startswith("failed: ValueError") and counter.torn_down == 1


def test_finish_propagates_an_error_and_the_stepper_tells():
    class Boom(corolux.Callback):
        def on_valid_begin(self, ctx):
            raise RuntimeError("boom")

    _, s = stepper(callbacks=[Boom()])
    s.until("on_train_end")
    with pytest.raises(RuntimeError, match="boom"):
        s.finish()
    assert s.finished and s.where() == "failed: RuntimeError('boom')"
    assert s.event.stage == "on_train_end"  # the last event the stepper itself handed out


def test_ctrl_c_during_a_call_pauses_at_on_interrupt(capsys):
    class CtrlC(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.epoch == 1 and ctx.iter == 2:
                os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed here

    original = signal.getsignal(signal.SIGINT)
    _, s = stepper(epochs=3, callbacks=[CtrlC()])
    event = s.until("on_epoch_end", when=lambda ctx: ctx.epoch == 3)
    assert signal.getsignal(signal.SIGINT) is original  # the handler lives for the call only
    assert event.stage == "on_interrupt" and "Ctrl-C" in capsys.readouterr().out
    assert s.where() == "epoch 1/3 · train · on_interrupt"
    with pytest.warns(RuntimeWarning, match="interrupted by Ctrl-C"):
        history = s.finish()
    assert history.interrupted and s.ctx.stop_reason == "interrupted"
    assert signal.getsignal(signal.SIGINT) is original


def test_a_second_ctrl_c_aborts():
    class CtrlCTwice(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.iter == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    counter = Counter()
    original = signal.getsignal(signal.SIGINT)
    _, s = stepper(callbacks=[CtrlCTwice(), counter])
    with pytest.raises(KeyboardInterrupt):
        s.until("on_fit_end")
    assert s.where() == "aborted by Ctrl-C" and counter.torn_down == 1
    assert signal.getsignal(signal.SIGINT) is original


def test_stepper_needs_a_run_generator():
    trainer = make_trainer()
    with pytest.raises(TypeError, match=r"trainer\.stepper\(data"):
        Stepper(trainer)
    with pytest.raises(TypeError, match="generator of a run"):
        Stepper([1, 2])


def test_no_stepper_code_runs_in_fit():
    """Stepping costs fit() nothing: not one call into corolux.debug during a run."""
    trainer = make_trainer()
    calls = []
    debug_file = sys.modules["corolux.debug"].__file__

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == debug_file:
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        trainer.fit(iris_split()[0], epochs=1, batch_size=32)
    finally:
        sys.setprofile(None)
    assert calls == []


# -- the tutorial and a real interpreter -------------------------------------------------------


def test_tutorial_runs_as_written():
    """examples/debug_session.md is a REPL session: every line runs and prints what it shows."""
    with pytest.warns(RuntimeWarning, match="CaptureAnomaly: the training loss is inf"):  # section 12
        failures, tried = doctest.testfile(
            str(ROOT / "examples" / "debug_session.md"),
            module_relative=False,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
            verbose=False,
        )
    assert tried > 10 and failures == 0


MOVED = "print('MOVED:', any(not torch.equal(a, b) for a, b in zip(before, model.parameters())))"
SESSION = [
    # (line typed at >>>, regex the output must show before the next prompt, or None)
    ("import torch, corolux", None),
    ("torch.manual_seed(0); x, y = torch.randn(64, 4), torch.randn(64, 1)", None),
    ("model = torch.nn.Linear(4, 1)", None),
    (
        "trainer = corolux.Trainer(model, loss_fn=torch.nn.functional.mse_loss, device='cpu', "
        "optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)",
        None,
    ),
    ("s = trainer.stepper((x, y), epochs=2, batch_size=16)", None),
    ("s", r"<Stepper not started>"),
    ("s.until('on_train_batch_after_loss', when=lambda c: c.iter == 2)", r"Event\('on_train_batch_after_l"),
    ("print('AT:', s.where())", r"AT: epoch 1/2 · train · batch 2/4 · on_train_batch_after_loss"),
    ("print('LOSS:', float(s.ctx.loss))", r"LOSS: \d+\.\d+"),
    ("s.ctx.loss = s.ctx.loss * 0", None),
    ("before = [p.detach().clone() for p in model.parameters()]", None),
    ("s.until('on_train_batch_end')", r"Event\('on_train_batch_end', epoch=1, iter=2\)"),
    (MOVED, r"MOVED: False"),  # the zeroed loss moved nothing (plain SGD)
    ("s.until('on_train_batch_end')", r"iter=3\)"),
    (MOVED, r"MOVED: True"),  # the next batch trains as usual
    ("s", r"<Stepper epoch 1/2 · train · batch 3/4 · on_train_batch_end>"),
    ("h = s.finish()", None),
    ("print('EPOCHS:', len(h), s)", r"EPOCHS: 2 <Stepper finished>"),
]


WAITER = """
import time
import corolux

class Waiter(corolux.Callback):
    \"\"\"Holds training at epoch 1, batch 2 until Ctrl-C has been handled (20 s at most).\"\"\"

    def on_train_batch_end(self, ctx):
        if ctx.epoch == 1 and ctx.iter == 2:
            print("WAITING" + " FOR CTRL-C", flush=True)
            deadline = time.monotonic() + 20
            while not ctx.signals.pending and time.monotonic() < deadline:
                time.sleep(0.01)
"""


def test_a_real_interactive_session(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    (tmp_path / "waiter.py").write_text(WAITER)
    env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8")
    env.pop("PYTHONSTARTUP", None)
    child = pexpect.spawn(
        sys.executable, ["-i", "-q"], env=env, cwd=str(tmp_path), encoding="utf-8", timeout=30
    )

    def run(line: str, shows: str | None = None) -> None:
        child.sendline(line)
        if shows is not None:
            child.expect(shows)
        child.expect_exact(">>> ")
        assert "Traceback" not in child.before, child.before

    try:
        child.expect_exact(">>> ")
        for line, shows in SESSION:
            run(line, shows)
        # Ctrl-C during a call: training stops gracefully and the call returns at on_interrupt.
        run("from waiter import Waiter")
        run("s = trainer.stepper((x, y), epochs=50, batch_size=16, callbacks=[Waiter()])")
        child.sendline("s.until('on_fit_end', when=lambda c: c.epoch == 50)")
        child.expect_exact("WAITING FOR CTRL-C")
        child.sendintr()
        child.expect_exact("paused at on_interrupt (Ctrl-C)")
        child.expect_exact(">>> ")
        run("print('AT:', s.where())", r"AT: epoch 1/50 · train · on_interrupt")
        # At the prompt, Ctrl-C is the ordinary KeyboardInterrupt: the run stays paused.
        child.sendintr()
        child.expect_exact("KeyboardInterrupt")
        child.expect_exact(">>> ")
        run("h = s.finish()", r"interrupted by Ctrl-C in epoch 1")
        run("print('INTERRUPTED:', h.interrupted, len(h), s)", r"INTERRUPTED: True 1 <Stepper finished>")
        child.sendline("exit()")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


# -- until() against the events step() gives; on_exception once per error -----------------------


def _key(event) -> tuple[str, int, int]:
    return (str(event.stage), event.ctx.epoch, event.ctx.iter)


def _stream(make) -> list[tuple[str, int, int]]:
    """Every event of the run that ``make()`` builds, as step() gives them."""
    s = make()
    events = []
    while (event := s.step()) is not None:
        events.append(_key(event))
    return events


class Twice(corolux.Trainer):
    stages = ("on_custom",)


class EmitTwice(corolux.Callback):
    """Emits the custom stage twice at each batch end: two events of one stage in a row."""

    def on_train_batch_end(self, ctx):
        ctx.emit("on_custom")
        ctx.emit("on_custom")


def _twice() -> Stepper:
    trainer = make_trainer(Twice)
    train, valid = iris_split()
    return trainer.stepper(train, epochs=2, valid_data=valid, batch_size=32, callbacks=[EmitTwice()])


def test_until_a_predicate_matching_everything_is_step():
    expected = _stream(_twice)
    for until in (lambda s: s.until(lambda event: True), lambda s: s.until(when=lambda ctx: True)):
        s = _twice()
        got = []
        while (event := until(s)) is not None:
            got.append(_key(event))
        assert got == expected


@pytest.mark.parametrize(
    "targets",
    [
        # two stages in a row: each target is the very next event's stage
        [
            "on_fit_begin",
            "on_epoch_begin",
            "on_train_begin",
            "on_train_batch_begin",
            "on_train_batch_after_pred",
        ],
        # the same target on consecutive events (the custom stage comes twice in a row)
        ["on_train_batch_end", "on_custom", "on_custom", "on_custom", "on_custom", "on_train_batch_begin"],
        # a collection whose stages come one after the other
        [("on_train_batch_end", "on_custom", "on_train_batch_begin")] * 9,
        # and the same stage again: the next occurrence, never one past it
        ["on_train_batch_begin"] * 5 + ["on_valid_batch_end"] * 2 + ["on_epoch_end", "on_fit_end"],
    ],
)
def test_until_returns_exactly_the_next_matching_event(targets):
    stream = _stream(_twice)
    s = _twice()
    position = -1
    for target in targets:
        names = {target} if isinstance(target, str) else set(target)
        position = next(i for i in range(position + 1, len(stream)) if stream[i][0] in names)
        assert _key(s.until(target if isinstance(target, str) else list(target))) == stream[position]
    s.close()


class Fails(corolux.Callback):
    """Raises at epoch 1, batch 2: in a callback (after_loss) or in the step (the forward)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.exceptions: list[BaseException] = []

    def on_train_batch_after_pred(self, ctx):
        if self.where == "step" and ctx.iter == 1:
            ctx.model.weight.data = ctx.model.weight.data[:, :2]  # the next forward fails in the step

    def on_train_batch_after_loss(self, ctx):
        if self.where == "callback" and ctx.iter == 2:
            raise ValueError("boom")

    def on_exception(self, ctx):
        self.exceptions.append(ctx.exception)


def _drive(driver: str, fails: Fails, seen: list[str]) -> None:
    """Run to the error with ``driver``, adding the stages the consumer sees to ``seen``."""
    trainer = make_trainer()
    train = iris_split()[0]
    kwargs = {"epochs": 1, "batch_size": 32, "callbacks": [fails]}
    if driver == "fit":
        trainer.fit(train, **kwargs)
    elif driver == "run":
        seen.extend(str(event.stage) for event in trainer.run(train, **kwargs))
    else:
        s = trainer.stepper(train, rewindable=driver == "rewindable stepper", **kwargs)
        while (event := s.step()) is not None:
            seen.append(str(event.stage))


@pytest.mark.parametrize("driver", ["fit", "run", "stepper", "rewindable stepper"])
@pytest.mark.parametrize("where", ["callback", "step"])
def test_on_exception_fires_once_per_escaping_error(driver, where, capsys):
    fails, seen = Fails(where), []
    with pytest.raises((ValueError, RuntimeError)) as info:
        _drive(driver, fails, seen)
    assert len(fails.exceptions) == 1 and fails.exceptions[0] is info.value
    if driver != "fit":  # the consumer saw it once, last
        assert seen.count("on_exception") == 1 and seen[-1] == "on_exception"
    where_noted = "in Fails.on_train_batch_after_loss" if where == "callback" else "raised in the train step"
    assert [note for note in info.value.__notes__ if where_noted in note] == info.value.__notes__[:1]


def test_a_stepper_left_paused_at_exit_is_closed_cleanly(tmp_path):
    """A script (or a REPL) that ends with a stepper paused mid-batch: the run is closed at
    exit, its callbacks' teardown runs, and Python's shutdown prints no ignored exception."""
    marker = tmp_path / "torn_down"
    script = f"""
import torch, corolux

class Marker(corolux.Callback):
    def teardown(self, ctx):
        open({str(marker)!r}, "w").close()

trainer = corolux.Trainer(torch.nn.Linear(4, 2), loss_fn=torch.nn.functional.cross_entropy,
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
s = trainer.stepper((torch.randn(64, 4), torch.randint(0, 2, (64,))), epochs=2, batch_size=8,
                    callbacks=[Marker()])
s.until("on_train_batch_after_loss")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert marker.exists()
