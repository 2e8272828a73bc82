"""With no handler inside the batch, the loop runs the default steps' bodies without their
generators (the flat path, ``corolux.loop._flat``). A callback that listens inside the batch
turns the generators back on; both paths must train, evaluate, predict, stop and fail alike.

Each test runs the same thing twice: bare (flat) and with a callback that only listens to
every stage of the step (the generator path), and compares bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from realdata import digits

import corolux
from corolux import loop
from corolux.events import STEP_STAGES

F = torch.nn.functional


class ListenInside(corolux.Callback):
    """Listens to every stage inside the batch, changes nothing: the step's generator runs."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        for stage in sorted(set().union(*STEP_STAGES.values())):
            setattr(self, stage, lambda ctx, stage=stage: self.seen.append(stage))


def make_trainer(**kwargs: Any) -> corolux.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 10)
    )
    return corolux.Trainer(
        model,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        metrics=[corolux.metrics.Accuracy()],
        device="cpu",
        progress=False,
        seed=1,
        **kwargs,
    )


def both(run):
    """``run(callbacks)`` bare and with ``ListenInside``: the two results, and the listener."""
    listener = ListenInside()
    return run([]), run([listener]), listener


def same_state(a: corolux.Trainer, b: corolux.Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for opt_a, opt_b in zip(a.optimizers.values(), b.optimizers.values(), strict=True):
        assert repr(opt_a.state_dict()) == repr(opt_b.state_dict())


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"callbacks": [corolux.callbacks.GradientAccumulation(3)]},
        {"max_steps": 7},
        {"trainer": {"precision": "bf16-mixed"}},  # the flat path's autocast branch
    ],
    ids=["plain", "accumulation", "max_steps", "bf16"],
)
def test_fit_evaluate_predict_are_the_same_on_both_paths(settings):
    x, y = digits()
    x, y = x[:600], y[:600]

    def run(callbacks):
        extra = dict(settings)
        trainer = make_trainer(**extra.pop("trainer", {}))
        history = trainer.fit(
            (x, y),
            epochs=2,
            batch_size=32,
            valid_data=0.25,
            callbacks=[*extra.pop("callbacks", []), *callbacks],
            **extra,
        )
        scores = trainer.evaluate((x, y), batch_size=50, callbacks=callbacks)
        predictions = trainer.predict(x, batch_size=50, callbacks=callbacks)
        return trainer, history, scores, predictions

    (flat, h1, s1, p1), (gen, h2, s2, p2), listener = both(run)
    assert "on_train_batch_after_step" in listener.seen and "on_predict_batch_after_pred" in listener.seen
    same_state(flat, gen)
    assert h1.to_dict() == h2.to_dict()
    assert h1.stop_reason == h2.stop_reason
    assert s1 == s2
    assert torch.equal(p1, p2)


def test_the_flat_path_is_taken_only_without_listeners_and_with_one_optimizer():
    trainer = make_trainer()
    ctx = trainer._bare_context()
    passed_all = frozenset(STEP_STAGES["train"])
    assert loop._flat(ctx, loop.train_step, "train", passed_all) is loop.train_step
    assert loop._flat(ctx, loop.train_step, "train", passed_all - {"on_train_batch_after_loss"}) is None
    assert loop._flat(ctx, lambda c: loop.train_step(c), "train", passed_all) is None  # a custom step
    ctx.optimizers = {"a": trainer.optimizers["opt"], "b": trainer.optimizers["opt"]}
    assert loop._flat(ctx, loop.train_step, "train", passed_all) is None


