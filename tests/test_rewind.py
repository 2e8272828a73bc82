"""Rewind and replay (corolux.rewind, Stepper.rewind): a rewound batch replayed without a change
is bit-identical to a run that never rewound (dropout, a shuffled DataLoader, Adam, metrics, a
scheduler, Python's and NumPy's RNGs), a change after a rewind changes the run, what callbacks
see, the refusals, rewinds from on_exception and on_interrupt, and a real `python -i` session."""

from __future__ import annotations

import gc
import os
import random
import signal
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from realdata import adam_trainer, digits, dropout_mlp
from torch.utils.data import DataLoader, TensorDataset

import corolux
from corolux import Stepper
from corolux.callbacks import GradientAccumulation, LRScheduler

F = torch.nn.functional


def make_trainer(precision: str = "32") -> corolux.Trainer:
    """A 64-32-10 MLP with dropout on the digits, Adam, accuracy: the same weights every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on the CPU warns that it is slow
        return adam_trainer(dropout_mlp(), precision=precision)


def loader() -> DataLoader:
    """200 digits in shuffled batches of 32 (7 per epoch, the last of 8), from a seeded generator."""
    x, y = digits()
    data = TensorDataset(x[:200], y[:200])
    return DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


class Noise(corolux.Callback):
    """Draws from Python's and NumPy's RNGs into the loss, so that a replay must restore them."""

    def on_train_batch_after_loss(self, ctx):
        ctx.loss = ctx.loss * (1 + 0.01 * random.random() + 0.01 * float(np.random.rand()))


def rngs() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def same_rngs(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])


def params(trainer: corolux.Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def callbacks(accumulate: bool = False) -> list:
    cbs = [
        Noise(),
        LRScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 3, 0.5), "on_train_batch_after_step"),
    ]
    return [*cbs, GradientAccumulation(2)] if accumulate else cbs


def reference(epochs: int = 2, precision: str = "32", accumulate: bool = False) -> tuple:
    """A run that never rewinds: its weights, history, RNG states and Adam state."""
    trainer = make_trainer(precision)
    random.seed(0), np.random.seed(0)
    history = trainer.fit(loader(), epochs=epochs, callbacks=callbacks(accumulate))
    return params(trainer), history.to_dict(), rngs(), trainer.optimizers["opt"].state_dict()


def rewindable(epochs: int = 2, precision: str = "32", accumulate: bool = False, extra=()):
    trainer = make_trainer(precision)
    random.seed(0), np.random.seed(0)
    s = trainer.stepper(loader(), epochs=epochs, callbacks=[*callbacks(accumulate), *extra], rewindable=True)
    return trainer, s


def same_run(trainer: corolux.Trainer, history: corolux.History, ref: tuple) -> bool:
    weights, records, rng, opt_state = ref
    state = trainer.optimizers["opt"].state_dict()["state"]
    adam = all(torch.equal(state[i][k], opt_state["state"][i][k]) for i in state for k in state[i])
    return same(weights, params(trainer)) and history.to_dict() == records and same_rngs(rng, rngs()) and adam


# -- replay is bit-identical -------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage",
    [
        "on_train_batch_begin",
        "on_train_batch_after_pred",
        "on_train_batch_after_loss",
        "on_train_batch_before_step",
        "on_train_batch_after_step",
        "on_train_batch_end",
    ],
)
def test_rewind_and_replay_without_a_change_is_bit_identical(stage):
    ref = reference()
    trainer, s = rewindable()
    s.until(stage, when=lambda ctx: ctx.epoch == 2 and ctx.iter == 3)
    event = s.rewind()
    assert (event.stage, event.ctx.epoch, event.ctx.iter) == ("on_train_batch_begin", 2, 3)
    assert s.where() == "epoch 2/2 · train · batch 3/7 · on_train_batch_begin"
    s.until(stage)
    s.rewind()  # twice over: the start kept is still the batch's
    assert same_run(trainer, s.finish(), ref)


def test_rewinds_at_every_batch_and_at_an_epochs_last_batch():
    ref = reference()
    trainer, s = rewindable()
    while (event := s.until(["on_train_batch_after_step", "on_train_batch_end"])) is not None:
        if event.stage == "on_train_batch_after_step" and event.ctx.iter % 2:
            s.rewind()
            s.until("on_train_batch_after_step")
        if event.stage == "on_train_batch_end" and event.ctx.iter == 7:  # the epoch's last batch
            s.rewind()
            s.until("on_train_batch_end")
            if event.ctx.epoch == 2:
                break
    assert same_run(trainer, s.finish(), ref)


def test_replay_inside_a_gradient_accumulation_window():
    ref = reference(accumulate=True)
    trainer, s = rewindable(accumulate=True)
    s.until("on_train_batch_before_backward", when=lambda ctx: ctx.iter == 4)  # batch 3's gradients pending
    assert s.ctx.gradients_pending
    s.rewind()
    s.until("on_train_batch_end")  # after the window's step
    s.rewind()
    assert same_run(trainer, s.finish(), ref)


def test_replay_with_a_grad_scaler():
    ref = reference(epochs=1, precision="16-mixed")
    trainer, s = rewindable(epochs=1, precision="16-mixed")
    s.until("on_train_batch_begin", when=lambda ctx: ctx.iter == 2)
    scale = trainer.scaler.get_scale()
    s.until("on_train_batch_end")
    s.rewind()
    assert trainer.scaler.get_scale() == scale  # the update of batch 2 is undone
    s.until("on_train_batch_after_step")
    s.rewind()
    weights, records, rng, _ = ref
    history = s.finish()
    assert same(weights, params(trainer)) and history.to_dict() == records and same_rngs(rng, rngs())


class Counting(torch.optim.SGD):
    """SGD whose state also holds a plain count and a tensor it replaces at every step (not in
    place), as some optimizers do: a rewind must put both back."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["n"] = state.get("n", 0) + 1
                state["last"] = p.detach() * state["n"]


