"""LRScheduler: built in setup on the run's optimizer, stepped at its stage (per epoch, per
optimizer step), ReduceLROnPlateau fed the monitored epoch value (not the last batch's loss),
no step on a step the GradScaler skipped, and its state resumed bit-identically from a kill."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from realdata import digits, iris

import corolux
from corolux.callbacks import AutoResume
from corolux.callbacks.lr_monitor import LRMonitor
from corolux.callbacks.lr_scheduler import LRScheduler

F = torch.nn.functional
nn = torch.nn
lr_scheduler = torch.optim.lr_scheduler


def iris_batches(size: int = 30) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, y = iris()
    perm = torch.randperm(len(x), generator=g)  # iris is sorted by class: mix it once
    x, y = x[perm], y[perm]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def make_trainer(lr: float = 0.1, **kwargs: Any) -> corolux.Trainer:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9))
    return corolux.Trainer(nn.Linear(4, 3), loss_fn=F.cross_entropy, device="cpu", progress=False, **kwargs)


def lr_of(trainer: corolux.Trainer, name: str = "opt") -> float:
    return trainer.optimizers[name].param_groups[0]["lr"]


def same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


class Spy(corolux.Callback):
    """Records the LR each training batch used and the scheduler's step calls."""

    weight = 10

    def __init__(self) -> None:
        self.batch_lrs: list[float] = []

    def on_train_batch_begin(self, ctx: Any) -> None:
        self.batch_lrs.append(ctx.opt.param_groups[0]["lr"])


# -- epoch schedules ----------------------------------------------------------------------------


def test_steplr_steps_once_per_epoch_and_trains_as_a_hand_loop():
    data = iris_batches()
    spy = Spy()
    t = make_trainer()
    sched = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    t.fit(data, epochs=5, callbacks=[sched, spy])

    assert sched.scheduler.last_epoch == 5
    assert lr_of(t) == 0.1 * 0.5**2
    per_epoch = [spy.batch_lrs[i * len(data)] for i in range(5)]
    assert per_epoch == [0.1, 0.1, 0.05, 0.05, 0.025]

    torch.manual_seed(0)
    hand = nn.Linear(4, 3)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1, momentum=0.9)
    hand_sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        for x, y in data:
            F.cross_entropy(hand(x), y).backward()
            opt.step()
            opt.zero_grad()
        hand_sched.step()
    assert same(hand, t.model)


def test_each_fit_builds_a_fresh_scheduler_on_the_live_optimizer():
    t = make_trainer()
    sched = LRScheduler(lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.5))
    t.fit(iris_batches(), epochs=2, callbacks=[sched])
    first = sched.scheduler
    assert first.optimizer is t.optimizers["opt"] and first.last_epoch == 2
    t.fit(iris_batches(), epochs=1, callbacks=[sched])
    assert sched.scheduler is not first and sched.scheduler.last_epoch == 1


def test_an_epoch_cut_short_does_not_step():
    class StopMidEpoch(corolux.Callback):
        def on_train_batch_end(self, ctx: Any) -> None:
            if ctx.epoch == 2 and ctx.iter == 2:
                ctx.stop_training()

    sched = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    t = make_trainer()
    t.fit(iris_batches(), epochs=4, callbacks=[sched, StopMidEpoch()])
    assert sched.scheduler.last_epoch == 1  # epoch 1 only: epoch 2 ran 2 of its 5 batches
    assert lr_of(t) == 0.05


def test_evaluate_and_predict_build_no_scheduler():
    t = make_trainer()
    sched = LRScheduler(lambda opt: lr_scheduler.LambdaLR(opt, lambda k: 0.01))
    t.evaluate(iris_batches(), callbacks=[sched])
    assert sched.scheduler is None and lr_of(t) == 0.1


# -- ReduceLROnPlateau: the monitored epoch value -----------------------------------------------


