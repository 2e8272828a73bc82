"""The driver (DESIGN section 4 and section 8 "Signals and dispatch", "Runs"): weight order,
default callbacks, coroutines and filters, name checks, error notes, setup and teardown,
dispatch to listeners only."""

from __future__ import annotations

import io
import math
import traceback
from contextlib import nullcontext
from typing import Any

import pytest
import torch
from strategies import (
    at,
    check_structure,
    keyboard_interrupt_must_not_escape,
    make_batches,
    make_trainer,
    stage_recorder,
)

import corolux
from corolux.callbacks import DEFAULTS, MetricsTracker, ProgressBar


def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(3, 2)


def valid() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(2, 2, seed=1)


def logger(name: str, log: list[Any], *stages: str, weight: Any = 0) -> Any:
    """A class callback (built with the factory) appending ``(name, stage)`` at ``stages``."""

    def handler(stage: str) -> Any:
        return lambda self, ctx: log.append((name, stage))

    return corolux.callback(name, weight=weight, **{s: handler(s) for s in stages})()


@corolux.coroutine
def co_logger(name: str, log: list[Any], stage: str):  # type: ignore[no-untyped-def]
    while True:
        event = yield stage
        log.append((name, str(event.stage)))


def names_at(log: list[Any], stage: str, first: int | None = None) -> list[str]:
    got = [n for n, s in log if s == stage]
    return got[:first] if first is not None else got


# -- weights ----------------------------------------------------------------------------------------


def test_lower_weight_runs_first_ties_keep_list_order_inf_runs_last() -> None:
    log: list[Any] = []

    class Plain(corolux.Callback):
        weight = -1

        def on_epoch_end(self, ctx: Any) -> None:
            log.append(("f", "on_epoch_end"))

    callbacks = [
        logger("d", log, "on_epoch_end", weight=float("inf")),
        logger("a", log, "on_epoch_end", weight=0),
        logger("b", log, "on_epoch_end", weight=-1),
        logger("c", log, "on_epoch_end", weight=0),
        logger("e", log, "on_epoch_end", weight=0.5),
        Plain(),
        logger("g", log, "on_epoch_end"),  # default weight 0
    ]
    make_trainer().fit(data(), epochs=2, callbacks=callbacks)
    assert names_at(log, "on_epoch_end") == ["b", "f", "a", "c", "g", "e", "d"] * 2


def test_mapping_weight_applies_per_stage_and_other_stages_use_zero() -> None:
    log: list[Any] = []
    stages = ("on_epoch_begin", "on_epoch_end", "on_train_batch_end")
    callbacks = [
        logger("y", log, *stages),
        logger("x", log, *stages, weight={"on_epoch_end": -5, "on_train_batch_end": 5}),
        logger("z", log, *stages, weight=1),
    ]
    make_trainer().fit(data(), epochs=1, callbacks=callbacks)
    assert names_at(log, "on_epoch_begin") == ["y", "x", "z"]
    assert names_at(log, "on_epoch_end") == ["x", "y", "z"]
    assert names_at(log, "on_train_batch_end") == ["y", "z", "x"] * 3


@pytest.mark.parametrize("weight", ["high", None, [1], {"on_epoch_end": "early"}, object()])
def test_non_numeric_weight_is_a_type_error(weight: Any) -> None:
    cb = logger("w", [], "on_fit_begin", "on_epoch_end", weight=weight)
    with pytest.raises(TypeError, match="weight"):
        make_trainer().fit(data(), epochs=1, callbacks=[cb])


def test_mapping_weight_with_a_non_numeric_value_is_a_type_error_even_for_a_stage_not_listened_to() -> None:
    """'a number or a mapping stage -> number; anything else is a TypeError'."""
    cb = logger("w", [], "on_fit_begin", weight={"on_fit_begin": 1, "on_epoch_end": "early"})
    with pytest.raises(TypeError, match="weight"):
        make_trainer().fit(data(), epochs=1, callbacks=[cb])


def test_mapping_weight_with_an_unknown_stage_is_rejected() -> None:
    cb = logger("w", [], "on_fit_begin", weight={"on_epoch_ned": 1})
    with pytest.raises(ValueError, match="did you mean 'on_epoch_end'"):
        make_trainer().fit(data(), epochs=1, callbacks=[cb])