def test_replay_with_an_optimizer_whose_state_is_replaced():
    def run(rewind: bool) -> tuple[list[torch.Tensor], dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Dropout(0.2))
        trainer = corolux.Trainer(
            model,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: Counting(p, lr=0.1, momentum=0.9),
            device="cpu",
            progress=False,
        )
        s = trainer.stepper(loader(), epochs=1, rewindable=True)
        s.until("on_train_batch_end", when=lambda ctx: ctx.iter == 3)
        if rewind:
            s.rewind()
        s.finish()
        return params(trainer), trainer.optimizers["opt"].state_dict()["state"]

    (weights, state), (weights2, state2) = run(False), run(True)
    assert same(weights, weights2) and state[0]["n"] == state2[0]["n"] == 7
    assert torch.equal(state[0]["last"], state2[0]["last"])


class TwoPasses(corolux.Trainer):
    """A custom step with a stage of its own: two forward passes (two dropout masks) per batch."""

    stages = ("on_second_pass",)

    def train_step(self, ctx):
        ctx.pred = ctx.model(ctx.input)
        first = ctx.loss_fn(ctx.pred, ctx.target)
        yield "on_second_pass"
        ctx.loss = first + ctx.loss_fn(ctx.model(ctx.input), ctx.target)
        ctx.backward(ctx.loss)
        yield "on_train_batch_before_step"
        ctx.step_optimizer()
        yield "on_train_batch_after_step"


def test_replay_of_a_custom_step_from_its_own_stage():
    def run(rewind: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Dropout(0.5))
        trainer = TwoPasses(
            model,
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            device="cpu",
            progress=False,
        )
        s = trainer.stepper(loader(), epochs=1, rewindable=True)
        s.until("on_second_pass", when=lambda ctx: ctx.iter == 4)
        if rewind:
            assert s.rewind().ctx.iter == 4
            s.until("on_train_batch_after_step")
            s.rewind()
        s.finish()
        return params(trainer)

    assert same(run(False), run(True))


# -- a change takes effect ---------------------------------------------------------------------


def test_a_change_after_a_rewind_changes_the_run():
    ref = reference()
    trainer, s = rewindable()
    s.until("on_train_batch_after_step", when=lambda ctx: ctx.iter == 3)
    before = params(trainer)
    s.rewind()
    assert not same(before, params(trainer))  # the step of batch 3 is undone
    s.ctx.input = s.ctx.input * 3
    s.until("on_train_batch_end")
    assert not same(before, params(trainer))
    history = s.finish()
    assert not same(ref[0], params(trainer)) and history["train_loss"][0] != ref[1]["train_loss"][0]


def test_a_learning_rate_set_after_a_rewind_is_used():
    trainer, s = rewindable(epochs=1)
    s.until("on_train_batch_after_step", when=lambda ctx: ctx.iter == 2)
    moved = params(trainer)
    s.rewind()
    start = params(trainer)
    s.ctx.opt.param_groups[0]["lr"] = 0.0
    s.until("on_train_batch_after_step")
    assert same(start, params(trainer)) and not same(moved, start)  # lr 0: Adam moves nothing
    s.close()


# -- what callbacks see ------------------------------------------------------------------------


