"""Breakpoint: stops at its stage when its condition holds, with `ctx` in the debugger's
frame; respects sys.breakpointhook and PYTHONBREAKPOINT; a real pdb session via pexpect."""

from __future__ import annotations

import copy
import os
import sys
import textwrap

import pytest
import torch
from sklearn.datasets import load_iris

import corolux
from corolux.callback import handlers_of
from corolux.callbacks import DEFAULTS, Breakpoint

F = torch.nn.functional


def iris() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_iris()
    x = torch.tensor(d.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(d.target)  # 150 samples: 5 batches of 32


def make_trainer(cls: type[corolux.Trainer] = corolux.Trainer) -> corolux.Trainer:
    torch.manual_seed(0)
    return cls(
        torch.nn.Linear(4, 3),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )


@pytest.fixture
def hook(monkeypatch):
    """A breakpointhook that records what the debugger would see in the calling frame."""
    seen: list[dict] = []

    def fake_hook(*args, **kwargs):
        frame = sys._getframe(1)  # the frame that called breakpoint()
        ctx = frame.f_locals["ctx"]
        seen.append({"stage": str(ctx.stage), "epoch": ctx.epoch, "iter": ctx.iter, "ctx": ctx})

    monkeypatch.setattr(sys, "breakpointhook", fake_hook)
    return seen


def test_stops_where_asked_with_ctx_in_scope(hook, capsys):
    bp = Breakpoint("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 2)
    make_trainer().fit(iris(), epochs=2, batch_size=32, callbacks=[bp])
    assert [(h["stage"], h["epoch"], h["iter"]) for h in hook] == [
        ("on_train_batch_after_loss", 1, 2),
        ("on_train_batch_after_loss", 2, 2),
    ]
    assert bp.hits == 2
    out = capsys.readouterr().out
    assert "corolux Breakpoint at epoch 1/2 · train · batch 2/5 · on_train_batch_after_loss" in out


def test_without_when_it_stops_every_time(hook):
    make_trainer().fit(iris(), epochs=3, batch_size=32, callbacks=[Breakpoint("on_epoch_end")])
    assert [h["epoch"] for h in hook] == [1, 2, 3]


def test_changes_made_in_the_debugger_take_effect(monkeypatch):
    def zero_the_loss(*args, **kwargs):
        ctx = sys._getframe(1).f_locals["ctx"]
        ctx.loss = ctx.loss * 0  # what a user types at the (Pdb) prompt

    monkeypatch.setattr(sys, "breakpointhook", zero_the_loss)
    trainer = make_trainer()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(iris(), epochs=1, batch_size=32, callbacks=[Breakpoint("on_train_batch_after_loss")])
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_non_finite_loss_example(hook):
    def poison(ctx):
        if ctx.iter == 3:
            ctx.loss = ctx.loss * float("nan")
            ctx.skip_batch()  # keep the parameters finite: only this batch is non-finite

    spoiler = corolux.callback("spoiler", on_train_batch_after_loss=lambda self, ctx: poison(ctx))()
    bp = Breakpoint("on_train_batch_after_loss", when=lambda ctx: not torch.isfinite(ctx.loss))
    make_trainer().fit(iris(), epochs=1, batch_size=32, callbacks=[spoiler, bp])
    assert [h["iter"] for h in hook] == [3]


def test_pythonbreakpoint_0_disables_it(monkeypatch, capsys):
    monkeypatch.setattr(sys, "breakpointhook", sys.__breakpointhook__)
    monkeypatch.setenv("PYTHONBREAKPOINT", "0")
    bp = Breakpoint("on_train_batch_end")
    make_trainer().fit(iris(), epochs=1, batch_size=32, callbacks=[bp])
    assert bp.hits == 5 and "corolux Breakpoint" not in capsys.readouterr().out


def test_custom_stage(hook):
    class Custom(corolux.Trainer):
        stages = ("on_generator_after_loss",)

        def train_step(self, ctx):
            ctx.pred = ctx.model(ctx.input)
            ctx.loss = ctx.loss_fn(ctx.pred, ctx.target)
            yield "on_generator_after_loss"
            ctx.backward(ctx.loss)
            yield "on_train_batch_before_step"
            ctx.step_optimizer()
            yield "on_train_batch_after_step"

    bp = Breakpoint("on_generator_after_loss", when=lambda ctx: ctx.iter == 4)
    make_trainer(Custom).fit(iris(), epochs=1, batch_size=32, callbacks=[bp])
    assert [(h["stage"], h["iter"]) for h in hook] == [("on_generator_after_loss", 4)]


def test_unknown_stage_is_rejected_when_handed_to_the_trainer():
    bp = Breakpoint("on_train_batch_ned")  # could be a custom stage: the trainer knows
    with pytest.raises(ValueError, match="did you mean 'on_train_batch_end'"):
        make_trainer().run(iris(), epochs=1, callbacks=[bp])


@pytest.mark.parametrize("stage", ["train_batch_end", "on train", ""])
def test_what_is_not_a_stage_name_is_rejected_at_construction(stage):
    with pytest.raises(ValueError, match="not a stage name"):
        Breakpoint(stage)


def test_bad_types():
    with pytest.raises(TypeError, match="stage name"):
        Breakpoint(3)
    with pytest.raises(TypeError, match="predicate"):
        Breakpoint("on_epoch_end", when=True)


def test_is_a_plain_callback_listening_to_its_stage_only():
    a = Breakpoint("on_train_batch_after_loss")
    b = Breakpoint(corolux.Stage.on_epoch_end, when=lambda ctx: True)
    assert type(a) is Breakpoint and type(b) is Breakpoint and isinstance(a, corolux.Callback)
    assert list(handlers_of(a)) == ["on_train_batch_after_loss"]
    assert list(handlers_of(b)) == ["on_epoch_end"]
    assert Breakpoint not in DEFAULTS
    assert repr(a) == "Breakpoint('on_train_batch_after_loss')"
    assert repr(b) == "Breakpoint('on_epoch_end', when=<lambda>)"
    c = copy.deepcopy(b)
    assert type(c) is Breakpoint and c.when is b.when and c.stage == "on_epoch_end"
    assert list(handlers_of(c)) == ["on_epoch_end"] and handlers_of(c)["on_epoch_end"].__self__ is c


def test_two_breakpoints_at_different_stages_each_stop_at_their_own():
    hits: list[tuple[str, int]] = []
    hook = sys.breakpointhook
    sys.breakpointhook = lambda *a, **k: None
    try:
        a = Breakpoint("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 2)
        b = Breakpoint("on_epoch_end")
        make_trainer().fit(iris(), epochs=2, batch_size=50, callbacks=[a, b])
    finally:
        sys.breakpointhook = hook
    hits.extend([("a", a.hits), ("b", b.hits)])
    assert hits == [("a", 2), ("b", 2)]


SCRIPT = """
import torch, corolux
from corolux.callbacks import Breakpoint

torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randn(64, 1)
model = torch.nn.Linear(4, 1)
trainer = corolux.Trainer(model, loss_fn=torch.nn.functional.mse_loss, device="cpu",
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
history = trainer.fit((x, y), epochs=2, batch_size=16,
                      callbacks=[Breakpoint("on_train_batch_after_loss", when=lambda ctx: ctx.iter == 3)])
print("FIT DONE", len(history))
"""


def test_drives_a_real_pdb(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, TERM="dumb", PYTHONIOENCODING="utf-8")
    env.pop("PYTHONBREAKPOINT", None)
    child = pexpect.spawn(
        sys.executable, [str(script)], env=env, cwd=str(tmp_path), encoding="utf-8", timeout=30
    )
    try:
        child.expect_exact("corolux Breakpoint at epoch 1/2 · train · batch 3/4 · on_train_batch_after_loss")
        child.expect_exact("(Pdb) ")
        child.sendline("p ctx.iter")
        child.expect(r"\r?\n3\r?\n")
        child.expect_exact("(Pdb) ")
        child.sendline("p (ctx.epoch, str(ctx.stage))")
        child.expect_exact("(1, 'on_train_batch_after_loss')")
        child.expect_exact("(Pdb) ")
        child.sendline("c")
        child.expect_exact("corolux Breakpoint at epoch 2/2")  # it stops again next epoch
        child.expect_exact("(Pdb) ")
        child.sendline("p ctx.epoch * 100 + ctx.iter")
        child.expect(r"\r?\n203\r?\n")
        child.expect_exact("(Pdb) ")
        child.sendline("c")
        child.expect_exact("FIT DONE 2")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
