"""Hypothesis strategies for the engine's property tests, and the small real setups they run.

A *plan* is a list of :class:`Action`: at the n-th occurrence of a stage, a source (a class
callback, a coroutine callback, or the code iterating ``run()``) gives a control signal
(method or exception form), raises an ordinary error, or raises ``KeyboardInterrupt``.
:func:`execute` runs a plan on a tiny real model and records what happened in a
:class:`Recording`, which the tests check against DESIGN section 1 and 3. The helpers for
focused tests at the end (callbacks acting at a stage, a two-part model, custom train steps)
serve the tests of several modules.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

import corolux

# -- the stages of a fit() stream --------------------------------------------------------------

TRAIN_INNER = (
    "on_train_batch_after_pred",
    "on_train_batch_after_loss",
    "on_train_batch_before_backward",
    "on_train_batch_before_step",
    "on_train_batch_after_step",
)
VALID_INNER = ("on_valid_batch_after_pred", "on_valid_batch_after_loss")
#: Stages where a batch is open, so skip_batch() is valid there.
IN_BATCH = ("on_train_batch_begin", *TRAIN_INNER, "on_valid_batch_begin", *VALID_INNER)
#: Every stage of the fit tree (DESIGN section 1), in tree order.
FIT_STAGES = (
    "on_fit_begin",
    "on_epoch_begin",
    "on_train_begin",
    "on_train_batch_begin",
    *TRAIN_INNER,
    "on_train_batch_end",
    "on_train_end",
    "on_valid_begin",
    "on_valid_batch_begin",
    *VALID_INNER,
    "on_valid_batch_end",
    "on_valid_end",
    "on_epoch_end",
    "on_fit_end",
)
ONE_OFF = ("on_exception", "on_early_stopping", "on_interrupt")

SIGNAL_METHODS = ("stop", "skip_batch", "skip_validation")
SIGNAL_RAISES = ("raise_stop", "raise_skip_batch", "raise_skip_validation")
SIGNALS = SIGNAL_METHODS + SIGNAL_RAISES
STOPS = ("stop", "raise_stop")
SKIP_BATCHES = ("skip_batch", "raise_skip_batch")
SKIP_VALIDATIONS = ("skip_validation", "raise_skip_validation")
ALL_KINDS = SIGNALS + ("error", "keyboard_interrupt")
SOURCES = ("class", "coroutine", "consumer")


class ChaosError(Exception):
    """The ordinary error a plan raises."""


# -- real setups ---------------------------------------------------------------------------------


def make_batches(
    n: int, batch_size: int | list[int], seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches ``(x, y)`` of a noisy linear regression, 3 features -> 1 target.

    ``batch_size`` may be a list giving each batch's size.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = batch_size if isinstance(batch_size, list) else [batch_size] * n
    w = torch.tensor([[1.0], [-2.0], [0.5]])
    out = []
    for size in sizes[:n]:
        x = torch.randn(size, 3, generator=g)
        y = x @ w + 0.1 * torch.randn(size, 1, generator=g)
        out.append((x, y))
    return out


def make_trainer(seed: int = 0, lr: float = 0.1, **kwargs: Any) -> corolux.Trainer:
    """A Linear(3, 1) regression trainer on the CPU, SGD, MSE loss, no progress bar."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    kwargs.setdefault("progress", False)
    return corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda params: torch.optim.SGD(params, lr=lr),
        device="cpu",
        **kwargs,
    )


@dataclass(frozen=True)
class RunConfig:
    epochs: int
    train_batches: int
    valid_batches: int  # 0: no validation data
    batch_size: int
    seed: int

    def data(self) -> tuple[list[Any], list[Any] | None]:
        train = make_batches(self.train_batches, self.batch_size, self.seed)
        valid = (
            make_batches(self.valid_batches, self.batch_size, self.seed + 1) if self.valid_batches else None
        )
        return train, valid


def run_configs(validation: bool | None = None) -> st.SearchStrategy[RunConfig]:
    """Random epochs (1-3), batch counts (1-4 train, 0-3 valid) and batch sizes.

    ``validation`` True/False forces validation data on/off; None draws it.
    """
    if validation is None:
        valid = st.integers(0, 3)
    elif validation:
        valid = st.integers(1, 3)
    else:
        valid = st.just(0)
    return st.builds(
        RunConfig,
        epochs=st.integers(1, 3),
        train_batches=st.integers(1, 4),
        valid_batches=valid,
        batch_size=st.integers(1, 4),
        seed=st.integers(0, 3),
    )


