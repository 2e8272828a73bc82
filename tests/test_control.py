"""Control flow (DESIGN section 3 and section 8 "Signals and dispatch"): stop, skip batch,
skip validation, their exception forms, Ctrl-C, max_steps and ctx.emit, one behaviour per
test, on a tiny real regression."""

from __future__ import annotations

import math
import os
import re
import signal
import warnings
from typing import Any

import pytest
import torch
from strategies import (
    TRAIN_INNER,
    at,
    check_structure,
    hand_sgd_step,
    keyboard_interrupt_must_not_escape,
    make_batches,
    make_trainer,
    params_of,
    replicate,
    same_params,
    stage_recorder,
    weighted_mean,
)

import corolux

SIZES = [2, 3, 4]


def check_structure_complete(stream: list[str]) -> None:
    check_structure(stream, complete=True)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(3, SIZES, seed=0)


def valid_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return make_batches(2, 3, seed=1)


def run_stream(trainer: corolux.Trainer, *args: Any, **kwargs: Any) -> tuple[list[str], Any]:
    """Consume ``trainer.run(...)``; return the stages and the ctx."""
    stream: list[str] = []
    ctx = None
    with keyboard_interrupt_must_not_escape():
        for event in trainer.run(*args, **kwargs):
            stream.append(str(event.stage))
            ctx = event.ctx
    return stream, ctx


def tail_after(stream: list[str], index: int) -> list[str]:
    return stream[index + 1 :]


def nth(stream: list[str], stage: str, n: int) -> int:
    """Index of the n-th (1-based) occurrence of ``stage``."""
    found = [i for i, s in enumerate(stream) if s == stage]
    return found[n - 1]


# -- stop training ------------------------------------------------------------------------------


def test_stop_mid_batch_lets_the_step_finish_and_ends_every_scope() -> None:
    trainer = make_trainer()
    snapshots: dict[str, list[torch.Tensor]] = {}
    begin = at("on_train_batch_begin", lambda ctx: snapshots.setdefault("begin", params_of(ctx.model)), it=2)
    stop = at("on_train_batch_after_loss", lambda ctx: ctx.stop_training("enough"), epoch=1, it=2)
    end = at("on_train_batch_end", lambda ctx: snapshots.setdefault("end", params_of(ctx.model)), it=2)
    stream, ctx = run_stream(
        trainer, batches(), epochs=2, valid_data=valid_batches(), callbacks=[begin, stop, end]
    )
    i = nth(stream, "on_train_batch_after_loss", 2)
    assert tail_after(stream, i) == [
        "on_train_batch_before_backward",
        "on_train_batch_before_step",
        "on_train_batch_after_step",
        "on_train_batch_end",
        "on_train_end",
        "on_epoch_end",
        "on_fit_end",
    ]
    assert not same_params(snapshots["begin"], snapshots["end"]), "the stopped batch's step did not run"
    assert ctx.step == 2
    assert ctx.stop_reason == "enough"
    # The batch is counted: train_loss is the size-weighted mean of batches 1 and 2.
    expected, model = replicate(batches(), stop_after=(1, 2))
    counted = [(loss, size) for _, _, loss, size in expected]
    assert trainer.history["train_loss"] == pytest.approx([weighted_mean(counted)])
    assert same_params(params_of(trainer.model), params_of(model))
    assert "valid_loss" not in trainer.history or math.isnan(trainer.history["valid_loss"][0])


def test_stop_at_epoch_end_ends_there() -> None:
    trainer = make_trainer()
    stop = at("on_epoch_end", lambda ctx: ctx.stop_training("early"), epoch=1)
    stream, ctx = run_stream(trainer, batches(), epochs=3, valid_data=valid_batches(), callbacks=[stop])
    i = nth(stream, "on_epoch_end", 1)
    assert tail_after(stream, i) == ["on_fit_end"]
    assert stream.count("on_valid_begin") == 1
    assert ctx.completed_epochs == 1
    assert len(trainer.history) == 1
    assert math.isfinite(trainer.history["valid_loss"][0])


def test_stop_at_fit_begin_runs_no_epoch() -> None:
    trainer = make_trainer()
    before = params_of(trainer.model)
    stop = at("on_fit_begin", lambda ctx: ctx.stop_training("nothing to do"))
    stream, ctx = run_stream(trainer, batches(), epochs=3, valid_data=valid_batches(), callbacks=[stop])
    assert stream == ["on_fit_begin", "on_fit_end"]
    assert len(trainer.history) == 0
    assert ctx.completed_epochs == 0
    assert ctx.stop_reason == "nothing to do"
    assert same_params(before, params_of(trainer.model))


@pytest.mark.parametrize("stage", ["on_epoch_begin", "on_train_begin"])
def test_stop_before_any_batch_runs_no_batch(stage: str) -> None:
    """'No further batches': a stop given before the first batch of an epoch runs none."""
    trainer = make_trainer()
    before = params_of(trainer.model)
    stop = at(stage, lambda ctx: ctx.stop_training())
    stream, ctx = run_stream(trainer, batches(), epochs=2, callbacks=[stop])
    assert "on_train_batch_begin" not in stream, stream
    assert ctx.step == 0
    assert same_params(before, params_of(trainer.model))
    check_structure_complete(stream)