class RecordingPlateau(lr_scheduler.ReduceLROnPlateau):
    def __init__(self, opt: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(opt, **kwargs)
        self.values: list[float] = []

    def step(self, metrics: Any, epoch: Any = None) -> None:  # type: ignore[override]
        self.values.append(metrics)
        super().step(metrics)


def test_plateau_gets_the_epoch_valid_loss_not_the_last_batch_loss():
    last_batch_loss: list[float] = []

    class LastLoss(corolux.Callback):
        def on_valid_batch_after_loss(self, ctx: Any) -> None:
            if ctx.is_last_batch:
                last_batch_loss.append(float(ctx.loss))

    x, y = digits()
    valid = [(x[1000:1300], y[1000:1300]), (x[1300:1310], y[1300:1310])]  # a tiny last batch
    sched = LRScheduler(lambda opt: RecordingPlateau(opt, patience=0, factor=0.5))  # monitor: valid_loss
    torch.manual_seed(0)
    t = corolux.Trainer(
        nn.Linear(64, 10),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        device="cpu",
        progress=False,
    )
    history = t.fit((x[:600], y[:600]), epochs=4, valid_data=valid, callbacks=[sched, LastLoss()])
    assert sched.scheduler.values == history["valid_loss"]
    assert all(v != b for v, b in zip(sched.scheduler.values, last_batch_loss, strict=True))


def test_plateau_reduces_on_a_stalled_monitor_and_follows_its_mode():
    class FakeAcc(corolux.Callback):  # a metric that stalls after epoch 2
        def on_train_end(self, ctx: Any) -> None:
            ctx.log("score", [0.5, 0.6, 0.6, 0.6, 0.6][ctx.epoch - 1])

    sched = LRScheduler(
        lambda opt: lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=1, factor=0.1), monitor="score"
    )
    spy = Spy()
    t = make_trainer()
    t.fit(iris_batches(), epochs=5, callbacks=[FakeAcc(), sched, spy])
    per_epoch = [spy.batch_lrs[i * 5] for i in range(5)]
    # epoch 3 and 4 do not improve on 0.6: reduced after epoch 4 (patience 1)
    assert per_epoch == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])


def test_plateau_does_not_step_when_the_monitored_value_was_not_produced():
    class SkipValidation(corolux.Callback):
        def on_epoch_begin(self, ctx: Any) -> None:
            if ctx.epoch in (2, 3):
                ctx.skip_validation()

    sched = LRScheduler(lambda opt: RecordingPlateau(opt, patience=0))
    t = make_trainer()
    history = t.fit(iris(), epochs=4, valid_data=0.2, callbacks=[SkipValidation(), sched])
    assert math.isnan(history["valid_loss"][1]) and math.isnan(history["valid_loss"][2])
    assert sched.scheduler.values == [history["valid_loss"][0], history["valid_loss"][3]]
    assert sched.scheduler.last_epoch == 2


def test_plateau_monitors_valid_loss_by_default_and_needs_validation_data():
    sched = LRScheduler(lambda opt: lr_scheduler.ReduceLROnPlateau(opt))
    t = make_trainer()
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(ValueError, match=r"monitors 'valid_loss'.*no validation data.*monitor='train_loss'"):
        t.fit(iris_batches(), epochs=2, callbacks=[sched])
    assert all(
        torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True)
    )  # before training
    sched = LRScheduler(lambda opt: RecordingPlateau(opt), monitor="train_loss")
    history = t.fit(iris_batches(), epochs=2, callbacks=[sched])
    assert sched.scheduler.values == history["train_loss"]


def test_an_unknown_monitor_is_refused_with_the_names_the_run_records():
    sched = LRScheduler(lambda opt: lr_scheduler.ReduceLROnPlateau(opt), monitor="val_loss")
    with pytest.raises(
        ValueError, match=r"unknown monitor 'val_loss'; did you mean 'valid_loss'\?.*train_loss"
    ):
        make_trainer().fit(iris(), epochs=2, valid_data=0.2, callbacks=[sched])


