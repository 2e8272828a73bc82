"""Precision: autocast, and the GradScaler's scaling, unscaling, stepping and update, owned by
one object; ``ctx.unscale_gradients()`` and ``ctx.step_skipped`` for callbacks (DESIGN §10)."""

from __future__ import annotations

import warnings

import pytest
import torch
from realdata import iris
from strategies import hand_sgd_step

import corolux
from corolux.precision import Precision

F = torch.nn.functional


def grad_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def trainer(precision: str = "16-mixed", **kwargs) -> corolux.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on the CPU warns (tested in test_trainer)
        return corolux.Trainer(
            model, loss_fn=F.cross_entropy, precision=precision, device="cpu", progress=False, **kwargs
        )


def test_unscale_gradients_lets_a_callback_see_true_gradients_once_per_step():
    seen: list[tuple[float, float, float, float]] = []

    class Clip(corolux.Callback):
        def on_train_batch_before_step(self, ctx):
            scaled = grad_norm(ctx.model)
            ctx.unscale_gradients()
            true = grad_norm(ctx.model)
            ctx.unscale_gradients()  # idempotent: no second division, no error from the scaler
            seen.append((scaled, true, grad_norm(ctx.model), ctx.scaler.get_scale()))
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm=1.0)

    t = trainer()
    history = t.fit(iris(), epochs=2, batch_size=50, callbacks=[Clip()])
    assert len(seen) == 6 and len(history) == 2
    for scaled, true, again, scale in seen:
        assert scaled == pytest.approx(true * scale, rel=1e-3)  # 65,536 times too large before
        assert again == true
        assert true < 100  # an iris MLP's gradients, not scaled ones


def test_unscale_gradients_is_a_no_op_without_a_scaler():
    norms: list[tuple[float, float]] = []

    def look(ctx):
        before = grad_norm(ctx.model)
        ctx.unscale_gradients()
        norms.append((before, grad_norm(ctx.model)))

    at = corolux.callback("at", on_train_batch_before_step=lambda self, ctx: look(ctx))()
    trainer("32").fit(iris(), epochs=1, batch_size=50, callbacks=[at])
    assert len(norms) == 3 and all(a == b for a, b in norms)


def test_step_skipped_when_the_gradients_are_not_finite():
    seen: list[tuple[int, bool, bool]] = []
    before_step: dict[int, list[torch.Tensor]] = {}

    class Poison(corolux.Callback):
        def on_train_batch_before_step(self, ctx):
            before_step[ctx.iter] = [p.detach().clone() for p in ctx.model.parameters()]
            if ctx.iter == 2:
                next(ctx.model.parameters()).grad[0, 0] = float("inf")

        def on_train_batch_after_step(self, ctx):
            same = all(
                torch.equal(a, b) for a, b in zip(before_step[ctx.iter], ctx.model.parameters(), strict=True)
            )
            seen.append((ctx.iter, ctx.step_skipped, same))

    t = trainer()
    t.fit(iris(), epochs=1, batch_size=50, callbacks=[Poison()])
    assert seen == [(1, False, False), (2, True, True), (3, False, False)]
    assert t.scaler.get_scale() == 2.0**15  # the scaler backed off once, after the skipped step


def test_step_skipped_is_false_without_a_scaler():
    skipped: list[bool] = []
    at = corolux.callback(
        "at", on_train_batch_after_step=lambda self, ctx: skipped.append(ctx.step_skipped)
    )()
    trainer("bf16-mixed").fit(iris(), epochs=1, batch_size=50, callbacks=[at])
    assert skipped == [False, False, False]