def test_stop_at_valid_begin_runs_no_validation_batch() -> None:
    trainer = make_trainer()
    stop = at("on_valid_begin", lambda ctx: ctx.stop_training())
    stream, _ = run_stream(trainer, batches(), epochs=2, valid_data=valid_batches(), callbacks=[stop])
    assert "on_valid_batch_begin" not in stream, stream
    check_structure_complete(stream)


def test_cut_short_epoch_is_recorded_but_not_completed() -> None:
    trainer = make_trainer()
    stop = at("on_train_batch_end", lambda ctx: ctx.stop_training(), epoch=2, it=1)
    stream, ctx = run_stream(trainer, batches(), epochs=3, valid_data=valid_batches(), callbacks=[stop])
    assert ctx.completed_epochs == 1
    assert len(trainer.history) == 2  # the partial epoch has its record
    assert trainer.history["epoch"] == [1, 2]
    assert stream.count("on_epoch_end") == 2


def test_max_steps_stops_after_that_many_steps() -> None:
    trainer = make_trainer()
    recorder = stage_recorder()
    history = trainer.fit(batches(), epochs=4, max_steps=5, callbacks=[recorder])
    stream = recorder.stages
    assert stream.count("on_train_batch_after_step") == 5
    assert stream.count("on_epoch_begin") == 2
    i = nth(stream, "on_train_batch_after_step", 5)
    assert tail_after(stream, i) == ["on_train_batch_end", "on_train_end", "on_epoch_end", "on_fit_end"]
    assert len(history) == 2
    expected, model = replicate(batches(), epochs=2, stop_after=(2, 2))
    assert same_params(params_of(trainer.model), params_of(model))


def test_max_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        make_trainer().fit(batches(), max_steps=0)


# -- skip batch -------------------------------------------------------------------------------------


def test_skip_after_loss_takes_no_backward_no_step_and_drops_the_batch_from_train_loss() -> None:
    trainer = make_trainer()
    backward_passes = []
    for p in trainer.model.parameters():
        p.register_hook(lambda grad, p=p: backward_passes.append(p))
    snapshots: dict[str, list[torch.Tensor]] = {}
    skipped_flags: list[bool] = []
    begin = at("on_train_batch_begin", lambda ctx: snapshots.setdefault("begin", params_of(ctx.model)), it=2)
    skip = at("on_train_batch_after_loss", lambda ctx: ctx.skip_batch(), it=2)
    end = at(
        "on_train_batch_end",
        lambda ctx: (snapshots.setdefault("end", params_of(ctx.model)), skipped_flags.append(ctx.skipped)),
        it=2,
    )
    stream, ctx = run_stream(trainer, batches(), epochs=1, callbacks=[begin, skip, end])
    b = nth(stream, "on_train_batch_begin", 2)
    assert stream[b : b + 4] == [
        "on_train_batch_begin",
        "on_train_batch_after_pred",
        "on_train_batch_after_loss",
        "on_train_batch_end",
    ]
    assert same_params(snapshots["begin"], snapshots["end"])
    assert skipped_flags == [True]
    assert len(backward_passes) == 2 * 2  # batches 1 and 3, two parameters each
    assert ctx.step == 2
    expected, model = replicate(batches(), skip=frozenset({(1, 2)}))
    counted = [(loss, n) for _, i, loss, n in expected if i != 2]
    assert trainer.history["train_loss"] == pytest.approx([weighted_mean(counted)], rel=1e-6)
    # Hand check of the numbers themselves (sizes 2 and 4 out of 2, 3, 4).
    assert weighted_mean(counted) == pytest.approx((2 * expected[0][2] + 4 * expected[2][2]) / 6)
    assert same_params(params_of(trainer.model), params_of(model))


def test_skip_after_backward_drops_the_gradients_before_the_next_step() -> None:
    trainer = make_trainer()
    skip = at("on_train_batch_before_step", lambda ctx: ctx.skip_batch(), it=2)
    stream, ctx = run_stream(trainer, batches(), epochs=1, callbacks=[skip])
    assert ctx.step == 2
    _, model = replicate(batches(), skip=frozenset({(1, 2)}))
    assert all(
        torch.allclose(a, b, atol=1e-7)
        for a, b in zip(params_of(trainer.model), params_of(model), strict=True)
    )


def test_skipped_batches_end_with_ctx_skipped_and_others_without() -> None:
    trainer = make_trainer()
    flags: list[tuple[int, bool]] = []
    skip = at("on_train_batch_begin", lambda ctx: ctx.skip_batch(), it=3)
    flag = at("on_train_batch_end", lambda ctx: flags.append((ctx.iter, ctx.skipped)))
    run_stream(trainer, batches(), epochs=1, callbacks=[skip, flag])
    assert flags == [(1, False), (2, False), (3, True)]


OUTSIDE_A_BATCH = [
    "on_fit_begin",
    "on_epoch_begin",
    "on_train_begin",
    "on_train_batch_end",
    "on_train_end",
    "on_valid_begin",
    "on_valid_batch_end",
    "on_valid_end",
    "on_epoch_end",
    "on_fit_end",
]


def _raise_skip(ctx: Any) -> None:
    raise corolux.SkipBatch