def test_monitor_with_a_scheduler_that_takes_no_metric_is_refused():
    sched = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, 1), monitor="valid_loss")
    with pytest.raises(ValueError, match=r"StepLR.step\(\) takes no metric.*drop monitor="):
        make_trainer().fit(iris(), epochs=1, valid_data=0.2, callbacks=[sched])


def test_a_metric_schedule_at_another_stage_is_refused():
    sched = LRScheduler(lambda opt: lr_scheduler.ReduceLROnPlateau(opt), call_on="on_train_end")
    with pytest.raises(ValueError, match=r"known at on_epoch_end, not at call_on='on_train_end'"):
        make_trainer().fit(iris(), epochs=1, valid_data=0.2, callbacks=[sched])


# -- per-step schedules -------------------------------------------------------------------------


def test_onecycle_steps_once_per_optimizer_step():
    data = iris_batches()
    t = make_trainer()
    sched = LRScheduler(
        lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=15),
        call_on="on_train_batch_after_step",
    )
    spy = Spy()
    t.fit(data, epochs=3, callbacks=[sched, spy])
    assert sched.scheduler.last_epoch == 15 == len(spy.batch_lrs)
    reference = lr_scheduler.OneCycleLR(
        torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0.5, total_steps=15
    )
    expected = []
    for _ in range(15):
        expected.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    assert spy.batch_lrs == expected


def test_no_step_when_the_gradscaler_skipped_the_optimizer_step():
    skipped: list[bool] = []

    class Overflow(corolux.Callback):  # an inf loss at batch 2: inf gradients, the scaler skips
        def on_train_batch_after_loss(self, ctx: Any) -> None:
            if ctx.iter == 2:
                ctx.loss = ctx.loss * math.inf

        def on_train_batch_after_step(self, ctx: Any) -> None:
            skipped.append(ctx.step_skipped)

    sched = LRScheduler(
        lambda opt: lr_scheduler.LambdaLR(opt, lambda k: 0.9**k), call_on="on_train_batch_after_step"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 16-mixed on the CPU
        t = make_trainer(precision="16-mixed")
        t.fit(iris_batches(), epochs=2, callbacks=[Overflow(), sched])
    assert len(skipped) == 10 and skipped.count(True) >= 2  # batch 2 of each epoch at least
    taken = skipped.count(False)
    assert sched.scheduler.last_epoch == taken
    assert lr_of(t) == pytest.approx(0.1 * 0.9**taken, rel=1e-12)


def test_with_several_optimizers_it_schedules_the_named_one_once_per_batch():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    def make() -> corolux.Trainer:
        torch.manual_seed(0)
        sgd = lambda p: torch.optim.SGD(p, lr=0.1)  # noqa: E731
        return corolux.Trainer(
            Two(), loss_fn=F.cross_entropy, optimizer={"a": sgd, "b": sgd}, device="cpu", progress=False
        )

    def factory(opt):
        return lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)

    with pytest.raises(ValueError, match=r"2 optimizers \['a', 'b'\]; say which one.*opt_name='a'"):
        make().fit(iris_batches(), epochs=1, callbacks=[LRScheduler(factory)])
    with pytest.raises(ValueError, match=r"opt_name='bb' is not one of .*\['a', 'b'\]; did you mean 'b'\?"):
        make().fit(iris_batches(), epochs=1, callbacks=[LRScheduler(factory, opt_name="bb")])

    t = make()
    sched = LRScheduler(factory, call_on="on_train_batch_after_step", opt_name="b")
    t.fit(iris_batches(), epochs=1, callbacks=[sched])
    assert sched.scheduler.optimizer is t.optimizers["b"]
    assert sched.scheduler.last_epoch == 5  # 5 batches, not 10 after_step events
    assert lr_of(t, "b") == 0.5**5 * 0.1 and lr_of(t, "a") == 0.1