# -- default callbacks --------------------------------------------------------------------------------


def test_default_weights_are_documented_in_the_table() -> None:
    assert DEFAULTS[MetricsTracker] == -100
    assert DEFAULTS[ProgressBar] == 100


def test_metrics_tracker_runs_before_user_callbacks() -> None:
    seen: list[tuple[str, Any]] = []
    early = at(
        "on_train_end", lambda ctx: seen.append(("train_end", ctx.metrics.get("train_loss"))), weight=-50
    )
    at_epoch_end = at("on_epoch_end", lambda ctx: seen.append(("epoch_end", len(ctx.history))))
    make_trainer().fit(data(), epochs=2, callbacks=[early, at_epoch_end])
    assert [k for k, _ in seen] == ["train_end", "epoch_end"] * 2
    assert all(v is not None and math.isfinite(float(v)) for k, v in seen if k == "train_end")
    assert [v for k, v in seen if k == "epoch_end"] == [1, 2]  # this epoch's record already written


def test_progress_bar_runs_after_user_callbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[Any] = []
    original = ProgressBar.on_train_begin

    def spy(self: Any, ctx: Any) -> None:
        log.append(("progress", "on_train_begin"))
        original(self, ctx)

    monkeypatch.setattr(ProgressBar, "on_train_begin", spy)
    bar = ProgressBar(style="bar", file=io.StringIO())
    user = logger("user", log, "on_train_begin", weight=50)
    make_trainer(progress=True).fit(data(), epochs=1, callbacks=[bar, user])
    assert names_at(log, "on_train_begin") == ["user", "progress"]


def test_user_callback_of_a_default_class_replaces_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    buffer = io.StringIO()
    seen: list[Any] = []
    trainer = make_trainer(progress=True, metrics=[corolux.metrics.MAE()])
    probe = at("on_fit_begin", lambda ctx: seen.extend(ctx.callbacks))
    history = trainer.fit(
        data(), epochs=1, callbacks=[ProgressBar(style="bar", file=buffer), MetricsTracker(), probe]
    )
    assert sum(isinstance(cb, ProgressBar) for cb in seen) == 1
    assert sum(isinstance(cb, MetricsTracker) for cb in seen) == 1
    assert buffer.getvalue(), "the user's bar did not write"
    assert capsys.readouterr().err == "", "the default bar still wrote to stderr"
    assert "train_loss" in history and "train_mae" not in history  # the user's tracker has no MAE


