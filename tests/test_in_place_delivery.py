"""In a run without a consumer and without coroutines (``fit()``, ``evaluate()``,
``predict()``), the loop calls the ``*_batch_end`` handlers itself instead of yielding the
stage to the driver (``corolux.loop.Routing.in_place``). These tests hold it to the driver's
own delivery: the same run beside an idle coroutine (a run with coroutines yields every stage
to the driver) must see and do the same, errors, control signals and Ctrl-C included.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from realdata import digits
from test_flat_steps import make_trainer  # the same model, optimizer and seed

import corolux
from corolux import loop
from corolux.events import BATCH_ENDS

#: Where the idle coroutine waits, per kind of run: a stage that comes once, at the end.
LAST_STAGE = {"fit": "on_fit_end", "evaluate": "on_valid_end", "predict": "on_predict_end"}


def idle(kind: str) -> Any:
    """A coroutine that waits for the run's last stage only: it changes nothing, but with it
    the driver delivers every stage itself."""

    @corolux.coroutine
    def waiting():  # type: ignore[no-untyped-def]
        yield LAST_STAGE[kind]

    return waiting()


class Recorder(corolux.Callback):
    """Records what it sees at each batch end and at on_exception, into a shared list."""

    def __init__(self, name: str, weight: float, seen: list[tuple[Any, ...]], act: Any = None) -> None:
        self.name, self.weight, self.seen, self.act = name, weight, seen, act

    def _batch_end(self, ctx: corolux.Context) -> None:
        loss = None if ctx.loss is None else ctx.loss.detach().clone()
        self.seen.append(
            (
                self.name,
                str(ctx.stage),
                ctx.phase,
                ctx.epoch,
                ctx.iter,
                ctx.in_batch,
                torch.is_grad_enabled(),
                loss,
            )
        )
        if self.act is not None:
            self.act(ctx)

    on_train_batch_end = on_valid_batch_end = on_predict_batch_end = _batch_end

    def on_exception(self, ctx: corolux.Context) -> None:
        error = ctx.exception
        self.seen.append(
            (self.name, "exception", ctx.phase, ctx.iter, ctx.in_batch, torch.is_grad_enabled(), repr(error))
        )

    def on_interrupt(self, ctx: corolux.Context) -> None:
        self.seen.append((self.name, "interrupt", ctx.phase, ctx.epoch, ctx.iter, str(ctx.stage)))

    def teardown(self, ctx: corolux.Context) -> None:
        self.seen.append((self.name, "teardown", ctx.in_batch, ctx.stop_reason))


def run(kind: str, yielded: bool, act: Any = None, epochs: int = 2) -> dict[str, Any]:
    """One run of ``kind`` with three recorders at the batch ends (weights -200, 0 and 50;
    the middle one does ``act(ctx)``), in place or, with the idle coroutine, yielded."""
    x, y = digits()
    x, y = x[:256], y[:256]
    seen: list[tuple[Any, ...]] = []
    callbacks = [
        Recorder("late", 50, seen),
        Recorder("first", -200, seen),
        Recorder("middle", 0, seen, act),
    ]
    if yielded:
        callbacks.append(idle(kind))
    trainer = make_trainer()
    out: dict[str, Any] = {"seen": seen, "trainer": trainer}
    try:
        if kind == "fit":
            out["result"] = trainer.fit(
                (x, y), epochs=epochs, batch_size=32, valid_data=(x[:96], y[:96]), callbacks=callbacks
            )
        elif kind == "evaluate":
            out["result"] = trainer.evaluate((x, y), batch_size=32, callbacks=callbacks)
        else:
            out["result"] = trainer.predict(x, batch_size=32, callbacks=callbacks)
    except BaseException as exc:  # noqa: BLE001 - compared between the two deliveries
        out["error"] = exc
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert len(a["seen"]) == len(b["seen"])
    for left, right in zip(a["seen"], b["seen"], strict=True):
        assert len(left) == len(right)
        for u, v in zip(left, right, strict=True):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v, (left, right)
    for p, q in zip(a["trainer"].model.parameters(), b["trainer"].model.parameters(), strict=True):
        assert torch.equal(p, q)
    ra, rb = a.get("result"), b.get("result")
    if isinstance(ra, torch.Tensor):
        assert torch.equal(ra, rb)
    elif isinstance(ra, corolux.History):
        assert repr(ra.to_dict()) == repr(rb.to_dict())
    else:
        assert ra == rb
    ea, eb = a.get("error"), b.get("error")
    assert type(ea) is type(eb)
    if ea is not None:
        assert str(ea) == str(eb)
        assert getattr(ea, "__notes__", []) == getattr(eb, "__notes__", [])


def spy_on_yields(monkeypatch: pytest.MonkeyPatch, kind: str) -> list[Any]:
    """Record what the run's loop generator yields to the driver."""
    yielded: list[Any] = []
    name = {"fit": "fit_loop", "evaluate": "evaluate_loop", "predict": "predict_loop"}[kind]
    original = getattr(loop, name)

    def spied(*args: Any, **kwargs: Any) -> Any:
        gen = original(*args, **kwargs)
        try:
            for stage in gen:
                yielded.append(stage)
                yield stage
        finally:
            gen.close()

    monkeypatch.setattr(loop, name, spied)
    return yielded