# -- arguments ----------------------------------------------------------------------------------


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"call_on='epoch_end' is not a stage name; did you mean 'on_epoch_end'\?"
    ):
        LRScheduler(lambda opt: None, call_on="epoch_end")
    with pytest.raises(TypeError, match=r"call_on must be a stage name"):
        LRScheduler(lambda opt: None, call_on=3)  # type: ignore[arg-type]
    built = lr_scheduler.StepLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 1)
    with pytest.raises(TypeError, match=r"must be a function that builds the scheduler.*lambda opt"):
        LRScheduler(built)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"opt_name must be"):
        LRScheduler(lambda opt: None, opt_name=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"monitor must be"):
        LRScheduler(lambda opt: None, monitor=["valid_loss"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"returned 0\.5, which has no step\(\)"):
        make_trainer().fit(iris_batches(), epochs=1, callbacks=[LRScheduler(lambda opt: 0.5)])


def test_a_misspelt_stage_fails_at_fit_before_training_with_a_suggestion():
    sched = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, 1), call_on="on_epoch_ned")
    t = make_trainer()
    before = [p.detach().clone() for p in t.model.parameters()]
    with pytest.raises(ValueError, match=r"on_epoch_ned.*did you mean 'on_epoch_end'\?"):
        t.fit(iris_batches(), epochs=1, callbacks=[sched])
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters(), strict=True))


# -- checkpoints --------------------------------------------------------------------------------


def test_the_checkpoint_holds_the_scheduler_state(tmp_path):
    t = make_trainer()
    sched = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    t.fit(iris_batches(), epochs=3, callbacks=[sched])
    t.save_checkpoint(tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["callbacks"]["LRScheduler[|on_epoch_end]"]["scheduler"]["last_epoch"] == 3
    other = LRScheduler(lambda opt: lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    t.fit(iris_batches(), epochs=4, callbacks=[other], resume_from=tmp_path / "c.pt")
    assert other.scheduler.last_epoch == 4 and lr_of(t) == 0.1 * 0.5**4


class Kill(corolux.Callback):
    """Kills the process (as a job scheduler would) at a batch of epoch 3."""

    def on_train_batch_begin(self, ctx: Any) -> None:
        if ctx.epoch == 3 and ctx.iter == 4:
            raise SystemExit(137)


class IgnoreState(LRScheduler):
    state_key = "LRScheduler"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize(
    ("kind", "every_n_steps"),
    [("epoch", None), ("per_step", None), ("per_step", 2)],
    ids=["steplr_epoch_checkpoints", "onecycle_epoch_checkpoints", "onecycle_mid_epoch_checkpoints"],
)
def test_a_killed_run_resumes_the_schedule_bit_identically(tmp_path, kind, every_n_steps):
    def scheduler(cls: type[LRScheduler] = LRScheduler) -> LRScheduler:
        if kind == "epoch":
            return cls(lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.3))
        return cls(
            lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=25),
            call_on="on_train_batch_after_step",
        )

    data = iris()  # shuffled each epoch from torch's RNG, which the checkpoint carries
    epochs = 5
    whole = make_trainer()
    whole_history = whole.fit(data, epochs=epochs, batch_size=32, callbacks=[scheduler(), LRMonitor()])

    path = tmp_path / "state.pt"

    def run(*extra: Any, cls: type[LRScheduler] = LRScheduler) -> tuple[corolux.Trainer, Any]:
        t = make_trainer()
        cbs = [scheduler(cls), LRMonitor(), AutoResume(path, every_n_steps=every_n_steps), *extra]
        return t, t.fit(data, epochs=epochs, batch_size=32, callbacks=cbs)

    with pytest.raises(SystemExit):
        run(Kill())
    assert path.exists()
    resumed, history = run()
    assert lr_of(resumed) == lr_of(whole)
    assert same(resumed.model, whole.model)
    assert history.to_dict() == whole_history.to_dict()
    assert not path.exists()

    # Teeth: a resume that dropped the scheduler's state ends elsewhere.
    with pytest.raises(SystemExit):
        run(Kill())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OneCycleLR past its total steps
        ignored, ignored_history = run(cls=IgnoreState)
    assert ignored_history["lr"] != whole_history["lr"]
    assert not same(ignored.model, whole.model)