@contextlib.contextmanager
def keyboard_interrupt_must_not_escape() -> Iterator[None]:
    """Turn a ``KeyboardInterrupt`` escaping the engine into a test failure (uncaught, it
    would stop the whole pytest session)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise AssertionError("KeyboardInterrupt escaped; inside the loop it must be a graceful stop") from exc


# -- plans -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    stage: str
    occurrence: int  # 1-based count of this stage in the run
    kind: str
    source: str  # "class", "coroutine" or "consumer"


@st.composite
def actions(draw: Any, kinds: tuple[str, ...] = ALL_KINDS, sources: tuple[str, ...] = SOURCES) -> Action:
    """One action at a random stage; skip_batch only where a batch is open; the consumer
    gives signals by method only (its own exceptions are not signals)."""
    kind = draw(st.sampled_from(kinds))
    source = draw(st.sampled_from([s for s in sources if s != "consumer" or kind in SIGNAL_METHODS]))
    stages = IN_BATCH if kind in SKIP_BATCHES else FIT_STAGES
    stage = draw(st.sampled_from(stages))
    occurrence = draw(st.integers(1, 3))
    return Action(stage, occurrence, kind, source)


def plans(
    kinds: tuple[str, ...] = ALL_KINDS, sources: tuple[str, ...] = SOURCES, max_size: int = 4
) -> st.SearchStrategy[list[Action]]:
    return st.lists(actions(kinds, sources), min_size=1, max_size=max_size)


# -- running a plan ----------------------------------------------------------------------------------


@dataclass
class Performed:
    index: int  # position in the stream of the event where it was done
    action: Action
    error: BaseException | None = None


@dataclass
class Recording:
    stream: list[str] = field(default_factory=list)
    skipped_at: dict[int, bool] = field(default_factory=dict)  # index of a *_batch_end -> ctx.skipped
    exception_at_event: BaseException | None = None  # ctx.exception seen with on_exception
    performed: list[Performed] = field(default_factory=list)
    outcome: BaseException | None = None  # what run() raised, if anything
    warnings: list[warnings.WarningMessage] = field(default_factory=list)
    ctx: Any = None
    ki_fired: bool = False
    teardowns: int = 0

    def first(self, kinds: tuple[str, ...]) -> Performed | None:
        return next((p for p in self.performed if p.action.kind in kinds), None)


def _perform(action: Action, ctx: Any, rec: Recording, index: int | None = None) -> None:
    """Do ``action`` at the event at ``index`` of the stream (default: the event being
    dispatched, which the consumer has not received yet)."""
    kind = action.kind
    if kind == "keyboard_interrupt":
        if rec.ki_fired:  # a second Ctrl-C aborts: plans raise it once
            return
        rec.ki_fired = True
    done = Performed(len(rec.stream) if index is None else index, action)
    rec.performed.append(done)
    if kind == "stop":
        ctx.stop_training("chaos")
    elif kind == "skip_batch":
        ctx.skip_batch()
    elif kind == "skip_validation":
        ctx.skip_validation()
    elif kind == "raise_stop":
        raise corolux.StopTraining("chaos")
    elif kind == "raise_skip_batch":
        raise corolux.SkipBatch()
    elif kind == "raise_skip_validation":
        raise corolux.SkipValidation()
    elif kind == "error":
        err = ChaosError(f"chaos at {action.stage} #{action.occurrence}")
        done.error = err
        raise err
    elif kind == "keyboard_interrupt":
        raise KeyboardInterrupt
    else:  # pragma: no cover
        raise AssertionError(kind)


def _chaos_class(plan: list[Action], rec: Recording) -> Any:
    """A class callback (built with the corolux.callback factory) listening to every fit stage."""
    mine = [a for a in plan if a.source == "class"]
    counts: Counter[str] = Counter()

    def handler(stage: str) -> Any:
        def on_stage(self: Any, ctx: Any) -> None:
            counts[stage] += 1
            for action in mine:
                if action.stage == stage and action.occurrence == counts[stage]:
                    _perform(action, ctx, rec)

        return on_stage

    def teardown(self: Any, ctx: Any) -> None:
        rec.teardowns += 1

    methods = {stage: handler(stage) for stage in FIT_STAGES}
    return corolux.callback("chaos", teardown=teardown, **methods)()


@corolux.coroutine(weight=0)
def chaos_coroutine(plan: list[Action], rec: Recording):  # type: ignore[no-untyped-def]
    """Wait for the stages of its actions; do each at its occurrence."""
    mine = [a for a in plan if a.source == "coroutine"]
    if not mine:
        return
    stages = tuple(dict.fromkeys(a.stage for a in mine))
    counts: Counter[str] = Counter()
    while True:
        event = yield stages
        stage = str(event.stage)
        counts[stage] += 1
        for action in mine:
            if action.stage == stage and action.occurrence == counts[stage]:
                _perform(action, event.ctx, rec)


def execute(config: RunConfig, plan: list[Action]) -> Recording:
    """Run ``plan`` through ``trainer.run()`` and record the stream and what happened."""
    rec = Recording()
    trainer = make_trainer(config.seed)
    train, valid = config.data()
    consumer = [a for a in plan if a.source == "consumer"]
    counts: Counter[str] = Counter()
    callbacks = [_chaos_class(plan, rec), chaos_coroutine(plan, rec)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for event in trainer.run(train, epochs=config.epochs, valid_data=valid, callbacks=callbacks):
                stage = str(event.stage)
                ctx = event.ctx
                rec.ctx = ctx
                if stage.endswith("_batch_end"):
                    rec.skipped_at[len(rec.stream)] = bool(ctx.skipped)
                if stage == "on_exception":
                    rec.exception_at_event = ctx.exception
                rec.stream.append(stage)
                counts[stage] += 1
                for action in consumer:
                    if action.stage == stage and action.occurrence == counts[stage]:
                        _perform(action, ctx, rec, index=len(rec.stream) - 1)
        except BaseException as exc:  # noqa: BLE001 - the tests check what escaped
            rec.outcome = exc
    rec.warnings = list(caught)
    return rec


# -- checking a stream ---------------------------------------------------------------------------------

_BEGIN_PARENT = {
    "fit": None,
    "epoch": "fit",
    "train": "epoch",
    "valid": "epoch",
    "train_batch": "train",
    "valid_batch": "valid",
}
_INNER_SCOPE = {s: "train_batch" for s in TRAIN_INNER} | {s: "valid_batch" for s in VALID_INNER}
_INNER_ORDER = {s: i for i, s in enumerate(TRAIN_INNER)} | {s: i for i, s in enumerate(VALID_INNER)}


def scope_of(stage: str) -> str:
    for suffix in ("_begin", "_end"):
        if stage.endswith(suffix):
            return stage[3 : -len(suffix)]
    return ""


def check_structure(stream: list[str], complete: bool) -> None:
    """Assert that ``stream`` follows the fit tree: begins matched by ends, properly nested,
    inner stages in order inside their batch; with ``complete``, every scope is closed and
    ``on_fit_end`` is the last event (one-off events may appear anywhere but the end)."""
    stack: list[str] = []
    last_inner = -1
    phases_in_epoch: list[str] = []
    for i, stage in enumerate(stream):
        where = f"event {i} ({stage!r}) in {stream!r}"
        if stage in ONE_OFF:
            assert stack, f"one-off event outside the fit scope: {where}"
            continue
        if stage in _INNER_SCOPE:
            assert stack and stack[-1] == _INNER_SCOPE[stage], f"inner stage outside its batch: {where}"
            assert _INNER_ORDER[stage] > last_inner, f"inner stage out of order: {where}"
            last_inner = _INNER_ORDER[stage]
            continue
        sc = scope_of(stage)
        assert sc in _BEGIN_PARENT, f"unexpected stage: {where}"
        if stage.endswith("_begin"):
            parent = _BEGIN_PARENT[sc]
            if parent is None:
                assert i == 0 and not stack, f"on_fit_begin must be the first event: {where}"
            else:
                assert stack and stack[-1] == parent, f"{stage} not directly inside {parent}: {where}"
            if sc == "epoch":
                phases_in_epoch = []
            if sc in ("train", "valid"):
                assert sc not in phases_in_epoch, f"phase twice in one epoch: {where}"
                if sc == "valid":
                    assert phases_in_epoch == ["train"], f"valid before train: {where}"
                else:
                    assert phases_in_epoch == [], f"train not first in its epoch: {where}"
                phases_in_epoch.append(sc)
            if sc.endswith("batch"):
                last_inner = -1
            stack.append(sc)
        else:
            assert stack and stack[-1] == sc, (
                f"{stage} does not close the innermost open scope {stack!r}: {where}"
            )
            stack.pop()
            if sc == "fit":
                assert i == len(stream) - 1, f"events after on_fit_end: {where}"
    if complete:
        assert not stack, f"scopes left open: {stack!r} in {stream!r}"
        assert stream and stream[-1] == "on_fit_end", f"on_fit_end is not the last event: {stream!r}"


@dataclass
class Scopes:
    """Where each event of a stream sits: the scopes open at it and where they end."""

    open_at: list[dict[str, int]]  # index -> {scope: index of its begin}
    end_of: dict[int, int]  # index of a begin -> index of its end (absent: never closed)

    def scope_at(self, index: int, sc: str) -> tuple[int, int | None]:
        """(begin, end) of the ``sc`` scope open at ``index``; (-1, None) when none is."""
        begin = self.open_at[index].get(sc, -1)
        return begin, self.end_of.get(begin) if begin >= 0 else None


def scopes(stream: list[str]) -> Scopes:
    """Locate the scopes of a structurally valid stream (see :func:`check_structure`)."""
    stack: list[tuple[str, int]] = []
    open_at: list[dict[str, int]] = []
    end_of: dict[int, int] = {}
    for i, stage in enumerate(stream):
        sc = scope_of(stage) if stage not in ONE_OFF else ""
        if sc and stage.endswith("_begin"):
            stack.append((sc, i))
        open_at.append(dict(stack))
        if sc and stage.endswith("_end") and stack and stack[-1][0] == sc:
            end_of[stack.pop()[1]] = i
    return Scopes(open_at, end_of)


# -- helpers for focused tests ----------------------------------------------------------------------


class GanToy(torch.nn.Module):
    """A generator and a discriminator; ``forward`` chains them."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.nn.Linear(4, 4)
        self.disc = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(self.gen(x)).squeeze(-1)