@pytest.mark.parametrize("kind", ["fit", "evaluate", "predict"])
def test_batch_end_handlers_run_in_place_in_the_drivers_order(kind, monkeypatch):
    yielded = spy_on_yields(monkeypatch, kind)
    in_place = run(kind, yielded=False)
    batch_ends_in_place = [stage for stage in yielded if stage in BATCH_ENDS]
    yielded.clear()
    driven = run(kind, yielded=True)
    assert batch_ends_in_place == []  # the loop called them itself
    assert [stage for stage in yielded if stage in BATCH_ENDS]  # the driver delivered them
    assert_same(in_place, driven)
    names = [entry[0] for entry in in_place["seen"] if entry[1] in BATCH_ENDS]
    assert names[:3] == ["first", "middle", "late"]  # weight order, as the driver's
    assert "error" not in in_place


@pytest.mark.parametrize(
    ("kind", "phase"),
    [("fit", "train"), ("fit", "valid"), ("evaluate", "valid"), ("predict", "predict")],
)
def test_an_error_of_a_batch_end_handler_escapes_as_from_the_driver(kind, phase):
    """The same notes (the callback and stage, once), on_exception inside the open batch
    (under no_grad in validation), the later handlers not called, every teardown run."""

    def fail(ctx):
        if ctx.phase == phase and ctx.iter == 3 and ctx.epoch in (0, 1):
            raise ValueError("the handler failed")

    in_place, driven = run(kind, False, fail), run(kind, True, fail)
    assert_same(in_place, driven)
    error = in_place["error"]
    assert isinstance(error, ValueError)
    assert [note for note in error.__notes__ if "Recorder" in note] == [f"in Recorder.on_{phase}_batch_end"]
    exceptions = [entry for entry in in_place["seen"] if entry[1] == "exception"]
    assert exceptions[0][2:6] == (phase, 3, True, phase == "train")
    at_failure = [entry[0] for entry in in_place["seen"] if entry[1:3] == (f"on_{phase}_batch_end", phase)]
    assert at_failure[-2:] == ["first", "middle"]  # "late" never saw the failed batch
    assert [entry[0] for entry in in_place["seen"] if entry[1] == "teardown"] == ["first", "middle", "late"]


@pytest.mark.parametrize(
    ("signal", "phase"),
    [
        (corolux.StopTraining, "train"),
        (corolux.StopTraining, "valid"),
        (corolux.SkipValidation, "train"),
        (KeyboardInterrupt, "train"),
        (KeyboardInterrupt, "valid"),
    ],
)
def test_control_signals_and_ctrl_c_of_a_batch_end_handler_act_as_from_the_driver(signal, phase):
    def give(ctx):
        if ctx.phase == phase and ctx.epoch == 1 and ctx.iter == 2:
            raise signal()

    if signal is KeyboardInterrupt:
        with pytest.warns(RuntimeWarning, match="interrupted"):
            in_place = run("fit", False, give)
        with pytest.warns(RuntimeWarning, match="interrupted"):
            driven = run("fit", True, give)
    else:
        in_place, driven = run("fit", False, give), run("fit", True, give)
    assert_same(in_place, driven)
    assert "error" not in in_place
    history = in_place["result"]
    assert history.completed_epochs == (0 if signal is not corolux.SkipValidation else 2)
    if signal is KeyboardInterrupt:
        assert history.interrupted
        interrupts = [entry for entry in in_place["seen"] if entry[1] == "interrupt"]
        assert interrupts[0][2:] == (phase, 1, 2, "on_interrupt")


def test_a_second_ctrl_c_in_a_batch_end_handler_aborts_as_from_the_driver():
    def twice(ctx):
        if ctx.phase == "train" and ctx.iter == 2:
            ctx.request_interrupt()
            raise KeyboardInterrupt  # before the loop took the first: an abort

    in_place, driven = run("fit", False, twice), run("fit", True, twice)
    assert_same(in_place, driven)
    assert isinstance(in_place["error"], KeyboardInterrupt)
    assert not [entry for entry in in_place["seen"] if entry[1] in ("exception", "interrupt")]
    assert [entry[0] for entry in in_place["seen"] if entry[1] == "teardown"] == ["first", "middle", "late"]


@pytest.mark.parametrize("stage", ["on_train_batch_end", "on_train_batch_after_loss"])
def test_a_failed_run_keeps_neither_its_context_nor_its_data_iterator_alive(stage):
    """The escaped error's traceback holds the loop's frames (the data iterator, the batch);
    once the error and the trainer are dropped, all of it goes (a DataLoader's iterator owns
    its worker processes)."""
    x, y = digits()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    refs: list[Any] = []

    class Batches:  # an iterable whose iterator can be watched
        def __iter__(self):
            iterator = _Iterator(iter(batches))
            refs.append(weakref.ref(iterator))
            return iterator

    class Fail(corolux.Callback):
        def setup(self, ctx):
            refs.append(weakref.ref(ctx))

        def fail(self, ctx):
            if ctx.iter == 3:
                raise ValueError("the handler failed")

    setattr(Fail, stage, Fail.fail)
    trainer = make_trainer()
    with pytest.raises(ValueError, match="the handler failed"):
        trainer.fit(Batches(), epochs=1, callbacks=[Fail()])
    del trainer
    gc.collect()
    assert len(refs) == 2
    assert [ref() for ref in refs] == [None, None]  # the run's ctx and its data iterator


class _Iterator:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> _Iterator:
        return self

    def __next__(self) -> Any:
        return next(self.inner)