class Stateful(corolux.Callback):
    """Counts batch ends in its state (restored by a rewind), in a tensor it adds to in place
    (as metric accumulators do), and begins outside its state (not restored)."""

    def __init__(self):
        self.ends = torch.zeros((), dtype=torch.int64)
        self.begins = 0

    def on_train_batch_begin(self, ctx):
        self.begins += 1

    def on_train_batch_end(self, ctx):
        self.ends.add_(1)

    def state_dict(self):
        return {"ends": self.ends}

    def load_state_dict(self, state):
        self.ends = state["ends"]


def test_what_class_and_coroutine_callbacks_see():
    seen = []

    @corolux.coroutine
    def waiter():
        while True:
            event = yield "on_train_batch_begin"
            seen.append(("begin", event.ctx.iter))
            event = yield "on_train_batch_after_loss"
            seen.append(("after_loss", event.ctx.iter))

    stateful = Stateful()
    trainer, s = rewindable(epochs=1, extra=[stateful, waiter()])
    s.until("on_train_batch_end", when=lambda ctx: ctx.iter == 2)
    assert (stateful.ends, stateful.begins) == (2, 2)
    s.rewind()  # from on_train_batch_end: the end is undone in the state, the begin seen again
    assert (stateful.ends, stateful.begins) == (1, 3)
    s.until("on_train_batch_after_pred")
    s.rewind()  # the coroutine woke at the abandoned begin; it waits for after_loss still
    s.until("on_train_batch_end")
    assert (stateful.ends, stateful.begins) == (2, 4)
    assert seen == [
        ("begin", 1),
        ("after_loss", 1),
        ("begin", 2),
        ("after_loss", 2),
        ("begin", 2),
        ("after_loss", 2),
    ]
    s.close()


def test_a_callbacks_nested_state_changed_in_place_is_restored_as_at_the_batchs_start():
    """A state_dict() holding lists changed in place (a per-epoch log): the rewind gives back
    the lists as they were when the batch began, not as an earlier batch left them."""

    class PerEpochLog(corolux.Callback):
        def __init__(self):
            self.log = []

        def on_train_begin(self, ctx):
            self.log.append([])

        def on_train_batch_end(self, ctx):
            self.log[-1].append(ctx.iter)

        def state_dict(self):
            return {"log": self.log}

        def load_state_dict(self, state):
            self.log = [list(batches) for batches in state["log"]]

    log = PerEpochLog()
    trainer, s = rewindable(epochs=2, extra=[log])
    s.until("on_train_batch_after_loss", when=lambda ctx: (ctx.epoch, ctx.iter) == (2, 3))
    assert log.log == [[1, 2, 3, 4, 5, 6, 7], [1, 2]]
    s.rewind()
    assert log.log == [[1, 2, 3, 4, 5, 6, 7], [1, 2]]
    s.finish()
    assert log.log == [[1, 2, 3, 4, 5, 6, 7]] * 2


def test_the_epochs_metrics_count_the_replayed_batch_once():
    ref = reference(epochs=1)
    trainer, s = rewindable(epochs=1)
    s.until("on_train_batch_end", when=lambda ctx: ctx.iter == 7)
    s.rewind()
    assert s.until("on_train_end").ctx.metrics["train_loss"] == ref[1]["train_loss"][0]
    s.close()


# -- errors and Ctrl-C inside the batch --------------------------------------------------------


