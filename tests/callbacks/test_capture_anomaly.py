"""CaptureAnomaly and Stepper.from_capture: a non-finite loss (or gradients) under fit() is
captured with the batch's starting state, training stops there, and the capture replays the
same non-finite value at the same epoch and batch, in a new process; the errors."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from capture_child import Seen, loader, make_trainer, seen
from realdata import digits

import corolux
from corolux import Stepper
from corolux.callbacks import CaptureAnomaly
from corolux.checkpoint import CheckpointError

F = torch.nn.functional
CHILD = pathlib.Path(__file__).resolve().parents[1] / "capture_child.py"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> tuple[pathlib.Path, corolux.Trainer, corolux.History, list[str]]:
    """The poisoned run of tests/capture_child.py under fit(), with CaptureAnomaly."""
    path = tmp_path_factory.mktemp("capture") / "anomaly.pt"
    trainer, recorder = make_trainer(), Seen()
    with pytest.warns(
        RuntimeWarning, match=r"CaptureAnomaly: the training loss is nan at epoch 3, batch 8/10"
    ):
        history = trainer.fit(loader(), epochs=5, callbacks=[CaptureAnomaly(path), recorder])
    return path, trainer, history, recorder.lines


def test_training_stops_at_the_first_non_finite_loss_without_stepping_on_it(captured):
    path, trainer, history, lines = captured
    assert history.stop_reason == "anomaly" and len(history) == 3 and history.completed_epochs == 2
    assert lines[-1].startswith("seen 3 8 nan ") and all(" nan " not in line for line in lines[:-1])
    state = torch.load(path, weights_only=True)  # plain tensors and values: nothing runs
    info = state["capture"]
    assert (info["epoch"], info["iter"], info["num_batches"], info["check"]) == (3, 8, 10, "loss")
    assert info["value"] == "nan" and info["stage"] == "on_train_batch_after_loss"
    x, y = info["batch"]
    assert x.shape == (32, 64) and (x == 1e38).all(dim=1).sum() == 1  # the poisoned sample is in it
    # No step was taken on the batch: the weights saved are its starting weights, the ones left.
    saved = state["model"]
    assert all(torch.equal(saved[k], v) for k, v in trainer.model.state_dict().items())


def test_the_capture_replays_the_same_nan_in_a_new_process(captured):
    path, _, _, lines = captured
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    done = subprocess.run(
        [sys.executable, str(CHILD), "replay", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0].startswith(
        f"replaying {str(path)!r}: epoch 3 (of 5), batch 8/10, where the training loss was nan"
    )
    assert out[1] == lines[-1]  # same epoch, batch, NaN, and the same dropout masks on the rest


def test_from_capture_restores_the_batchs_start_and_can_rewind(captured, capsys):
    path, trainer, _, lines = captured
    s = Stepper.from_capture(make_trainer(), path)
    assert s.where() == "epoch 3/3 · train · batch 8/10 · on_train_batch_begin"  # the run ends there
    assert s.ctx.step == 27 and len(s.ctx.history) == 2  # 2 epochs of 10 batches, then 7
    assert all(
        torch.equal(a, b) for a, b in zip(s.ctx.model.parameters(), trainer.model.parameters(), strict=True)
    )
    assert seen(s.until("on_train_batch_after_loss").ctx) == lines[-1]
    s.rewind()
    s.ctx.input = s.ctx.input.clamp(max=1.0)  # the fix: the loss is finite now
    assert torch.isfinite(s.until("on_train_batch_after_loss").ctx.loss)
    history = s.finish()
    assert len(history) == 3 and history.stop_reason is None  # the replay ends with its batch's epoch


def test_a_capture_is_not_a_checkpoint_to_resume_from(captured):
    path = captured[0]
    trainer = make_trainer()
    with pytest.raises(CheckpointError, match=r"anomaly capture.*Stepper\.from_capture\(trainer"):
        trainer.fit(loader(), epochs=5, resume_from=path)
    trainer.load_checkpoint(path)  # its weights load: the failing batch's starting weights


def test_from_capture_refuses_what_is_not_a_capture(tmp_path, captured):
    trainer = make_trainer()
    trainer.fit(loader(), epochs=1)
    checkpoint = trainer.save_checkpoint(tmp_path / "ckpt.pt")
    with pytest.raises(
        CheckpointError, match=r"a corolux checkpoint, not an anomaly capture.*CaptureAnomaly"
    ):
        Stepper.from_capture(trainer, checkpoint)
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(
        CheckpointError, match=r"from_capture: .*not a corolux checkpoint.*CaptureAnomaly wrote"
    ):
        Stepper.from_capture(trainer, tmp_path / "plain.pt")
    other = corolux.Trainer(
        torch.nn.Linear(64, 10),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
    )
    with pytest.raises(CheckpointError, match="another model"):
        Stepper.from_capture(other, captured[0])
    other.fit(loader(), epochs=1)  # the refused replay's run was closed


def test_finite_training_is_unchanged(tmp_path):
    def run(callbacks):
        trainer = make_trainer()
        x, y = digits()
        history = trainer.fit((x[:256], y[:256]), epochs=2, callbacks=callbacks)
        return history, [p.detach().clone() for p in trainer.model.parameters()]

    (h1, w1), (h2, w2) = run([]), run([CaptureAnomaly(tmp_path / "never.pt")])
    assert h1.to_dict() == h2.to_dict() and all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))
    assert h2.stop_reason is None and not (tmp_path / "never.pt").exists()


class Sqrt0(corolux.Callback):
    """At epoch 1, batch 3, adds sqrt(0) (times 0) to the loss: the loss stays finite, its
    gradient is infinite (d sqrt(u)/du at 0) and makes every gradient NaN."""

    def on_train_batch_after_loss(self, ctx):
        if (ctx.epoch, ctx.iter) == (1, 3):
            zero = ctx.pred.sum() - ctx.pred.sum().detach()
            ctx.loss = ctx.loss + 0 * torch.sqrt(zero)


def test_non_finite_gradients_are_captured_at_before_step(tmp_path):
    path = tmp_path / "grads.pt"
    trainer = make_trainer()
    with pytest.warns(
        RuntimeWarning, match=r"the gradients of 0\.weight, 0\.bias, 3\.weight and 1 more are not fin"
    ):
        history = trainer.fit(loader(), epochs=2, callbacks=[Sqrt0(), CaptureAnomaly(path, check="grads")])
    assert history.stop_reason == "anomaly" and trainer.model[0].weight.grad is None  # dropped, not stepped
    s = Stepper.from_capture(make_trainer(), path, callbacks=[Sqrt0()])
    event = s.until("on_train_batch_before_step")
    assert (event.ctx.epoch, event.ctx.iter) == (1, 3) and torch.isfinite(event.ctx.loss)
    assert not torch.isfinite(event.ctx.model[0].weight.grad).all()
    s.close()


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="'loss' or 'grads', got 'gradients'"):
        CaptureAnomaly(tmp_path / "a.pt", check="gradients")
    with pytest.raises(TypeError, match="path must be a file path"):
        CaptureAnomaly(3)
    trainer = make_trainer()
    with pytest.raises(FileNotFoundError, match="no folder .* create it first"):
        trainer.fit(loader(), epochs=1, callbacks=[CaptureAnomaly(tmp_path / "missing" / "a.pt")])
    with pytest.warns(UserWarning, match="16-mixed"):
        mixed = corolux.Trainer(
            torch.nn.Linear(64, 10),
            loss_fn=F.cross_entropy,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            device="cpu",
            precision="16-mixed",
            progress=False,
        )
    with pytest.raises(ValueError, match=r"check='grads'\) under precision='16-mixed'.*use check='loss'"):
        mixed.fit(loader(), epochs=1, callbacks=[CaptureAnomaly(tmp_path / "a.pt", check="grads")])
    linear = torch.nn.Linear(64, 10)
    two = corolux.Trainer(
        linear,
        loss_fn=F.cross_entropy,
        optimizer={"w": torch.optim.SGD([linear.weight], lr=0.1), "b": torch.optim.SGD([linear.bias])},
        device="cpu",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"2 optimizers \(w, b\).*supports one optimizer"):
        two.fit(loader(), epochs=1, callbacks=[CaptureAnomaly(tmp_path / "a.pt")])