def backward_and_step(ctx: Any) -> Iterator[str]:
    """The default step's second half, for a custom step that set ``ctx.loss``: the backward and,
    unless the step accumulates, the optimizer step, with their stages (``yield from`` it)."""
    yield "on_train_batch_before_backward"
    ctx.backward(ctx.loss)
    if not ctx.accumulating:
        yield "on_train_batch_before_step"
        ctx.step_optimizer()
        yield "on_train_batch_after_step"


def hand_sgd_step(loss_fn: Any, lr: float = 0.1) -> Any:
    """A custom train step that updates by hand, for ``optimizer=None``: forward, ``loss_fn``,
    backward, then ``p -= lr * p.grad`` and ``p.grad = None`` for every parameter."""

    def step(ctx: Any) -> Iterator[str]:
        ctx.pred = ctx.model(ctx.input)
        ctx.loss = loss_fn(ctx.pred, ctx.target)
        yield "on_train_batch_after_loss"
        ctx.backward(ctx.loss)
        yield "on_train_batch_before_step"
        with torch.no_grad():
            for p in ctx.model.parameters():
                p.add_(-lr * p.grad)
                p.grad = None
        yield "on_train_batch_after_step"

    return step


def stage_recorder(weight: float = float("inf")) -> Any:
    """A class callback that appends every stage it sees (fit tree and one-offs) to ``.stages``."""

    def handler(stage: str) -> Any:
        def on_stage(self: Any, ctx: Any) -> None:
            self.stages.append(stage)

        return on_stage

    cls = corolux.callback(
        "stage_recorder",
        initialize=lambda self: setattr(self, "stages", []),
        weight=weight,
        **{stage: handler(stage) for stage in FIT_STAGES + ONE_OFF},
    )
    return cls()