class Fragile(torch.nn.Module):
    """Raises in its forward on an input with a value above 100, as a shape or dtype bug would."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 10)

    def forward(self, x):
        if x.abs().max() > 100:
            raise RuntimeError("activations blew up")
        return self.net(x)


class Count(corolux.Callback):
    def __init__(self):
        self.exceptions = []

    def on_exception(self, ctx):
        self.exceptions.append(ctx.exception)


def fragile(callbacks=()) -> tuple[corolux.Trainer, Stepper]:
    torch.manual_seed(0)
    trainer = corolux.Trainer(
        Fragile(),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )
    x, y = digits()
    return trainer, trainer.stepper(
        (x[:128], y[:128]), epochs=1, batch_size=32, callbacks=list(callbacks), rewindable=True
    )


def test_rewind_at_on_exception_raised_in_the_step(capsys):
    count = Count()
    trainer, s = fragile([count])
    s.until("on_train_batch_after_pred", when=lambda ctx: ctx.iter == 2)
    s.rewind()
    s.ctx.input = s.ctx.input * 1000  # a bad change: the forward raises
    event = s.until("on_train_batch_end")
    assert event.stage == "on_exception" and s.where() == "epoch 1/1 · train · batch 2/4 · on_exception"
    assert "s.rewind() runs the batch again" in capsys.readouterr().out
    assert len(count.exceptions) == 1 and str(count.exceptions[0]) == "activations blew up"
    assert s.rewind().stage == "on_train_batch_begin" and s.ctx.exception is None
    assert s.until("on_train_batch_end").ctx.iter == 2  # the batch as it was: no error
    assert len(s.finish()) == 1 and len(count.exceptions) == 1


def test_on_exception_sees_the_same_state_with_and_without_a_rewinder():
    """An error after the backward: without a rewinder the phase settles (the gradients are
    dropped) before on_exception; a rewindable run shows the same, and a rewind restores."""

    def failing_step(ctx):
        ctx.pred = ctx.model(ctx.input)
        yield "on_train_batch_after_pred"
        ctx.loss = F.cross_entropy(ctx.pred, ctx.target)
        yield "on_train_batch_after_loss"
        ctx.backward(ctx.loss)
        if ctx.iter == 2:
            raise RuntimeError("after the backward")
        yield "on_train_batch_before_step"
        ctx.step_optimizer()
        yield "on_train_batch_after_step"

    seen = {}
    for rewindable_run in (False, True):
        trainer = adam_trainer(dropout_mlp(), train_step=failing_step)
        s = trainer.stepper(loader(), epochs=1, rewindable=rewindable_run)
        event = s.until("on_exception")
        seen[rewindable_run] = [p.grad is None for p in event.ctx.model.parameters()]
        s.close()
    assert seen[False] == seen[True] == [True] * 4


def test_an_error_not_rewound_escapes_as_without_a_rewinder():
    count = Count()
    _, s = fragile([count])
    s.until("on_train_batch_begin", when=lambda ctx: ctx.iter == 3)
    s.ctx.input = s.ctx.input * 1000
    assert s.until("on_train_batch_end").stage == "on_exception"
    with pytest.raises(RuntimeError, match="activations blew up") as info:
        s.step()
    assert any(
        "raised in the train step after 'on_train_batch_begin' (epoch 1, batch 3)" in n
        for n in info.value.__notes__
    )
    assert len(count.exceptions) == 1 and s.where().startswith("failed: RuntimeError")


def test_rewind_at_on_exception_raised_by_a_callback():
    class Boom(corolux.Callback):
        armed = True

        def on_train_batch_after_loss(self, ctx):
            if ctx.iter == 2 and self.armed:
                raise ValueError("boom")

    boom, count = Boom(), Count()
    _, s = fragile([boom, count])
    assert s.until("on_train_batch_end", when=lambda ctx: ctx.iter == 2).stage == "on_exception"
    boom.armed = False  # fix the callback, then run the batch again
    assert s.rewind().ctx.iter == 2
    assert len(s.finish()) == 1 and len(count.exceptions) == 1


def test_rewind_at_on_interrupt_calls_the_stop_off():
    class CtrlC(corolux.Callback):
        def on_train_batch_after_loss(self, ctx):
            if ctx.epoch == 1 and ctx.iter == 4 and not hasattr(self, "done"):
                self.done = True
                os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed here

    ref = reference()
    trainer, s = rewindable(extra=[CtrlC()])
    event = s.until("on_fit_end")
    assert event.stage == "on_interrupt" and s.ctx.stop_reason == "interrupted" and s.ctx.in_batch
    assert s.rewind().ctx.iter == 4 and s.ctx.stop_reason is None
    history = s.finish()
    assert not history.interrupted and history.stop_reason is None and same_run(trainer, history, ref)


# -- refusals ---------------------------------------------------------------------------------


def test_rewind_without_rewindable_says_how_to_turn_it_on():
    trainer = make_trainer()
    s = trainer.stepper(loader(), epochs=1)
    s.until("on_train_batch_after_loss")
    with pytest.raises(
        RuntimeError, match=r"without rewindable=True.*trainer\.stepper\(\.\.\., rewindable=True\)"
    ):
        s.rewind()
    assert s.where() == "epoch 1/1 · train · batch 1/7 · on_train_batch_after_loss"  # still paused there
    s.close()


@pytest.mark.parametrize(
    "stage", ["on_fit_begin", "on_train_begin", "on_train_end", "on_valid_batch_after_loss", "on_epoch_end"]
)
def test_rewind_outside_a_training_batch_is_refused(stage):
    trainer = make_trainer()
    x, y = digits()
    s = trainer.stepper(loader(), epochs=2, valid_data=(x[1000:1064], y[1000:1064]), rewindable=True)
    s.until(stage)
    with pytest.raises(
        RuntimeError, match=r"rewind\(\) at .*: it is not inside a training batch.*not past it"
    ):
        s.rewind()
    assert s.event.stage == stage
    assert s.until("on_train_batch_after_loss").ctx.iter >= 1
    s.rewind()  # and inside one it works
    s.close()


def test_rewind_before_the_start_and_after_the_end():
    trainer, s = rewindable(epochs=1)
    with pytest.raises(RuntimeError, match="has not started"):
        s.rewind()
    s.finish()
    with pytest.raises(RuntimeError, match=r"the run is over \(finished\)"):
        s.rewind()
    s.close()


def test_rewindable_needs_a_fresh_training_run():
    trainer = make_trainer()
    x, y = digits()
    with pytest.raises(ValueError, match="run_evaluate.*no training batch"):
        Stepper(trainer.run_evaluate((x[:64], y[:64])), rewindable=True)
    run = trainer.run(loader(), epochs=1)
    next(run)
    with pytest.raises(ValueError, match="started already"):
        Stepper(run, rewindable=True)
    run.close()
    with pytest.raises(TypeError, match=r"generator of trainer\.run"):
        Stepper(iter([1, 2]), rewindable=True)


# -- runs without a rewinder pay nothing -----------------------------------------------------------


def test_no_rewind_code_runs_without_rewindable():
    """Not one call into corolux.rewind during a fit() or a plain stepper's run."""
    rewind_file = sys.modules["corolux.rewind"].__file__
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == rewind_file:
            calls.append(frame.f_code.co_name)

    trainer = make_trainer()
    gc.collect()  # an earlier test's rewinder, finalized now, is not this run's call
    sys.setprofile(profile)
    try:
        trainer.fit(loader(), epochs=1)
        trainer.stepper(loader(), epochs=1).finish()
    finally:
        sys.setprofile(None)
    assert calls == []