@pytest.mark.parametrize("form", ["method", "raise"])
@pytest.mark.parametrize("stage", OUTSIDE_A_BATCH)
def test_skip_batch_outside_a_batch_is_a_runtime_error_naming_the_stage(stage: str, form: str) -> None:
    trainer = make_trainer()
    action = (lambda ctx: ctx.skip_batch()) if form == "method" else _raise_skip
    cb = at(stage, action)
    with pytest.raises(RuntimeError, match=re.escape(stage)):
        trainer.fit(batches(), epochs=1, valid_data=valid_batches(), callbacks=[cb])
    assert cb.calls == 1


def test_skip_batch_by_the_consumer_outside_a_batch_raises_at_once() -> None:
    trainer = make_trainer()
    gen = trainer.run(batches(), epochs=1)
    event = next(gen)
    assert event.stage == "on_fit_begin"
    with pytest.raises(RuntimeError, match="on_fit_begin"):
        event.ctx.skip_batch()
    gen.close()


# -- skip validation -----------------------------------------------------------------------------------


def test_skip_validation_skips_that_epochs_validation_and_history_holds_nan() -> None:
    trainer = make_trainer()
    skip = at("on_epoch_begin", lambda ctx: ctx.skip_validation(), epoch=2)
    stream, _ = run_stream(trainer, batches(), epochs=3, valid_data=valid_batches(), callbacks=[skip])
    assert stream.count("on_valid_begin") == 2
    e2 = nth(stream, "on_epoch_begin", 2)
    e2_end = nth(stream, "on_epoch_end", 2)
    assert "on_valid_begin" not in stream[e2:e2_end]
    valid = trainer.history["valid_loss"]
    assert len(valid) == 3
    assert math.isfinite(valid[0]) and math.isnan(valid[1]) and math.isfinite(valid[2])
    assert all(math.isfinite(v) for v in trainer.history["train_loss"])


def test_skip_validation_during_validation_is_a_no_op() -> None:
    trainer = make_trainer()
    skip = at("on_valid_batch_begin", lambda ctx: ctx.skip_validation(), it=1)
    stream, _ = run_stream(trainer, batches(), epochs=2, valid_data=valid_batches(), callbacks=[skip])
    assert stream.count("on_valid_batch_end") == 2 * 2
    assert all(math.isfinite(v) for v in trainer.history["valid_loss"])


def test_skip_validation_without_validation_data_is_a_no_op() -> None:
    plain, _ = run_stream(make_trainer(), batches(), epochs=2)
    skip = at("on_epoch_begin", lambda ctx: ctx.skip_validation())
    skipped, _ = run_stream(make_trainer(), batches(), epochs=2, callbacks=[skip])
    assert skipped == plain


# -- who gives the signal -----------------------------------------------------------------------------

SIGNAL_CASES = {
    # name: (stage, epoch, iter, method, exception)
    "stop": (
        "on_train_batch_after_loss",
        1,
        2,
        lambda ctx: ctx.stop_training("why"),
        lambda: corolux.StopTraining("why"),
    ),
    "skip_batch": (
        "on_train_batch_after_loss",
        1,
        2,
        lambda ctx: ctx.skip_batch(),
        lambda: corolux.SkipBatch(),
    ),
    "skip_validation": (
        "on_train_end",
        1,
        None,
        lambda ctx: ctx.skip_validation(),
        lambda: corolux.SkipValidation(),
    ),
}


def _outcome(trainer: corolux.Trainer, callbacks: list[Any], consumer: Any = None) -> tuple[Any, ...]:
    stream: list[str] = []
    with keyboard_interrupt_must_not_escape():
        for event in trainer.run(batches(), epochs=2, valid_data=valid_batches(), callbacks=callbacks):
            stream.append(str(event.stage))
            if consumer is not None:
                consumer(event)
            ctx = event.ctx
    return stream, params_of(trainer.model), trainer.history.to_dict(), ctx.stop_reason, ctx.step