def test_a_ctrl_c_inside_the_step_is_taken_at_the_same_stage_on_both_paths():
    """The model asks for the stop from inside its forward (as a SIGINT would arrive there):
    both paths skip that batch and stop after the same stages."""
    x, y = digits()
    x, y = x[:320], y[:320]

    class Interrupter(corolux.Callback):
        def on_fit_begin(self, ctx):
            model = ctx.model
            original = model.forward

            def forward(inputs):
                if ctx.epoch == 2 and ctx.iter == 4:
                    ctx.request_interrupt()
                return original(inputs)

            model.forward = forward

        def on_interrupt(self, ctx):
            self.at = (ctx.epoch, ctx.iter, str(ctx.stage))

        def on_fit_end(self, ctx):
            del ctx.model.forward

    def run(callbacks):
        trainer, interrupter = make_trainer(), Interrupter()
        with pytest.warns(RuntimeWarning, match="interrupted"):
            history = trainer.fit((x, y), epochs=3, batch_size=32, callbacks=[interrupter, *callbacks])
        return trainer, history, interrupter.at

    (flat, h1, at1), (gen, h2, at2), _ = both(run)
    assert h1.interrupted and h2.interrupted
    assert at1 == at2 == (2, 4, "on_interrupt")
    same_state(flat, gen)
    assert repr(h1.to_dict()) == repr(h2.to_dict())


@pytest.mark.parametrize("phase", ["train", "valid"])
def test_an_error_in_the_loss_names_the_same_stage_on_both_paths(phase):
    x, y = digits()
    x, y = x[:128], y[:128]
    calls = {"n": 0}

    def loss_fn(pred, target):
        if (phase == "train") == torch.is_grad_enabled():  # a call of this phase
            calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the loss failed")
        return F.cross_entropy(pred, target)

    def run(callbacks):
        calls["n"] = 0
        trainer = make_trainer()
        trainer.loss_fn = loss_fn
        with pytest.raises(RuntimeError, match="the loss failed") as info:
            trainer.fit((x, y), epochs=1, batch_size=32, valid_data=(x, y), callbacks=callbacks)
        return [note for note in info.value.__notes__ if "raised in" in note]

    flat, gen, _ = both(run)
    assert flat == gen
    assert f"after 'on_{phase}_batch_after_pred'" in flat[0]


@pytest.mark.parametrize("at", ["on_train_begin", "on_train_batch_begin"])
def test_optimizers_replaced_by_a_callback_are_used_on_both_paths(at):
    x, y = digits()
    x, y = x[:320], y[:320]

    class Replace(corolux.Callback):
        def __init__(self):
            setattr(self, at, self.replace)

        def replace(self, ctx):
            if ctx.epoch == 2 and ctx.iter in (0, 3):  # at the phase's begin, or before batch 3
                ctx.optimizers = {"slow": torch.optim.SGD(ctx.model.parameters(), lr=1e-3)}

    def run(callbacks):
        trainer = make_trainer()
        history = trainer.fit((x, y), epochs=3, batch_size=32, callbacks=[Replace(), *callbacks])
        return trainer, history

    (flat, h1), (gen, h2), _ = both(run)
    for (name, a), b in zip(flat.model.state_dict().items(), gen.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert h1.to_dict() == h2.to_dict()


class DictModel(torch.nn.Module):
    """Takes its input as a keyword and returns its loss beside the logits (loss_fn=None)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.net(pixels)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


def test_inputs_that_are_not_a_tensor_and_a_carried_loss_are_the_same_on_both_paths():
    x, y = digits()
    batches = [({"pixels": x[i : i + 32], "labels": y[i : i + 32]}, y[i : i + 32]) for i in range(0, 320, 32)]

    def run(callbacks):
        torch.manual_seed(0)
        trainer = corolux.Trainer(
            DictModel(), loss_fn=None, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), progress=False
        )
        history = trainer.fit(batches, epochs=2, valid_data=batches[:3], callbacks=callbacks)
        return trainer, history

    (flat, h1), (gen, h2), listener = both(run)
    assert "on_train_batch_after_loss" in listener.seen
    same_state(flat, gen)
    assert h1.to_dict() == h2.to_dict()


def test_a_batch_without_a_target_gets_the_same_clear_error_on_both_paths():
    x, _ = digits()

    def run(callbacks):
        with pytest.raises(ValueError, match="the train batch has no target for loss_fn") as info:
            make_trainer().fit(x[:64], epochs=1, batch_size=32, callbacks=callbacks)
        return str(info.value)

    flat, gen, _ = both(run)
    assert flat == gen