def at(stage: str, action: Any, *, epoch: int | None = None, it: int | None = None, weight: Any = 0) -> Any:
    """A class callback doing ``action(ctx)`` at ``stage`` (of ``epoch``, batch ``it`` when given);
    ``.calls`` counts the times it acted."""

    def on_stage(self: Any, ctx: Any) -> None:
        if (epoch is None or ctx.epoch == epoch) and (it is None or ctx.iter == it):
            self.calls += 1
            action(ctx)

    cls = corolux.callback(
        "at", initialize=lambda self: setattr(self, "calls", 0), weight=weight, **{stage: on_stage}
    )
    return cls()


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def replicate(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    seed: int = 0,
    lr: float = 0.1,
    epochs: int = 1,
    skip: frozenset[tuple[int, int]] = frozenset(),
    stop_after: tuple[int, int] | None = None,
) -> tuple[list[tuple[int, int, float, int]], torch.nn.Module]:
    """Train by hand what :func:`make_trainer` trains: returns ``(epoch, iter, loss, batch
    size)`` per batch and the model. ``skip`` batches take no step; training ends after the
    batch ``stop_after``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for epoch in range(1, epochs + 1):
        for i, (x, y) in enumerate(batches, 1):
            loss = torch.nn.functional.mse_loss(model(x), y)
            out.append((epoch, i, loss.item(), len(x)))
            if (epoch, i) not in skip:
                opt.zero_grad()
                loss.backward()
                opt.step()
            if stop_after == (epoch, i):
                return out, model
    return out, model


def weighted_mean(values: list[tuple[float, int]]) -> float:
    return sum(v * n for v, n in values) / sum(n for _, n in values)


# -- the same run under fit() and run() ------------------------------------------------------------

#: What the step itself may do at a loss computation (inside the batch, between two stages
#: that fit() may pass over): what Ctrl-C's handler does, a Ctrl-C raised there, an emit.
STEP_ACTIONS = ("none", "request_interrupt", "keyboard_interrupt", "emit")


@dataclass(frozen=True)
class Sparse:
    """Which stages the observing callbacks listen to, and what the step does at its n-th loss."""

    listened: frozenset[str]
    step_action: str
    step_call: int
    coroutine: bool  # observe with a coroutine (the driver then counts and never passes over)


def sparse_setups() -> st.SearchStrategy[Sparse]:
    return st.builds(
        Sparse,
        listened=st.frozensets(st.sampled_from(FIT_STAGES), max_size=6),
        step_action=st.sampled_from(STEP_ACTIONS),
        step_call=st.integers(1, 12),
        coroutine=st.booleans(),
    )


@dataclass
class Outcome:
    """What the callbacks of one run saw, and how the run ended."""

    seen: list[tuple[Any, ...]] = field(default_factory=list)
    outcome: str = "returned"
    weights: list[torch.Tensor] = field(default_factory=list)
    history: str = ""


def _observe(seen: list[tuple[Any, ...]], stage: str, ctx: Any) -> None:
    seen.append((stage, ctx.epoch, ctx.iter, ctx.step, ctx.skipped, ctx.stop_reason, ctx.in_batch))


def execute_sparse(config: RunConfig, plan: list[Action], sparse: Sparse, drive: str) -> Outcome:
    """Run ``plan`` (class actions only) with callbacks that listen to ``sparse.listened``
    (plus the stages of the plan and the one-offs), driven by ``fit()`` or by a ``for`` loop
    over ``run()``; record what the callbacks saw."""
    out = Outcome()
    rec = Recording()
    trainer = make_trainer(config.seed)
    train, valid = config.data()
    mine = [a for a in plan if a.source == "class"]
    counts: Counter[str] = Counter()
    live: dict[str, Any] = {}

    def handler(stage: str) -> Any:
        def on_stage(self: Any, ctx: Any) -> None:
            _observe(out.seen, stage, ctx)
            counts[stage] += 1
            for action in mine:
                if action.stage == stage and action.occurrence == counts[stage]:
                    _perform(action, ctx, rec)

        return on_stage

    stages = sparse.listened | {a.stage for a in mine}
    observed = stages | set(ONE_OFF)
    callbacks: list[Any] = [
        corolux.callback(
            "chaos",
            setup=lambda self, ctx: live.setdefault("ctx", ctx),
            **{stage: handler(stage) for stage in sorted(stages)},
        )(),
        corolux.callback(
            "one_offs", **{s: (lambda self, ctx, s=s: _observe(out.seen, s, ctx)) for s in ONE_OFF}
        )(),
    ]
    if sparse.coroutine:
        callbacks.append(_sparse_coroutine(sorted(observed - stages - set(ONE_OFF)), out.seen))
    loss_calls = [0]

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(pred, target)
        loss_calls[0] += 1
        if loss_calls[0] == sparse.step_call:
            ctx = live["ctx"]
            if sparse.step_action == "request_interrupt":
                ctx.request_interrupt()
            elif sparse.step_action == "keyboard_interrupt":
                raise KeyboardInterrupt
            elif sparse.step_action == "emit":
                ctx.emit("on_early_stopping")
        return loss

    trainer.loss_fn = loss_fn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if drive == "fit":
                trainer.fit(train, epochs=config.epochs, valid_data=valid, callbacks=callbacks)
            else:
                for _ in trainer.run(train, epochs=config.epochs, valid_data=valid, callbacks=callbacks):
                    pass
        except Exception as exc:  # noqa: BLE001 - the outcome is compared
            out.outcome = f"{type(exc).__name__}: {exc}"
    out.weights = params_of(trainer.model)
    out.history = repr(
        (
            trainer.history.to_dict(),
            trainer.history.interrupted,
            getattr(trainer.history, "stop_reason", None),
        )
    )
    return out


@corolux.coroutine(weight=0.5)
def _sparse_coroutine(stages: list[str], seen: list[tuple[Any, ...]]):  # type: ignore[no-untyped-def]
    """Observes ``stages`` (and an every-2 filter on train batch ends) as a coroutine."""
    waits = [*stages, corolux.every("on_train_batch_end", 2)]
    while True:
        event = yield waits
        _observe(seen, f"co:{event.stage}", event.ctx)