def _same_outcome(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    assert a[0] == b[0]
    assert same_params(a[1], b[1])
    assert a[2].keys() == b[2].keys()
    for key in a[2]:
        assert a[2][key] == pytest.approx(b[2][key], nan_ok=True)
    assert a[3:] == b[3:]


@pytest.mark.parametrize("name", list(SIGNAL_CASES))
def test_consumer_signals_between_events_equal_callback_signals(name: str) -> None:
    stage, epoch, it, method, _ = SIGNAL_CASES[name]
    by_callback = _outcome(make_trainer(), [at(stage, method, epoch=epoch, it=it)])

    def consumer(event: Any) -> None:
        ctx = event.ctx
        if event.stage == stage and ctx.epoch == epoch and (it is None or ctx.iter == it):
            method(ctx)

    by_consumer = _outcome(make_trainer(), [], consumer)
    plain = _outcome(make_trainer(), [])
    _same_outcome(by_callback, by_consumer)
    assert by_callback[0] != plain[0] or not same_params(by_callback[1], plain[1])  # it did act


@pytest.mark.parametrize("name", list(SIGNAL_CASES))
def test_exception_form_equals_method_form_and_does_not_cut_the_stage_short(name: str) -> None:
    stage, epoch, it, method, exception = SIGNAL_CASES[name]

    def raiser(ctx: Any) -> None:
        raise exception()

    later: list[tuple[bool, str | None]] = []

    def look(ctx: Any) -> None:
        later.append((ctx.skipped, ctx.stop_reason))

    received: list[str] = []

    def consumer(event: Any) -> None:
        ctx = event.ctx
        if event.stage == stage and ctx.epoch == epoch and (it is None or ctx.iter == it):
            received.append(str(event.stage))

    by_raise = _outcome(
        make_trainer(),
        [at(stage, raiser, epoch=epoch, it=it), at(stage, look, epoch=epoch, it=it, weight=1)],
        consumer,
    )
    assert len(later) == 1, "a handler after the raising one did not run at that stage"
    assert received == [stage], "the consumer did not receive the event where the signal was raised"
    seen_by_raise = later.pop()
    by_method = _outcome(
        make_trainer(),
        [at(stage, method, epoch=epoch, it=it), at(stage, look, epoch=epoch, it=it, weight=1)],
    )
    _same_outcome(by_raise, by_method)
    assert later == [seen_by_raise], "the later handler saw a different ctx"
    if name == "stop":
        assert by_raise[3] == "why"
    if name == "skip_batch":
        assert seen_by_raise[0] is True


@pytest.mark.parametrize(
    ("signal_cls", "stage", "check"),
    [
        (corolux.SkipBatch, "on_train_batch_after_loss", "params"),
        (corolux.StopTraining, "on_train_batch_end", "stream"),
        (corolux.SkipValidation, "on_train_end", "valid"),
    ],
)
def test_coroutine_raising_a_signal_ends_with_a_warning_and_the_signal_is_honoured(
    signal_cls: type[Exception], stage: str, check: str
) -> None:
    wakes: list[tuple[int, int]] = []

    @corolux.coroutine
    def raiser():  # type: ignore[no-untyped-def]
        while True:
            event = yield stage
            wakes.append((event.ctx.epoch, event.ctx.iter))
            raise signal_cls()

    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match=signal_cls.__name__):
        stream, ctx = run_stream(
            trainer, batches(), epochs=2, valid_data=valid_batches(), callbacks=[raiser()]
        )
    assert wakes == [(1, 1 if stage.startswith("on_train_batch") else 3)], "the coroutine was not ended"
    if check == "params":
        _, model = replicate(batches(), epochs=2, skip=frozenset({(1, 1)}))
        assert same_params(params_of(trainer.model), params_of(model))
        assert ctx.step == 5
    elif check == "stream":
        assert stream.count("on_train_batch_begin") == 1
        assert stream[-4:] == ["on_train_batch_end", "on_train_end", "on_epoch_end", "on_fit_end"]
    else:
        assert stream.count("on_valid_begin") == 1  # only epoch 2 validates
        assert math.isnan(trainer.history["valid_loss"][0])


def test_coroutine_giving_a_signal_by_method_keeps_running_without_warning() -> None:
    wakes = []

    @corolux.coroutine
    def skipper():  # type: ignore[no-untyped-def]
        while True:
            event = yield "on_train_batch_after_loss"
            wakes.append(event.ctx.iter)
            if event.ctx.iter == 1:
                event.ctx.skip_batch()

    trainer = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_stream(trainer, batches(), epochs=2, callbacks=[skipper()])
    assert wakes == [1, 2, 3, 1, 2, 3]
    _, model = replicate(batches(), epochs=2, skip=frozenset({(1, 1), (2, 1)}))
    assert same_params(params_of(trainer.model), params_of(model))


# -- Ctrl-C ---------------------------------------------------------------------------------------------


def _ctrl_c(ctx: Any) -> None:
    raise KeyboardInterrupt


def _check_interrupted_stream(stream: list[str], after: str | None) -> None:
    check_structure_complete(stream)
    assert stream.count("on_interrupt") == 1, stream
    i = stream.index("on_interrupt")
    if after is not None:
        assert stream[i - 1] == after, stream[max(0, i - 3) : i + 2]
    assert all(s.endswith("_end") for s in stream[i + 1 :]), stream[i:]
    for s in ("on_epoch_begin", "on_train_batch_begin", "on_valid_begin", "on_valid_batch_begin"):
        assert s not in stream[i:]


@pytest.mark.parametrize(
    ("stage", "epoch", "it"),
    [
        ("on_fit_begin", None, None),
        ("on_epoch_begin", 2, None),
        ("on_train_batch_begin", 1, 2),
        ("on_train_batch_after_loss", 1, 2),
        ("on_train_batch_after_step", 2, 3),
        ("on_train_batch_end", 1, 1),
        ("on_train_end", 1, None),
        ("on_valid_batch_after_loss", 1, 1),
        ("on_valid_end", 2, None),
        ("on_epoch_end", 1, None),
    ],
)
def test_keyboard_interrupt_in_a_callback_during_fit_is_a_graceful_stop(
    stage: str, epoch: Any, it: Any
) -> None:
    trainer = make_trainer()
    recorder = stage_recorder()
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        history = trainer.fit(
            batches(),
            epochs=3,
            valid_data=valid_batches(),
            callbacks=[at(stage, _ctrl_c, epoch=epoch, it=it), recorder],
        )
    assert history.interrupted is True
    assert history is trainer.history
    _check_interrupted_stream(recorder.stages, after=stage)


