"""The grammar invariant of DESIGN section 1, as property tests over random plans of signals,
errors and Ctrl-C (tests/strategies.py), run on a tiny real regression."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import (
    IN_BATCH,
    SIGNAL_METHODS,
    SIGNAL_RAISES,
    SIGNALS,
    SKIP_BATCHES,
    SKIP_VALIDATIONS,
    STOPS,
    TRAIN_INNER,
    VALID_INNER,
    ChaosError,
    Recording,
    RunConfig,
    check_structure,
    execute,
    execute_sparse,
    keyboard_interrupt_must_not_escape,
    make_batches,
    make_trainer,
    plans,
    run_configs,
    same_params,
    scopes,
    sparse_setups,
)

import corolux

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
BEGINS_AFTER_STOP = ("on_epoch_begin", "on_valid_begin", "on_train_batch_begin", "on_valid_batch_begin")
_SIGNAL_CLASS = {
    "raise_stop": "StopTraining",
    "raise_skip_batch": "SkipBatch",
    "raise_skip_validation": "SkipValidation",
}


def check_recording(config: RunConfig, rec: Recording) -> None:
    """Every DESIGN section 1/3 property that a recorded run must satisfy."""
    stream = rec.stream
    error = rec.first(("error",))
    assert rec.teardowns == 1, f"teardown ran {rec.teardowns} times"
    if error is not None:
        # A valid prefix, then exactly one on_exception, then the same exception object.
        assert rec.outcome is error.error, f"expected the ChaosError to propagate, got {rec.outcome!r}"
        assert stream and stream[-1] == "on_exception", stream
        assert stream.count("on_exception") == 1, stream
        assert error.index == len(stream) - 1, "on_exception must come right after the failing event"
        assert rec.exception_at_event is error.error, "ctx.exception is not the escaping exception"
        name = "chaos" if error.action.source == "class" else "chaos_coroutine"
        note = f"in {name}.{error.action.stage}"
        assert note in getattr(error.error, "__notes__", []), (note, getattr(error.error, "__notes__", None))
        assert str(error.error) == f"chaos at {error.action.stage} #{error.action.occurrence}"
        prefix = stream[:-1]
        check_structure(prefix, complete=False)
        check_semantics(config, rec, prefix, complete=False)
    else:
        assert rec.outcome is None, f"{rec.outcome!r} escaped from run(); stream tail {stream[-6:]}"
        assert "on_exception" not in stream
        check_structure(stream, complete=True)
        check_semantics(config, rec, stream, complete=True)
    # A coroutine that raises a signal ends with a RuntimeWarning naming the signal.
    raised = [p for p in rec.performed if p.action.source == "coroutine" and p.action.kind in SIGNAL_RAISES]
    for p in raised:
        cls = _SIGNAL_CLASS[p.action.kind]
        assert any(issubclass(w.category, RuntimeWarning) and cls in str(w.message) for w in rec.warnings), (
            f"no RuntimeWarning for the coroutine raising {cls}"
        )


def check_semantics(config: RunConfig, rec: Recording, stream: list[str], complete: bool) -> None:
    where = scopes(stream)
    performed = [p for p in rec.performed if p.index < len(stream)]
    n = len(stream)
    stop = next((p.index for p in performed if p.action.kind in STOPS), None)
    ki = next((p.index for p in performed if p.action.kind == "keyboard_interrupt"), None)
    halts = [i for i in (stop, ki) if i is not None]
    halt = min(halts) if halts else None

    # Stop / Ctrl-C: no further batches, validation or epochs.
    if halt is not None:
        late = [(j, s) for j, s in enumerate(stream) if j > halt and s in BEGINS_AFTER_STOP]
        assert not late, f"begins after the stop at event {halt} ({stream[halt]}): {late} in {stream}"

    # Ctrl-C inside the loop: on_interrupt comes next, then only *_end events.
    if ki is not None and ki + 1 < n:
        assert stream[ki + 1] == "on_interrupt", (
            f"Ctrl-C at event {ki} ({stream[ki]}), then {stream[ki + 1 :]}"
        )
        rest = stream[ki + 2 :]
        assert all(s.endswith("_end") for s in rest), f"after on_interrupt: {rest}"
    expected_interrupts = 1 if ki is not None and ki + 1 < n else 0
    assert stream.count("on_interrupt") == expected_interrupts, stream
    if complete and ki is not None:
        assert rec.ctx.history.interrupted is True
    if complete and ki is None:
        assert rec.ctx.history.interrupted is False

    # Skip batch: the rest of the step is skipped; *_batch_end fires with ctx.skipped true.
    skips = [p.index for p in performed if p.action.kind in SKIP_BATCHES]
    for i in skips:
        sc = "train_batch" if stream[i].startswith("on_train") else "valid_batch"
        begin, end = where.scope_at(i, sc)
        assert begin >= 0, f"skip at {stream[i]} outside a batch?"
        between = stream[i + 1 : end if end is not None else n]
        assert all(s == "on_interrupt" for s in between), f"after skip_batch at {stream[i]}: {between}"
        if end is not None:
            assert rec.skipped_at.get(end) is True, f"ctx.skipped false at the end of a skipped batch ({end})"
    for j, s in enumerate(stream):
        if s not in ("on_train_batch_begin", "on_valid_batch_begin"):
            continue
        end = where.end_of.get(j)
        skipped = any(j <= i < (end if end is not None else n) for i in skips)
        interrupted = "on_interrupt" in stream[j : end if end is not None else n]
        if end is not None and interrupted:
            # Ctrl-C inside a batch: its step did not finish, so it is neither counted nor kept.
            assert rec.skipped_at.get(end) is True, f"ctx.skipped false on an interrupted batch ({end})"
        elif end is not None and not skipped:
            assert rec.skipped_at.get(end) is False, f"ctx.skipped true on a batch nobody skipped ({end})"
        if end is not None and not skipped and not interrupted:
            inner = stream[j + 1 : end]
            full = TRAIN_INNER if s == "on_train_batch_begin" else VALID_INNER
            assert tuple(inner) == full, f"the step did not finish: {inner} (batch at {j}; stop at {stop})"

    # Skip validation: that epoch's validation loop is not run, and history holds nan there.
    skip_valid = [p.index for p in performed if p.action.kind in SKIP_VALIDATIONS]
    history = rec.ctx.history if rec.ctx is not None else None
    for i in skip_valid:
        begin, end = where.scope_at(i, "epoch")
        if begin < 0:
            continue  # at on_fit_begin/on_fit_end: no epoch to act on
        if "on_valid_begin" in stream[begin : i + 1]:
            continue  # validation already started: a no-op
        span = stream[i + 1 : end if end is not None else n]
        assert "on_valid_begin" not in span, f"validation ran after skip_validation at {stream[i]}"
        if complete and end is not None and history is not None and "valid_loss" in history:
            epoch_number = stream[: end + 1].count("on_epoch_end")
            assert math.isnan(history["valid_loss"][epoch_number - 1])

    # Phases that ran before any stop ran all their batches; without a stop, all epochs ran.
    limit = halt if halt is not None else n
    for j, s in enumerate(stream):
        if s in ("on_train_begin", "on_valid_begin"):
            end = where.end_of.get(j)
            if end is None or end >= limit:
                continue
            batch_begin = "on_train_batch_begin" if s == "on_train_begin" else "on_valid_batch_begin"
            count = stream[j:end].count(batch_begin)
            want = config.train_batches if s == "on_train_begin" else config.valid_batches
            assert count == want, f"phase at {j} ran {count} batches, expected {want}"
        if s == "on_epoch_begin":
            end = where.end_of.get(j)
            if end is None or end >= limit:
                continue
            validated = "on_valid_begin" in stream[j:end]
            skipped_here = any(j <= i < end and "on_valid_begin" not in stream[j : i + 1] for i in skip_valid)
            assert validated == (config.valid_batches > 0 and not skipped_here), (
                f"epoch at {j}: validation ran={validated}, valid data={config.valid_batches > 0}, "
                f"skipped={skipped_here}"
            )
    if complete and halt is None:
        assert stream.count("on_epoch_begin") == config.epochs

    # Records: one per epoch that reached on_epoch_end; completed_epochs excludes cut-short ones.
    if complete:
        ends = stream.count("on_epoch_end")
        assert len(history) == ends, f"history has {len(history)} records for {ends} epochs"
        completed = rec.ctx.completed_epochs
        assert completed <= ends
        if halt is None:
            assert completed == config.epochs
        else:
            before = sum(1 for j, s in enumerate(stream) if s == "on_epoch_end" and j < halt)
            if stream[halt] in IN_BATCH or stream[halt].endswith("_batch_end"):
                assert completed == before, f"cut-short epoch counted: stop at {stream[halt]}"
            elif stream[halt] == "on_epoch_end":
                assert completed == before + 1, "an epoch stopped at its on_epoch_end ran to its end"
            else:
                assert before <= completed <= before + 1


# -- property tests ------------------------------------------------------------------------------


@SETTINGS
@given(config=run_configs(), plan=plans(kinds=SIGNALS))
def test_control_signals_keep_the_grammar(config: RunConfig, plan: list[Any]) -> None:
    check_recording(config, execute(config, plan))


@SETTINGS
@given(
    config=run_configs(),
    plan=plans(
        kinds=("keyboard_interrupt", "keyboard_interrupt", *SIGNAL_METHODS), sources=("class", "coroutine")
    ),
)
def test_keyboard_interrupt_in_callbacks_keeps_the_grammar(config: RunConfig, plan: list[Any]) -> None:
    check_recording(config, execute(config, plan))


@SETTINGS
@given(config=run_configs(), plan=plans(kinds=("error", "error", "keyboard_interrupt", *SIGNALS)))
def test_ordinary_error_gives_prefix_then_one_on_exception(config: RunConfig, plan: list[Any]) -> None:
    check_recording(config, execute(config, plan))


class Flaky(torch.nn.Module):
    """A Linear(3, 1) whose n-th forward call raises ``exc``."""

    def __init__(self, n: int, exc: BaseException) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.n = n
        self.calls = 0
        self.exc = exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise self.exc
        return self.linear(x)


def flaky_trainer(n: int, exc: BaseException) -> corolux.Trainer:
    return corolux.Trainer(
        Flaky(n, exc),
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )


@SETTINGS
@given(config=run_configs(), n=st.integers(1, 30))
def test_keyboard_interrupt_in_the_step_is_a_graceful_stop(config: RunConfig, n: int) -> None:
    trainer = flaky_trainer(n, KeyboardInterrupt())
    train, valid = config.data()
    stream: list[str] = []
    with keyboard_interrupt_must_not_escape():
        for event in trainer.run(train, epochs=config.epochs, valid_data=valid):
            stream.append(str(event.stage))
    check_structure(stream, complete=True)
    forwards = trainer.model.calls
    if forwards < n:  # the run ended before the n-th forward
        assert "on_interrupt" not in stream
        assert trainer.history.interrupted is False
        return
    assert stream.count("on_interrupt") == 1
    i = stream.index("on_interrupt")
    # The forward runs right after on_*_batch_begin: the interrupt comes there, the batch ends.
    assert stream[i - 1] in ("on_train_batch_begin", "on_valid_batch_begin"), stream[i - 3 : i + 3]
    assert all(s.endswith("_end") for s in stream[i + 1 :]), stream[i:]
    assert stream[i + 1] == stream[i - 1].replace("_begin", "_end")
    assert trainer.history.interrupted is True


@SETTINGS
@given(config=run_configs(), n=st.integers(1, 30))
def test_ordinary_error_in_the_step_propagates_after_on_exception(config: RunConfig, n: int) -> None:
    error = ChaosError("forward failed")
    trainer = flaky_trainer(n, error)
    train, valid = config.data()
    stream: list[str] = []
    seen: list[BaseException | None] = []
    try:
        for event in trainer.run(train, epochs=config.epochs, valid_data=valid):
            stream.append(str(event.stage))
            if event.stage == "on_exception":
                seen.append(event.ctx.exception)
    except ChaosError as exc:
        assert exc is error
        assert str(exc) == "forward failed"
        assert stream[-1] == "on_exception" and stream.count("on_exception") == 1
        assert seen == [error]
        check_structure(stream[:-1], complete=False)
        assert stream[-2] in ("on_train_batch_begin", "on_valid_batch_begin")
        notes = getattr(exc, "__notes__", [])
        phase = "train" if stream[-2] == "on_train_batch_begin" else "valid"
        assert any(phase in note for note in notes), notes
    else:
        assert trainer.model.calls < n, "the n-th forward raised but nothing propagated"
        check_structure(stream, complete=True)


# -- the consumer closing the generator ------------------------------------------------------------


class Teardown(corolux.Callback):
    def __init__(self) -> None:
        self.teardowns = 0
        self.events_after_teardown = 0

    def on_train_batch_end(self, ctx: Any) -> None:
        if self.teardowns:
            self.events_after_teardown += 1

    def teardown(self, ctx: Any) -> None:
        self.teardowns += 1


@corolux.coroutine
def closable(log: list[str]):  # type: ignore[no-untyped-def]
    try:
        while True:
            yield ("on_train_batch_end", "on_epoch_end")
    finally:
        log.append("closed")


@SETTINGS
@given(config=run_configs(), close_at=st.integers(0, 80))
def test_close_yields_nothing_more_runs_teardown_and_trainer_is_reusable(
    config: RunConfig, close_at: int
) -> None:
    trainer = make_trainer(config.seed)
    train, valid = config.data()
    teardown = Teardown()
    log: list[str] = []
    gen = trainer.run(train, epochs=config.epochs, valid_data=valid, callbacks=[teardown, closable(log)])
    stream = []
    for event in gen:
        stream.append(str(event.stage))
        if len(stream) == close_at + 1:
            break
    gen.close()  # after break: must not yield (close() would raise RuntimeError)
    with pytest.raises(StopIteration):
        next(gen)
    assert teardown.teardowns == 1
    assert log == ["closed"], "coroutine callbacks are closed at teardown"
    check_structure(stream, complete=stream[-1] == "on_fit_end")
    assert teardown.events_after_teardown == 0
    # The trainer is reusable: a new run goes to the end.
    again: list[str] = []
    for event in trainer.run(train, epochs=config.epochs, valid_data=valid, callbacks=[teardown]):
        again.append(str(event.stage))
    check_structure(again, complete=True)
    assert again.count("on_epoch_begin") == config.epochs
    assert teardown.teardowns == 2


def test_break_out_of_for_loop_cleans_up_at_once() -> None:
    trainer = make_trainer()
    teardown = Teardown()
    log: list[str] = []
    data = make_batches(4, 2)
    stream = []
    for event in trainer.run(data, epochs=3, callbacks=[teardown, closable(log)]):
        stream.append(str(event.stage))
        if event.stage == "on_train_batch_after_loss" and event.ctx.iter == 2:
            break
    # CPython finalizes the dropped generator at once: cleanup has run, nothing more yielded.
    assert teardown.teardowns == 1
    assert log == ["closed"]
    assert teardown.events_after_teardown == 0
    assert stream[-1] == "on_train_batch_after_loss"
    history = trainer.fit(data, epochs=2)
    assert len(history) == 2


def test_starting_a_run_while_one_is_open_is_an_error_until_closed() -> None:
    trainer = make_trainer()
    data = make_batches(2, 2)
    gen = trainer.run(data, epochs=1)
    next(gen)
    with pytest.raises(RuntimeError, match="finish|close"):
        trainer.fit(data, epochs=1)
    gen.close()
    assert len(trainer.fit(data, epochs=1)) == 1


def test_keyboard_interrupt_in_the_last_handler_does_not_escape() -> None:
    """A Ctrl-C raised by an on_fit_end handler is inside the loop: a graceful stop, and
    on_fit_end stays the last event."""

    class CtrlC(corolux.Callback):
        def on_fit_end(self, ctx: Any) -> None:
            raise KeyboardInterrupt

    trainer = make_trainer()
    stream: list[str] = []
    with keyboard_interrupt_must_not_escape():
        for event in trainer.run(make_batches(2, 2), epochs=1, callbacks=[CtrlC()]):
            stream.append(str(event.stage))
    check_structure(stream, complete=True)


# -- fit() and run() deliver the same run --------------------------------------------------------


@SETTINGS
@given(
    config=run_configs(),
    plan=plans(kinds=(*SIGNALS, "keyboard_interrupt", "error"), sources=("class",)),
    sparse=sparse_setups(),
)
def test_fit_and_run_deliver_the_same_run_to_callbacks(
    config: RunConfig, plan: list[Any], sparse: Any
) -> None:
    # Under fit() the loop passes over the batch stages no callback listens to; handlers
    # must not be able to tell: same events, same ctx at each, same weights and history.
    with keyboard_interrupt_must_not_escape():
        under_run = execute_sparse(config, plan, sparse, "run")
        under_fit = execute_sparse(config, plan, sparse, "fit")
    assert under_fit.seen == under_run.seen
    assert under_fit.outcome == under_run.outcome
    assert same_params(under_fit.weights, under_run.weights)
    assert under_fit.history == under_run.history