# -- a real interpreter ----------------------------------------------------------------------------

SESSION_HELPERS = textwrap.dedent(
    """
    import torch, corolux
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    d = load_digits()
    X, Y = torch.tensor(d.data[:200], dtype=torch.float32) / 16, torch.tensor(d.target[:200])

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 10))
        trainer = corolux.Trainer(model, loss_fn=torch.nn.functional.cross_entropy, device="cpu",
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), progress=False)
        data = DataLoader(TensorDataset(X, Y), batch_size=32, shuffle=True,
            generator=torch.Generator().manual_seed(1))
        return trainer, data

    def params(trainer):
        return [p.detach().clone() for p in trainer.model.parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    """
)

SESSION = [
    ("import torch; from helpers import make, params, same", None),
    ("t0, data = make(); h0 = t0.fit(data, epochs=2); ref = params(t0); rng = torch.get_rng_state()", None),
    ("t, data = make(); s = t.stepper(data, epochs=2, rewindable=True)", None),
    (
        "s.until('on_train_batch_after_step', when=lambda c: c.iter == 3)",
        r"Event\('on_train_batch_after_step', epoch=1, iter=3\)",
    ),
    ("s.rewind()", r"Event\('on_train_batch_begin', epoch=1, iter=3\)"),
    ("s", r"<Stepper epoch 1/2 · train · batch 3/7 · on_train_batch_begin>"),
    ("h = s.finish()", None),
    ("print('SAME:', same(ref, params(t)), torch.equal(rng, torch.get_rng_state()))", r"SAME: True True"),
    ("t2, data = make(); s2 = t2.stepper(data, epochs=2, rewindable=True)", None),
    ("s2.until('on_train_batch_after_step', when=lambda c: c.iter == 3)", r"iter=3\)"),
    ("s2.rewind()", r"Event\('on_train_batch_begin', epoch=1, iter=3\)"),
    ("s2.ctx.input = s2.ctx.input * 3", None),
    ("h2 = s2.finish()", None),
    (
        "print('DIFFER:', not same(ref, params(t2)), h2['train_loss'][0] != h0['train_loss'][0])",
        r"DIFFER: True True",
    ),
]


def test_a_real_interactive_session_rewinds(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    (tmp_path / "helpers.py").write_text(SESSION_HELPERS)
    env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8")
    env.pop("PYTHONSTARTUP", None)
    child = pexpect.spawn(
        sys.executable, ["-i", "-q"], env=env, cwd=str(tmp_path), encoding="utf-8", timeout=60
    )
    try:
        child.expect_exact(">>> ")
        for line, shows in SESSION:
            child.sendline(line)
            if shows is not None:
                child.expect(shows)
            child.expect_exact(">>> ")
            assert "Traceback" not in child.before, child.before
        child.sendline("exit()")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