def test_keyboard_interrupt_in_the_step_during_fit_is_a_graceful_stop() -> None:
    class Interrupting(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 5:
                raise KeyboardInterrupt
            return self.linear(x)

    trainer = corolux.Trainer(
        Interrupting(),
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )
    recorder = stage_recorder()
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        history = trainer.fit(batches(), epochs=3, valid_data=valid_batches(), callbacks=[recorder])
    assert history.interrupted is True
    # Forward 5 is epoch 1's second validation batch: 3 train + 2 valid.
    _check_interrupted_stream(recorder.stages, after="on_valid_batch_begin")
    assert len(history) == 1


def test_keyboard_interrupt_while_loading_data_during_fit_is_a_graceful_stop() -> None:
    data = batches()

    class Interrupting:
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield data[0]
            yield data[1]
            raise KeyboardInterrupt

    trainer = make_trainer()
    recorder = stage_recorder()
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        history = trainer.fit(Interrupting(), epochs=1, callbacks=[recorder])
    assert history.interrupted is True
    _check_interrupted_stream(recorder.stages, after=None)
    assert recorder.stages.count("on_train_batch_begin") <= 2


def test_a_second_keyboard_interrupt_aborts() -> None:
    trainer = make_trainer()
    first = at("on_train_batch_after_loss", _ctrl_c, it=2)
    second = at("on_interrupt", _ctrl_c)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(batches(), epochs=2, callbacks=[first, second])
    assert second.calls == 1


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_sigint_during_fit_is_a_graceful_stop_and_the_handler_is_restored() -> None:
    previous = signal.getsignal(signal.SIGINT)
    trainer = make_trainer()
    recorder = stage_recorder()
    send = at("on_train_batch_after_loss", lambda ctx: os.kill(os.getpid(), signal.SIGINT), epoch=1, it=2)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        history = trainer.fit(batches(), epochs=3, callbacks=[send, recorder])
    assert history.interrupted is True
    _check_interrupted_stream(recorder.stages, after=None)
    assert recorder.stages.count("on_epoch_begin") == 1
    assert signal.getsignal(signal.SIGINT) is previous


def _mse_step(ctx: Any, after_forward: Any = None) -> Any:
    """A custom step doing what the default step does for make_trainer()'s MSE regression;
    ``after_forward(ctx)`` runs right after the forward."""
    ctx.pred = ctx.model(ctx.input)
    if after_forward is not None:
        after_forward(ctx)
    yield "on_train_batch_after_pred"
    ctx.loss = torch.nn.functional.mse_loss(ctx.pred, ctx.target)
    yield "on_train_batch_after_loss"
    ctx.backward(ctx.loss)
    yield "on_train_batch_before_step"
    ctx.step_optimizer()
    yield "on_train_batch_after_step"


def _interrupting_loss(at_call: int) -> Any:
    """An MSE loss that sends a real SIGINT to this process at its ``at_call``-th call."""
    calls: list[int] = []

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.nn.functional.mse_loss(pred, target)

    return loss_fn


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
@pytest.mark.parametrize("drive", ["fit", "fit, a callback inside the batch", "stepper"])
def test_sigint_inside_the_step_drops_that_batch_however_the_run_is_driven(drive: str) -> None:
    # fit() does not yield the stages inside a batch that no callback watches; a Ctrl-C in
    # the step must still stop it there: no backward, no optimizer step, the batch not counted.
    log: list[tuple[str, int, bool, int]] = []
    recorder = corolux.callback(
        "recorder",
        on_train_batch_end=lambda self, ctx: log.append(("end", ctx.iter, ctx.skipped, ctx.step)),
        on_interrupt=lambda self, ctx: log.append(("interrupt", ctx.iter, ctx.skipped, ctx.step)),
    )()
    callbacks = [recorder]
    if drive == "fit, a callback inside the batch":
        callbacks.append(at("on_train_batch_before_backward", lambda ctx: None))
    trainer = make_trainer()
    trainer.loss_fn = _interrupting_loss(at_call=2)
    data = make_batches(6, 2)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        if drive == "stepper":
            history = trainer.stepper(data, epochs=2, callbacks=callbacks).finish()
        else:
            history = trainer.fit(data, epochs=2, callbacks=callbacks)
    assert history.interrupted is True
    assert log == [("end", 1, False, 1), ("interrupt", 2, True, 1), ("end", 2, True, 1)]
    reference = make_trainer()
    expected = reference.fit(data[:1], epochs=1)  # what batch 1 alone trains and records
    assert history["train_loss"] == expected["train_loss"]
    assert same_params(params_of(trainer.model), params_of(reference.model))


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_sigint_inside_an_accumulating_step_is_the_same_under_fit_and_the_stepper() -> None:
    accumulate = at("on_fit_begin", lambda ctx: setattr(ctx, "accumulate_steps", 2))
    data = make_batches(6, 2)
    results = []
    for drive in ("fit", "stepper"):
        trainer = make_trainer()
        trainer.loss_fn = _interrupting_loss(at_call=3)  # batch 3: inside the second window
        with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
            if drive == "fit":
                history = trainer.fit(data, epochs=2, callbacks=[accumulate])
            else:
                history = trainer.stepper(data, epochs=2, callbacks=[accumulate]).finish()
        results.append((history["train_loss"], params_of(trainer.model)))
    reference = make_trainer()
    expected = reference.fit(data[:2], epochs=1, callbacks=[accumulate])  # one window, one step
    for losses, params in results:
        assert losses == expected["train_loss"]
        assert same_params(params, params_of(reference.model))


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_sigint_inside_the_step_of_evaluate_and_predict_keeps_the_batches_before_it() -> None:
    data = make_batches(5, 2, seed=3)
    trainer = make_trainer()
    full_loss = trainer.evaluate(data[:2])["loss"]
    full_pred = trainer.predict(data[:2])
    trainer.loss_fn = _interrupting_loss(at_call=3)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="batches before it only"):
        assert trainer.evaluate(data)["loss"] == pytest.approx(full_loss)

    class Interrupting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return self.inner(x)

    predictor = corolux.Trainer(Interrupting(trainer.model), device="cpu", progress=False)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="batches before it only"):
        predictions = predictor.predict(data)
    assert torch.equal(predictions, full_pred)


