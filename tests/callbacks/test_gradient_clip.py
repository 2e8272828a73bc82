"""GradientClip: fit() clips as a hand loop with clip_grad_norm_ does, bit for bit; under
precision="16-mixed" it clips the unscaled gradients (scaler.unscale_, clip, scaler.step), not the
scaled ones (luz's bug); it records the norm without a host sync per step; its weight puts it after
user callbacks that change the gradients."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from realdata import digit_batches, small_mlp

import corolux
from corolux.callbacks.gradient_clip import GradientClip

F = torch.nn.functional
nn = torch.nn


def batches(n: int = 6, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return digit_batches(n, size)


mlp = small_mlp


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9)


def fit(
    model: nn.Module, callbacks: list[Any], epochs: int = 2, **kwargs: Any
) -> tuple[corolux.Trainer, Any]:
    t = corolux.Trainer(model, loss_fn=F.cross_entropy, optimizer=sgd, device="cpu", progress=False, **kwargs)
    return t, t.fit(batches(), epochs=epochs, callbacks=callbacks)


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def hand(
    max_norm: float | None, epochs: int = 2, scaler: str | None = None
) -> tuple[nn.Module, list[torch.Tensor]]:
    """The textbook loop. ``scaler``: None (float32), "unscale" (unscale_, clip, step: right) or
    "scaled" (clip the scaled gradients, then step: luz's bug)."""
    model = mlp()
    opt = sgd(model.parameters())
    gs = torch.amp.GradScaler("cpu") if scaler else None
    norms = []
    for _ in range(epochs):
        for x, y in batches():
            if gs is None:
                F.cross_entropy(model(x), y).backward()
            else:
                with torch.autocast("cpu", dtype=torch.float16):
                    out = model(x)
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = F.cross_entropy(out, y)
                gs.scale(loss).backward()
                if scaler == "unscale":
                    gs.unscale_(opt)
            if max_norm is not None:
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            if gs is None:
                opt.step()
            else:
                gs.step(opt)
                gs.update()
            opt.zero_grad(set_to_none=True)
    return model, norms


def test_clips_as_a_hand_loop_and_records_the_last_steps_norm():
    model, norms = hand(0.1)
    lux = mlp()
    _, history = fit(lux, [GradientClip(max_norm=0.1)])
    assert same(model, lux)
    assert all(n > 0.1 for n in norms)  # clipping was active at every step
    assert history["grad_norm"] == [float(norms[5]), float(norms[11])]  # each epoch's last step
    unclipped, _ = hand(None)
    assert not same(unclipped, lux)  # teeth


def test_under_16_mixed_it_clips_the_unscaled_gradients():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lux = mlp()
        t, history = fit(lux, [GradientClip(max_norm=0.1)], precision="16-mixed")
    assert any("16-mixed" in str(w.message) for w in caught)  # allowed on the CPU, with a warning

    right, norms = hand(0.1, scaler="unscale")
    assert same(right, lux)
    assert t.precision.scaler.get_scale() > 1  # the loss really was scaled
    assert history["grad_norm"][-1] == float(norms[-1])  # the true norm, not the scaled one
    assert norms[-1] < 1000
    wrong, _ = hand(0.1, scaler="scaled")
    assert not same(wrong, lux)  # teeth: clipping the scaled gradients trains differently


def test_several_optimizers_are_clipped_and_recorded_each():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 10)
            self.b = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    class Norms(corolux.Callback):
        weight = 60  # after the clip

        def __init__(self) -> None:
            self.after: list[tuple[str, float]] = []

        def on_train_batch_before_step(self, ctx: Any) -> None:
            grads = [p.grad for g in ctx.opt.param_groups for p in g["params"]]
            self.after.append(
                (ctx.opt_name, float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
            )

    torch.manual_seed(0)
    norms = Norms()
    t = corolux.Trainer(
        Two(), loss_fn=F.cross_entropy, optimizer={"a": sgd, "b": sgd}, device="cpu", progress=False
    )
    history = t.fit(batches(), epochs=1, callbacks=[GradientClip(0.05), norms])
    assert set(history) >= {"grad_norm_a", "grad_norm_b"} and "grad_norm" not in history
    assert [name for name, _ in norms.after] == ["a", "b"] * 6
    assert all(n <= 0.05 * (1 + 1e-5) for _, n in norms.after)


def test_it_runs_after_user_callbacks_that_change_the_gradients():
    class Boost(corolux.Callback):  # weight 0: before the clip
        def on_train_batch_before_step(self, ctx: Any) -> None:
            for p in ctx.model.parameters():
                p.grad.mul_(100)

    seen = []

    class After(corolux.Callback):
        weight = 60

        def on_train_batch_before_step(self, ctx: Any) -> None:
            seen.append(float(torch.nn.utils.get_total_norm([p.grad for p in ctx.model.parameters()])))

    _, history = fit(mlp(), [After(), GradientClip(1.0), Boost()], epochs=1)
    assert history["grad_norm"][0] > 10  # it saw the boosted gradients
    assert seen and all(n <= 1.0 + 1e-5 for n in seen)


@pytest.mark.parametrize("norm_type", [1.0, math.inf, "inf"])
def test_norm_types(norm_type):
    clip = GradientClip(max_norm=0.5, norm_type=norm_type)
    _, history = fit(mlp(), [clip], epochs=1)
    assert history["grad_norm"][0] > 0
    assert clip.norm_type == float(norm_type)


@pytest.mark.parametrize(
    ("arg", "value"),
    [
        ("max_norm", 0),
        ("max_norm", -1.0),
        ("max_norm", "big"),
        ("max_norm", True),
        ("max_norm", math.nan),
        ("norm_type", 0),
        ("norm_type", None),
    ],
)
def test_bad_arguments_are_refused(arg, value):
    with pytest.raises(ValueError, match=rf"GradientClip: {arg} must be a number > 0, got {value!r}"):
        GradientClip(**{arg: value})


# -- no host sync per step --------------------------------------------------------------------------

SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


def test_no_host_sync_per_step(monkeypatch):
    """The conversions that read a tensor on the host are counted: a fit of 3 batches per epoch
    and one of 12 make as many (per-epoch reads only). Teeth: a float(norm) per step is caught."""

    class ReadsEachStep(corolux.Callback):
        def on_train_batch_after_step(self, ctx: Any) -> None:
            float(ctx.metrics["grad_norm"])

    assert count_reads(monkeypatch, [GradientClip(0.1)], 3) == count_reads(
        monkeypatch, [GradientClip(0.1)], 12
    )
    with_read = [GradientClip(0.1), ReadsEachStep()]
    assert count_reads(monkeypatch, with_read, 3) != count_reads(monkeypatch, with_read, 12)


def count_reads(monkeypatch: pytest.MonkeyPatch, callbacks: list[Any], n_batches: int) -> int:
    """The host reads of tensor values made by a 2-epoch fit over ``n_batches`` batches."""
    calls: list[str] = []
    with monkeypatch.context() as patch:
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(
                self: torch.Tensor, *a: Any, _name: str = name, _original: Any = original, **k: Any
            ) -> Any:
                calls.append(_name)
                return _original(self, *a, **k)

            patch.setattr(torch.Tensor, name, wrapper)
        t = corolux.Trainer(mlp(), loss_fn=F.cross_entropy, optimizer=sgd, device="cpu", progress=False)
        t.fit(batches(n_batches, size=16), epochs=2, callbacks=callbacks)
    return len(calls)