def test_a_custom_step_steps_and_updates_through_the_same_object():
    # ctx.step_optimizer() in a custom step goes through the scaler, and the loop updates it
    # once per batch: two optimizers stepped in one batch, one update.
    updates: list[float] = []

    def two_halves(ctx):
        ctx.pred = ctx.model(ctx.input)
        ctx.loss = F.cross_entropy(ctx.pred, ctx.target)
        yield "on_train_batch_after_loss"
        ctx.backward(ctx.loss, ctx.optimizers["first"])
        ctx.pred = ctx.model(ctx.input)
        ctx.backward(F.cross_entropy(ctx.pred, ctx.target), ctx.optimizers["second"])
        yield "on_train_batch_before_step"
        ctx.step_optimizer(ctx.optimizers["first"])
        ctx.step_optimizer(ctx.optimizers["second"])
        yield "on_train_batch_after_step"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = corolux.Trainer(
            model,
            loss_fn=F.cross_entropy,
            optimizer={
                "first": torch.optim.SGD(model[0].parameters(), lr=0.05),
                "second": torch.optim.SGD(model[2].parameters(), lr=0.05),
            },
            train_step=two_halves,
            precision="16-mixed",
            device="cpu",
            progress=False,
        )
    original = t.scaler.update
    t.scaler.update = lambda *a, **k: (updates.append(t.scaler.get_scale()), original(*a, **k))
    history = t.fit(iris(), epochs=2, batch_size=50)
    assert len(updates) == 6 and len(history) == 2


def test_unknown_precision_is_a_value_error_listing_the_choices():
    with pytest.raises(
        ValueError, match=r"precision must be one of '32', 'bf16-mixed', '16-mixed', got 'fp8'"
    ):
        Precision("fp8", torch.device("cpu"))


def test_a_batch_skipped_after_unscaling_leaves_the_next_step_true_gradients():
    # "Clip, and skip the batch if the gradients are bad": the unscaled optimizer must not
    # carry its unscaled state into the next batch (whose gradients are scaled again).
    norms: dict[str, list[float]] = {}
    for precision in ("32", "16-mixed"):
        seen = norms.setdefault(precision, [])

        class ClipOrSkip(corolux.Callback):
            def on_train_batch_before_step(self, ctx, seen=seen):
                ctx.unscale_gradients()
                seen.append(round(grad_norm(ctx.model), 3))
                if ctx.iter == 1:
                    ctx.skip_batch()

        t = trainer(precision, optimizer=lambda p: torch.optim.SGD(p, lr=0.0))  # lr 0: same batches
        t.fit(iris(), epochs=1, batch_size=50, callbacks=[ClipOrSkip()])
    assert norms["16-mixed"] == pytest.approx(norms["32"], rel=1e-2)


@pytest.mark.parametrize("how", ["close", "error"])
def test_a_run_cut_short_between_step_and_update_leaves_the_scaler_usable(how):
    t = trainer()
    if how == "close":
        for event in t.run(iris(), epochs=1, batch_size=50):
            if event.stage == "on_train_batch_after_step":
                break
    else:
        boom = corolux.callback("boom", on_train_batch_after_step=lambda self, ctx: 1 / 0)()
        with pytest.raises(ZeroDivisionError):
            t.fit(iris(), epochs=1, batch_size=50, callbacks=[boom])
    assert len(t.fit(iris(), epochs=1, batch_size=50)) == 1  # not "step() has already been called"


def test_16_mixed_with_a_hand_written_update_is_refused():
    t = trainer("16-mixed", optimizer=None, train_step=hand_sgd_step(F.cross_entropy))
    with pytest.raises(ValueError, match="with optimizer=None .* use precision='bf16-mixed'"):
        t.fit(iris())


def test_ctx_scaler_is_the_precisions_and_read_only():
    seen = []

    def look(ctx):
        seen.append(ctx.scaler is ctx.precision.scaler)
        with pytest.raises(AttributeError):
            ctx.scaler = None

    at = corolux.callback("at", on_fit_begin=lambda self, ctx: look(ctx))()
    trainer().fit(iris(), callbacks=[at])
    assert seen == [True]


def test_the_scaler_is_updated_before_the_batch_end_handlers_run():
    # As in a hand-written loop (scaler.step, scaler.update, then whatever comes next): a
    # callback at on_train_batch_end sees this batch's update.
    scales: list[float] = []

    class Poison(corolux.Callback):
        def on_train_batch_before_step(self, ctx):
            if ctx.iter == 1:
                next(ctx.model.parameters()).grad[0, 0] = float("inf")

        def on_train_batch_end(self, ctx):
            scales.append(ctx.scaler.get_scale())

    trainer().fit(iris(), epochs=1, batch_size=50, callbacks=[Poison()])
    assert scales == [2.0**15, 2.0**15, 2.0**15]  # backed off at batch 1's end, not batch 2's