def test_ctrl_c_closes_a_custom_step_before_on_interrupt() -> None:
    # The step's own cleanup (a with block held across a yield) runs before the handlers of
    # on_interrupt and *_batch_end see ctx, as when a batch is skipped.
    log: list[str] = []

    def step(ctx: Any) -> Any:
        try:
            yield from _mse_step(ctx)
        finally:
            log.append(f"step cleanup {ctx.iter}")

    recorder = corolux.callback(
        "recorder",
        on_interrupt=lambda self, ctx: log.append("on_interrupt"),
        on_train_batch_end=lambda self, ctx: log.append(f"batch_end {ctx.iter}"),
    )()
    stop = at("on_train_batch_after_pred", _ctrl_c, it=2)
    trainer = make_trainer(train_step=step)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="interrupt"):
        trainer.fit(batches(), epochs=1, callbacks=[stop, recorder])
    assert log == ["step cleanup 1", "batch_end 1", "step cleanup 2", "on_interrupt", "batch_end 2"]


def test_keyboard_interrupt_while_predictions_are_joined_is_a_graceful_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No SIGINT handler under run(): a real KeyboardInterrupt in the final concatenation
    # is still a graceful stop (on_interrupt, then on_predict_end).
    import corolux.loop

    def interrupted(outputs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(corolux.loop, "concat", interrupted)
    with keyboard_interrupt_must_not_escape():
        stream = [str(event.stage) for event in make_trainer().run_predict(batches())]
    assert stream[-2:] == ["on_interrupt", "on_predict_end"]


def test_ctrl_c_before_the_first_batch_of_evaluate_says_no_batch_is_covered() -> None:
    stop = at("on_valid_begin", _ctrl_c)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="before its first batch"):
        metrics = make_trainer().evaluate(batches(), callbacks=[stop])
    assert math.isnan(metrics["loss"])


def test_ctrl_c_during_predict_batch_end_keeps_that_batch() -> None:
    data = make_batches(5, 2, seed=3)
    trainer = make_trainer()
    full_pred = trainer.predict(data[:2])
    stop = at("on_predict_batch_end", _ctrl_c, it=2)
    with keyboard_interrupt_must_not_escape(), pytest.warns(RuntimeWarning, match="batches up to it only"):
        predictions = trainer.predict(data, callbacks=[stop])
    assert torch.equal(predictions, full_pred)


def test_keyboard_interrupt_in_run_is_a_graceful_stop_without_warning() -> None:
    trainer = make_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        stream, _ = run_stream(
            trainer, batches(), epochs=2, callbacks=[at("on_train_batch_end", _ctrl_c, it=2)]
        )
    _check_interrupted_stream(stream, after="on_train_batch_end")
    assert trainer.history.interrupted is True


# -- ctx.emit -------------------------------------------------------------------------------------------


def test_emit_early_stopping_delivers_it_right_after_the_current_event() -> None:
    trainer = make_trainer()
    seen: list[tuple[str, str | None]] = []

    def early(ctx: Any) -> None:
        ctx.emit("on_early_stopping")
        ctx.stop_training("early_stopping")

    listener = at("on_early_stopping", lambda ctx: seen.append((str(ctx.stage), ctx.stop_reason)))
    stream, ctx = run_stream(
        trainer,
        batches(),
        epochs=3,
        valid_data=valid_batches(),
        callbacks=[at("on_epoch_end", early, epoch=1), listener],
    )
    i = nth(stream, "on_epoch_end", 1)
    assert stream[i:] == ["on_epoch_end", "on_early_stopping", "on_fit_end"]
    assert seen == [("on_early_stopping", "early_stopping")]
    assert ctx.completed_epochs == 1


def test_emit_mid_batch_does_not_disturb_the_step() -> None:
    trainer = make_trainer()
    emit = at("on_train_batch_after_loss", lambda ctx: ctx.emit("on_early_stopping"), it=2)
    stream, ctx = run_stream(trainer, batches(), epochs=1, callbacks=[emit])
    b = nth(stream, "on_train_batch_begin", 2)
    assert stream[b + 1 : b + 8] == [
        "on_train_batch_after_pred",
        "on_train_batch_after_loss",
        "on_early_stopping",
        *TRAIN_INNER[2:],
        "on_train_batch_end",
    ]
    assert stream.count("on_early_stopping") == 1
    _, model = replicate(batches())
    assert same_params(params_of(trainer.model), params_of(model))