def test_progress_false_drops_the_bar(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[Any] = []
    make_trainer(progress=False).fit(
        data(), epochs=1, callbacks=[at("on_fit_begin", lambda ctx: seen.extend(ctx.callbacks))]
    )
    assert not any(isinstance(cb, ProgressBar) for cb in seen)
    assert any(isinstance(cb, MetricsTracker) for cb in seen)


# -- coroutines --------------------------------------------------------------------------------------


def test_coroutines_merge_with_class_handlers_in_weight_order() -> None:
    log: list[Any] = []
    first = corolux.coroutine(weight=-1)(co_logger.__wrapped__)
    middle = corolux.coroutine(weight=1)(co_logger.__wrapped__)
    per_stage = corolux.coroutine(weight={"on_epoch_end": 10})(co_logger.__wrapped__)
    callbacks = [
        logger("A", log, "on_epoch_end"),
        per_stage("co_map", log, "on_epoch_end"),  # 10 at on_epoch_end
        logger("B", log, "on_epoch_end", weight=2),
        middle("co_1", log, "on_epoch_end"),
        co_logger("co_0", log, "on_epoch_end"),  # weight 0, after A in list order
        logger("C", log, "on_epoch_end", weight=float("inf")),
        first("co_-1", log, "on_epoch_end"),
    ]
    make_trainer().fit(data(), epochs=2, callbacks=callbacks)
    assert names_at(log, "on_epoch_end") == ["co_-1", "A", "co_0", "co_1", "B", "co_map", "C"] * 2


def test_coroutine_is_merged_at_each_stage_it_waits_for() -> None:
    log: list[Any] = []

    @corolux.coroutine(weight=1)
    def alternating():  # type: ignore[no-untyped-def]
        while True:
            yield "on_epoch_begin"
            log.append(("co", "on_epoch_begin"))
            yield "on_epoch_end"
            log.append(("co", "on_epoch_end"))

    callbacks = [
        logger("late", log, "on_epoch_begin", "on_epoch_end", weight=2),
        alternating(),
        logger("early", log, "on_epoch_begin", "on_epoch_end", weight=0),
    ]
    make_trainer().fit(data(), epochs=2, callbacks=callbacks)
    assert names_at(log, "on_epoch_begin") == ["early", "co", "late"] * 2
    assert names_at(log, "on_epoch_end") == ["early", "co", "late"] * 2


@pytest.mark.parametrize(
    "spec",
    [
        ("on_epoch_begin", "on_epoch_end"),
        ["on_epoch_begin", "on_epoch_end"],
        frozenset({"on_epoch_begin", "on_epoch_end"}),
    ],
)
def test_coroutine_waits_for_a_collection_of_stages(spec: Any) -> None:
    woke: list[tuple[str, int]] = []

    @corolux.coroutine
    def watcher():  # type: ignore[no-untyped-def]
        while True:
            event = yield spec
            woke.append((str(event.stage), event.ctx.epoch))

    make_trainer().fit(data(), epochs=2, callbacks=[watcher()])
    assert woke == [("on_epoch_begin", 1), ("on_epoch_end", 1), ("on_epoch_begin", 2), ("on_epoch_end", 2)]


@pytest.mark.parametrize(
    "spec",
    [
        ["on_train_batch_end", "on_train_batch_end"],
        ("on_train_batch_end", corolux.Stage.on_train_batch_end),
        ("on_train_batch_end", corolux.every("on_train_batch_end", 2)),
    ],
)
def test_a_coroutine_waiting_on_a_stage_twice_over_wakes_once_per_event(spec: Any) -> None:
    woke: list[int] = []

    @corolux.coroutine
    def watcher():  # type: ignore[no-untyped-def]
        while True:
            event = yield spec
            woke.append(event.ctx.iter)

    make_trainer().fit(make_batches(4, 2), epochs=1, callbacks=[watcher()])
    assert woke == [1, 2, 3, 4]


def test_every_fires_on_the_nth_occurrences_of_the_run() -> None:
    woke: list[tuple[int, int]] = []

    @corolux.coroutine
    def every_third():  # type: ignore[no-untyped-def]
        while True:
            event = yield corolux.every("on_train_batch_end", 3)
            woke.append((event.ctx.epoch, event.ctx.iter))

    make_trainer().fit(make_batches(4, 2), epochs=3, callbacks=[every_third()])
    # 12 batch ends in all (4 per epoch): the 3rd, 6th, 9th and 12th.
    assert woke == [(1, 3), (2, 2), (3, 1), (3, 4)]


def test_every_counts_globally_even_when_waited_for_late() -> None:
    woke: list[tuple[int, int]] = []

    @corolux.coroutine
    def late():  # type: ignore[no-untyped-def]
        event = yield "on_epoch_begin"
        while event.ctx.epoch < 2:
            event = yield "on_epoch_begin"
        while True:  # registered after 4 batch ends: next due is the 6th, then the 9th
            event = yield corolux.every("on_train_batch_end", 3)
            woke.append((event.ctx.epoch, event.ctx.iter))

    make_trainer().fit(make_batches(4, 2), epochs=3, callbacks=[late()])
    assert woke == [(2, 2), (3, 1), (3, 4)]


def test_every_rejects_a_non_positive_n() -> None:
    with pytest.raises(ValueError, match="every"):
        corolux.every("on_train_batch_end", 0)


def test_coroutine_that_returns_is_detached() -> None:
    woke: list[str] = []

    @corolux.coroutine
    def once():  # type: ignore[no-untyped-def]
        event = yield "on_train_batch_end"
        woke.append(f"{event.ctx.epoch}.{event.ctx.iter}")

    @corolux.coroutine
    def never():  # type: ignore[no-untyped-def]
        return
        yield "on_epoch_end"  # pragma: no cover - makes this a generator

    recorder = stage_recorder()
    history = make_trainer().fit(data(), epochs=2, callbacks=[once(), never(), recorder])
    assert woke == ["1.1"]
    assert len(history) == 2
    check_structure(recorder.stages, complete=True)


@corolux.coroutine
def run_log(log: list[Any]):  # type: ignore[no-untyped-def]
    log.append("start")
    try:
        while True:
            event = yield "on_epoch_end"
            log.append(event.ctx.epoch)
    finally:
        log.append("closed")


def test_one_coroutine_instance_serves_two_runs_fresh_each_time() -> None:
    log: list[Any] = []
    cb = run_log(log)
    trainer = make_trainer()
    trainer.fit(data(), epochs=2, callbacks=[cb])
    trainer.fit(data(), epochs=3, callbacks=[cb])
    for _ in trainer.run(data(), epochs=1, callbacks=[cb]):
        pass
    assert log == ["start", 1, 2, "closed", "start", 1, 2, 3, "closed", "start", 1, "closed"]


# -- name checks ---------------------------------------------------------------------------------------


def _rejected_before_first_event(build: Any, suggestion: str) -> None:
    """``build()`` makes the bad callback; it must be rejected with the suggestion before any
    event of the run (whether at definition, at run() or at the first next())."""
    recorder = stage_recorder(weight=-1000)
    events: list[str] = []
    trainer = make_trainer()
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        bad = build()
        for event in trainer.run(data(), epochs=1, callbacks=[recorder, bad]):
            events.append(str(event.stage))
    assert events == [] and recorder.stages == []
    # Same through fit(), and the trainer still works afterwards.
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        trainer.fit(data(), epochs=1, callbacks=[build()])
    assert len(trainer.fit(data(), epochs=1)) == 1


def test_unknown_method_name_is_rejected_with_a_suggestion() -> None:
    def build() -> Any:
        class Typo(corolux.Callback):  # validation may happen here, at the definition
            def on_epoch_ned(self, ctx: Any) -> None:  # pragma: no cover
                pass

        return Typo()

    _rejected_before_first_event(build, "on_epoch_end")


def test_unknown_factory_keyword_is_rejected_with_a_suggestion() -> None:
    _rejected_before_first_event(
        lambda: corolux.callback("typo", on_train_batch_ned=lambda self, ctx: None)(), "on_train_batch_end"
    )


def test_unknown_first_coroutine_yield_is_rejected_with_a_suggestion() -> None:
    @corolux.coroutine
    def typo():  # type: ignore[no-untyped-def]
        yield "on_valid_bgin"

    _rejected_before_first_event(typo, "on_valid_begin")


def test_unknown_filter_stage_is_rejected_with_a_suggestion() -> None:
    @corolux.coroutine
    def typo():  # type: ignore[no-untyped-def]
        while True:
            yield corolux.every("on_train_batch_ned", 2)

    _rejected_before_first_event(typo, "on_train_batch_end")


def test_unknown_stage_in_a_collection_is_rejected_with_a_suggestion() -> None:
    @corolux.coroutine
    def typo():  # type: ignore[no-untyped-def]
        yield ("on_epoch_begin", "on_epoch_edn")

    _rejected_before_first_event(typo, "on_epoch_end")


@corolux.coroutine
def later_typo():  # type: ignore[no-untyped-def]
    yield "on_epoch_begin"
    yield "on_epoch_ned"


def test_unknown_later_coroutine_yield_is_rejected_when_it_happens() -> None:
    trainer = make_trainer()
    events: list[str] = []
    with pytest.raises(ValueError, match="did you mean 'on_epoch_end'") as info:
        for event in trainer.run(data(), epochs=1, callbacks=[later_typo()]):
            events.append(str(event.stage))
    assert events[:2] == ["on_fit_begin", "on_epoch_begin"] or events[:1] == ["on_fit_begin"]
    assert events[-1] == "on_exception"
    assert "on_train_batch_begin" not in events
    assert any("later_typo" in note and "on_epoch_begin" in note for note in info.value.__notes__)


def test_custom_stages_are_known_and_suggested() -> None:
    class Custom(corolux.Trainer):
        stages = ("on_custom_stage",)

    def trainer() -> corolux.Trainer:
        return Custom(
            torch.nn.Linear(3, 1),
            loss_fn=torch.nn.functional.mse_loss,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            device="cpu",
            progress=False,
        )

    good = corolux.callback("good", on_custom_stage=lambda self, ctx: None)()
    assert len(trainer().fit(data(), epochs=1, callbacks=[good])) == 1
    bad = corolux.callback("bad", on_custom_stag=lambda self, ctx: None)
    with pytest.raises(ValueError, match="did you mean 'on_custom_stage'"):
        trainer().fit(data(), epochs=1, callbacks=[bad()])


# -- errors --------------------------------------------------------------------------------------------


class BoomError(Exception):
    pass


class Boom(corolux.Callback):
    def __init__(self) -> None:
        self.raised: BaseException | None = None

    def on_train_batch_end(self, ctx: Any) -> None:
        if ctx.iter == 2:
            self.raised = BoomError("boom at batch 2")
            raise self.raised


def _frames(exc: BaseException) -> list[tuple[str, str]]:
    return [(f.filename, f.name) for f in traceback.extract_tb(exc.__traceback__)]


def test_callback_error_keeps_type_message_traceback_and_gains_a_note() -> None:
    boom = Boom()
    with pytest.raises(BoomError) as info:
        make_trainer().fit(data(), epochs=1, callbacks=[boom])
    exc = info.value
    assert exc is boom.raised
    assert type(exc) is BoomError
    assert str(exc) == "boom at batch 2"
    assert "in Boom.on_train_batch_end" in exc.__notes__
    assert (__file__, "on_train_batch_end") in _frames(exc), "the raising frame is not in the traceback"


def test_a_step_error_names_the_stage_it_followed_in_fit_as_in_run() -> None:
    # fit() does not yield the stages inside a batch that nothing watches, but the loop
    # still records them: the note names the same stage as when every event is yielded.
    def failing_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise BoomError("loss failed")

    notes = []
    for drive in ("fit", "run"):
        trainer = make_trainer()
        trainer.loss_fn = failing_loss
        with pytest.raises(BoomError) as info:
            if drive == "fit":
                trainer.fit(data(), epochs=1)
            else:
                for _ in trainer.run(data(), epochs=1):
                    pass
        notes.append([n for n in info.value.__notes__ if n.startswith("raised in")])
    assert (
        notes[0]
        == notes[1]
        == ["raised in the train step after 'on_train_batch_after_pred' (epoch 1, batch 1)"]
    )


def test_factory_callback_error_note_names_the_factory_class() -> None:
    def fail(self: Any, ctx: Any) -> None:
        raise KeyError("missing")

    cb = corolux.callback("my_cb", on_epoch_end=fail)()
    with pytest.raises(KeyError, match="missing") as info:
        make_trainer().fit(data(), epochs=1, callbacks=[cb])
    assert "in my_cb.on_epoch_end" in info.value.__notes__
    assert (__file__, "fail") in _frames(info.value)


@corolux.coroutine
def failing_coroutine():  # type: ignore[no-untyped-def]
    yield "on_train_begin"
    raise BoomError("coroutine failed")


def test_coroutine_error_note_names_the_coroutine_and_stage() -> None:
    with pytest.raises(BoomError, match="coroutine failed") as info:
        make_trainer().fit(data(), epochs=1, callbacks=[failing_coroutine()])
    assert "in failing_coroutine.on_train_begin" in info.value.__notes__
    assert (__file__, "failing_coroutine") in _frames(info.value)


def test_on_exception_sees_the_escaping_error() -> None:
    seen: list[BaseException | None] = []
    boom = Boom()
    listener = at("on_exception", lambda ctx: seen.append(ctx.exception))
    with pytest.raises(BoomError):
        make_trainer().fit(data(), epochs=1, callbacks=[boom, listener])
    assert seen == [boom.raised]


# -- setup and teardown ---------------------------------------------------------------------------------


class Lifecycle(corolux.Callback):
    def __init__(self, name: str, log: list[Any], weight: float = 0) -> None:
        self.name = name
        self.log = log
        self.weight = weight

    def setup(self, ctx: Any) -> None:
        self.log.append((self.name, "setup"))

    def on_fit_begin(self, ctx: Any) -> None:
        self.log.append((self.name, "on_fit_begin"))

    def on_train_batch_end(self, ctx: Any) -> None:
        self.log.append((self.name, "on_train_batch_end"))

    def on_fit_end(self, ctx: Any) -> None:
        self.log.append((self.name, "on_fit_end"))

    def on_exception(self, ctx: Any) -> None:
        self.log.append((self.name, "on_exception"))

    def teardown(self, ctx: Any) -> None:
        self.log.append((self.name, "teardown"))


def test_setup_runs_before_on_fit_begin_in_weight_order() -> None:
    log: list[Any] = []
    callbacks = [Lifecycle("a", log, 5), Lifecycle("b", log, -5), Lifecycle("c", log, 0)]
    gen = make_trainer().run(data(), epochs=1, callbacks=callbacks)
    first = next(gen)
    assert first.stage == "on_fit_begin"
    assert log == [
        ("b", "setup"),
        ("c", "setup"),
        ("a", "setup"),
        ("b", "on_fit_begin"),
        ("c", "on_fit_begin"),
        ("a", "on_fit_begin"),
    ]
    gen.close()


def _ctrl_c(ctx: Any) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("outcome", ["normal", "stop", "exception", "close", "interrupt"])
def test_teardown_runs_once_after_the_last_event_in_every_outcome(outcome: str) -> None:
    log: list[Any] = []
    a, b = Lifecycle("a", log), Lifecycle("b", log, 1)
    extra: list[Any] = []
    if outcome == "stop":
        extra = [at("on_train_batch_end", lambda ctx: ctx.stop_training(), it=1)]
    elif outcome == "exception":
        extra = [Boom()]
    elif outcome == "interrupt":
        extra = [at("on_train_batch_end", _ctrl_c, it=1)]
    trainer = make_trainer()
    gen = trainer.run(data(), epochs=2, callbacks=[a, b, *extra])
    consumer: list[str] = []
    with keyboard_interrupt_must_not_escape():
        try:
            for event in gen:
                consumer.append(str(event.stage))
                if outcome == "close" and event.stage == "on_train_batch_end":
                    gen.close()
                    assert log.count(("a", "teardown")) == 1
                    break
        except BoomError:
            assert outcome == "exception"
            assert consumer[-1] == "on_exception"
    assert log.count(("a", "teardown")) == 1 and log.count(("b", "teardown")) == 1
    assert log[-2:] == [("a", "teardown"), ("b", "teardown")]
    last_event = {
        "normal": "on_fit_end",
        "stop": "on_fit_end",
        "interrupt": "on_fit_end",
        "exception": "on_exception",
        "close": "on_train_batch_end",
    }[outcome]
    assert log[-3] == ("b", last_event)
    # Nothing after teardown, and the trainer can run again.
    assert len(trainer.fit(data(), epochs=1)) == 1


# -- dispatch to listeners only -------------------------------------------------------------------------


class EpochOnly(corolux.Callback):
    """Counts every attribute access made while a batch stage is being dispatched."""

    def __init__(self) -> None:
        self.ctx: Any = None
        self.epochs = 0
        self.batch_accesses: list[tuple[str, str]] = []

    def __getattribute__(self, name: str) -> Any:
        ctx = object.__getattribute__(self, "__dict__").get("ctx")
        stage = str(getattr(ctx, "stage", "") or "")
        if "batch" in stage:
            object.__getattribute__(self, "batch_accesses").append((stage, name))
        return object.__getattribute__(self, name)

    def on_fit_begin(self, ctx: Any) -> None:
        self.ctx = ctx

    def on_epoch_end(self, ctx: Any) -> None:
        self.epochs += 1


def test_a_callback_without_batch_methods_is_never_touched_per_batch() -> None:
    cb = EpochOnly()
    make_trainer().fit(data(), epochs=2, valid_data=valid(), callbacks=[cb])
    assert cb.epochs == 2
    assert cb.batch_accesses == [], cb.batch_accesses[:5]


def test_callback_base_class_has_no_stage_stubs() -> None:
    assert [n for n in dir(corolux.Callback) if n.startswith("on_")] == []


# -- one delivery path: stages the loop yields, emitted ones, on_interrupt, on_exception ----------


@pytest.mark.parametrize("stage", ["on_exception", "on_interrupt", "on_early_stopping", "on_epoch_end"])
@pytest.mark.parametrize("how", ["filter", "stage"])
def test_a_coroutine_wakes_at_every_kind_of_stage_whether_by_filter_or_by_name(stage, how):
    woken: list[str] = []

    @corolux.coroutine
    def watcher():  # type: ignore[no-untyped-def]
        while True:
            event = yield (corolux.every(stage, 1) if how == "filter" else stage)
            woken.append(str(event.stage))

    cause = {
        "on_exception": at("on_epoch_end", lambda ctx: 1 / 0),
        "on_interrupt": at("on_epoch_end", _ctrl_c),
        "on_early_stopping": at("on_epoch_end", lambda ctx: ctx.emit("on_early_stopping")),
        "on_epoch_end": at("on_epoch_end", lambda ctx: None),
    }[stage]
    trainer = make_trainer()
    with (
        keyboard_interrupt_must_not_escape(),
        pytest.warns(RuntimeWarning) if stage == "on_interrupt" else nullcontext(),
    ):
        try:
            trainer.fit(data(), epochs=1, callbacks=[cause, watcher()])
        except ZeroDivisionError:
            assert stage == "on_exception"
    assert woken == [stage]


def test_an_error_in_setup_is_followed_by_on_exception() -> None:
    seen: list[Any] = []
    failing = corolux.callback(
        "failing",
        setup=lambda self, ctx: (_ for _ in ()).throw(TypeError("bad setup")),
        on_exception=lambda self, ctx: seen.append(ctx.exception),
    )()
    stream: list[str] = []
    with pytest.raises(TypeError, match="bad setup") as info:
        for event in make_trainer().run(data(), epochs=1, callbacks=[failing]):
            stream.append(str(event.stage))
    assert stream == ["on_exception"] and seen == [info.value]
    assert "in failing.setup" in info.value.__notes__


def test_at_on_exception_the_error_and_its_traceback_are_ctx_exception() -> None:
    # The handlers run after the loop's frame is gone: the error travels as ctx.exception,
    # with its traceback (log it with logging.error(..., exc_info=ctx.exception)).
    formatted: list[str] = []
    boom = at("on_train_batch_end", lambda ctx: 1 / 0)
    log = at("on_exception", lambda ctx: formatted.append("".join(traceback.format_exception(ctx.exception))))
    with pytest.raises(ZeroDivisionError):
        make_trainer().fit(data(), epochs=1, callbacks=[boom, log])
    assert "ZeroDivisionError: division by zero" in formatted[0] and "<lambda>" in formatted[0]


def test_a_consumer_throwing_at_on_exception_gets_one_on_exception_and_its_own_error() -> None:
    boom = at("on_train_batch_end", lambda ctx: 1 / 0)
    gen = make_trainer().run(data(), epochs=1, callbacks=[boom])
    seen: list[str] = []
    with pytest.raises(ValueError, match="consumer gave up"):
        for event in gen:
            seen.append(str(event.stage))
            if event.stage == "on_exception":
                gen.throw(ValueError("consumer gave up"))
    assert seen.count("on_exception") == 1


def test_two_callbacks_sharing_one_handler_function_are_each_named_in_errors() -> None:
    calls: list[int] = []

    def shared(ctx: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the second one fails")

    class Hook(corolux.Callback):
        def __init__(self, fn: Any) -> None:
            self.on_epoch_end = fn

    class First(Hook):
        pass

    class Second(Hook):
        pass

    with pytest.raises(RuntimeError) as info:
        make_trainer().fit(data(), epochs=1, callbacks=[First(shared), Second(shared)])
    assert info.value.__notes__[0] == "in Second.on_epoch_end"


def test_events_carry_the_stage_members_whether_waited_for_by_name_or_first_met_in_the_run() -> None:
    seen: list[Any] = []

    @corolux.coroutine
    def by_name():  # type: ignore[no-untyped-def]
        while True:
            event = yield "on_train_batch_end"  # a plain str: its slot is made from it
            seen.append(event.stage)

    trainer = make_trainer()
    stages = [event.stage for event in trainer.run(make_batches(2, 2), epochs=1, callbacks=[by_name()])]
    assert seen and all(stage is corolux.Stage.on_train_batch_end for stage in seen)
    assert stages[0] is corolux.Stage.on_fit_begin and stages[-1] is corolux.Stage.on_fit_end
    assert all(type(stage) is corolux.Stage for stage in stages)