def test_emit_custom_stage_declared_by_the_trainer() -> None:
    class Custom(corolux.Trainer):
        stages = ("on_milestone",)

    torch.manual_seed(0)
    trainer = Custom(
        torch.nn.Linear(3, 1),
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )
    heard = at("on_milestone", lambda ctx: None)
    stream, _ = run_stream(
        trainer,
        batches(),
        epochs=2,
        callbacks=[at("on_epoch_begin", lambda ctx: ctx.emit("on_milestone")), heard],
    )
    assert [s for s in stream if s in ("on_epoch_begin", "on_milestone")] == [
        "on_epoch_begin",
        "on_milestone",
    ] * 2
    assert heard.calls == 2


def test_emit_from_a_custom_step_under_fit_is_delivered_inside_the_batch() -> None:
    # fit() does not yield the stages nothing watches, but an emit asks for the driver:
    # the next stage is yielded, so the emitted one arrives inside the batch as under run().
    class Milestones(corolux.Trainer):
        stages = ("on_milestone",)

        def train_step(self, ctx: Any) -> Any:
            return _mse_step(ctx, after_forward=emit_at_batch_2)

    def emit_at_batch_2(ctx: Any) -> None:
        if ctx.iter == 2:
            ctx.emit("on_milestone")

    heard: list[tuple[str | None, int, int]] = []

    def on_milestone(self: Any, ctx: Any) -> None:
        heard.append((str(ctx.stage), ctx.iter, ctx.step))
        ctx.skip_batch()  # still inside batch 2: no backward, no step for it

    listener = corolux.callback("listener", on_milestone=on_milestone)()
    torch.manual_seed(0)
    trainer = Milestones(
        torch.nn.Linear(3, 1), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu", progress=False
    )
    trainer.fit(batches(), epochs=1, callbacks=[listener])
    assert heard == [("on_milestone", 2, 1)]
    records, model = replicate(batches(), epochs=1, skip=frozenset({(1, 2)}))
    assert same_params(params_of(trainer.model), params_of(model))
    kept = [(loss, size) for _, i, loss, size in records if i != 2]  # a skipped batch is not counted
    mean = sum(loss * size for loss, size in kept) / sum(size for _, size in kept)
    assert trainer.history["train_loss"] == pytest.approx([mean])


def test_emit_unknown_stage_is_rejected_with_a_suggestion() -> None:
    trainer = make_trainer()
    with pytest.raises(ValueError, match="did you mean 'on_early_stopping'"):
        trainer.fit(
            batches(), epochs=1, callbacks=[at("on_epoch_end", lambda ctx: ctx.emit("on_early_stoping"))]
        )


# -- review findings: each fails on the code before its fix ---------------------------------------


def test_two_ctrl_c_in_handlers_before_the_loop_acts_abort():
    class CtrlC(corolux.Callback):
        def on_train_batch_end(self, ctx: Any) -> None:
            if ctx.iter == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for _ in make_trainer().run(make_batches(3, 2), epochs=1, callbacks=[CtrlC(), CtrlC()]):
            pass


def test_a_request_at_the_last_stage_leaves_the_run_complete():
    at_end = at("on_fit_end", lambda ctx: ctx.request_interrupt())
    history = make_trainer().fit(make_batches(2, 2), epochs=2, callbacks=[at_end])
    assert history.interrupted is False and history.stop_reason is None and len(history) == 2


def test_emit_at_the_runs_last_stage_is_refused():
    emit = at("on_fit_end", lambda ctx: ctx.emit("on_early_stopping"))
    with pytest.raises(RuntimeError, match="the run's last stage: no event comes after it"):
        make_trainer().fit(make_batches(2, 2), epochs=1, callbacks=[emit])


def test_an_error_while_fetching_the_next_batch_is_not_blamed_on_the_step():
    seen: dict[str, Any] = {}

    class Data:
        def __iter__(self):
            yield make_batches(1, 2)[0]
            raise OSError("corrupt file")

    look = corolux.callback(
        "look",
        on_train_batch_end=lambda self, ctx: seen.setdefault("at_end", ctx.in_batch),
        on_exception=lambda self, ctx: seen.setdefault("at_exception", ctx.in_batch),
    )()
    with pytest.raises(OSError) as info:
        make_trainer().fit(Data(), epochs=1, callbacks=[look])
    assert seen == {"at_end": True, "at_exception": False}
    assert "raised in the loop after 'on_train_batch_end' (epoch 1, batch 1)" in info.value.__notes__


@pytest.mark.parametrize("where", ["end_batch", "phase_end"])
def test_a_ctrl_c_in_the_loops_own_work_keeps_every_begin_matched(where, monkeypatch):
    # Under run() a real Ctrl-C can land in the loop's code between two stages.
    original = {"end_batch": corolux.Context.end_batch, "phase_end": corolux.Context.zero_grad}[where]
    armed = {"n": 0}

    def interrupting(self: Any) -> None:
        armed["n"] += 1
        if armed["n"] == 1:  # the first batch's end, or the train phase's end
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(corolux.Context, "end_batch" if where == "end_batch" else "zero_grad", interrupting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on the CPU: its GradScaler settles every batch
        trainer = make_trainer(precision="16-mixed" if where == "end_batch" else "32")
    stream = [str(e.stage) for e in trainer.run(make_batches(2, 2), epochs=1)]
    check_structure(stream, complete=True)
    assert "on_interrupt" in stream


def test_a_never_started_run_has_its_coroutines_closed_when_discarded():
    log: list[str] = []

    @corolux.coroutine
    def holder():  # type: ignore[no-untyped-def]
        log.append("opened")
        try:
            while True:
                yield "on_epoch_end"
        finally:
            log.append("closed")

    trainer = make_trainer()
    kept = trainer.run(make_batches(1, 2), epochs=1, callbacks=[holder()])  # as the REPL's `_`
    trainer.fit(make_batches(1, 2), epochs=1, callbacks=[holder()])
    assert log == ["opened", "closed", "opened", "closed"] and kept is not None


def test_evaluate_from_a_callback_of_the_same_trainer_says_to_use_another_trainer():
    trainer = make_trainer()
    nested = at("on_epoch_end", lambda ctx: trainer.evaluate(make_batches(1, 2)))
    with pytest.raises(RuntimeError, match="build another corolux.Trainer over the same model"):
        trainer.fit(make_batches(2, 2), epochs=1, callbacks=[nested])


def test_skip_at_the_open_window_step_says_what_that_step_is():
    class Unsized:
        def __iter__(self):
            yield from make_batches(3, 2)

    accumulate = at("on_fit_begin", lambda ctx: setattr(ctx, "accumulate_steps", 2))
    skip = at("on_train_batch_before_step", lambda ctx: ctx.skip_batch() if not ctx.in_batch else None)
    with pytest.raises(RuntimeError, match="window left open when the data ended .* ctx.zero_grad"):
        make_trainer().fit(Unsized(), epochs=1, callbacks=[accumulate, skip])


def test_a_batch_skipped_after_a_hand_written_backward_leaks_no_gradient():
    grads: list[bool] = []

    sgd_by_hand = hand_sgd_step(torch.nn.functional.mse_loss)

    def by_hand(ctx: Any) -> Any:
        grads.append(ctx.model.weight.grad is None)
        yield from sgd_by_hand(ctx)

    skip = at("on_train_batch_before_step", lambda ctx: ctx.skip_batch(), it=1)
    model = torch.nn.Linear(3, 1)
    trainer = corolux.Trainer(
        model, loss_fn=torch.nn.functional.mse_loss, train_step=by_hand, device="cpu", progress=False
    )
    trainer.fit(make_batches(3, 2), epochs=1, callbacks=[skip])
    assert grads == [True, True, True]


def test_a_batch_that_fails_to_split_is_not_blamed_on_the_step() -> None:
    seen: list[bool] = []
    calls = {"n": 0}

    def unpack(batch: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("no 'features' in this batch")
        return batch

    trainer = make_trainer(unpack=unpack)
    look = at("on_exception", lambda ctx: seen.append(ctx.in_batch))
    with pytest.raises(KeyError) as info:
        trainer.fit(make_batches(3, 2), epochs=1, callbacks=[look])
    assert seen == [False]
    assert "raised in the loop after 'on_train_batch_end' (epoch 1, batch 1)" in info.value.__notes__


def test_max_steps_set_by_on_train_begin_counts_for_that_epoch() -> None:
    limit = at("on_train_begin", lambda ctx: setattr(ctx, "max_steps", 2))
    history = make_trainer().fit(make_batches(5, 2), epochs=1, callbacks=[limit])
    assert history.stop_reason == "max_steps" and history.completed_epochs == 0


def test_skip_batch_at_a_stage_emitted_after_the_batch_end_is_refused() -> None:
    refused: list[str] = []

    def skip(ctx: Any) -> None:
        try:
            ctx.skip_batch()
        except RuntimeError as exc:
            refused.append(str(exc))

    emit = at("on_predict_batch_end", lambda ctx: ctx.emit("on_early_stopping"), it=1)
    late = at("on_early_stopping", skip)
    x = torch.randn(6, 3)
    predictions = make_trainer().predict([(x[:3],), (x[3:],)], callbacks=[emit, late])
    assert predictions.shape == (6, 1) and len(refused) == 1 and "no batch to skip" in refused[0]


def test_under_ddp_a_ctrl_c_waits_for_the_ranks_and_only_an_agreed_one_stops_gracefully():
    """Signals.defer (set by AgreeOnStop under DDP): a request waits (deferred) until
    release(); a KeyboardInterrupt that reaches the loop without it aborts (re-raised)."""
    from corolux.control import Signals

    signals = Signals()
    signals.defer = True
    signals.request()
    assert signals.deferred and not signals.pending and not signals.take_interrupt()
    with pytest.raises(KeyboardInterrupt):
        signals.keyboard_interrupt()  # a second Ctrl-C while the first waits: abort
    raw = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt) as info:
        signals.begin_stop(raw)  # not agreed: this rank must not stop alone
    assert info.value is raw and not signals.stopping
    signals.release()
    assert not signals.deferred and signals.pending and signals.take_interrupt()
    signals.begin_stop(KeyboardInterrupt())  # agreed: the graceful stop begins
    assert signals.stopping
