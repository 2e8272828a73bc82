"""Trainer: construction and its errors, fit/run/evaluate/predict, custom steps, several
optimizers, seeds. Real training on scikit-learn's bundled digits and iris (no mocks)."""

from __future__ import annotations

import copy
import math
import types
import warnings

import pytest
import torch
from realdata import digits, iris
from strategies import GanToy, backward_and_step, hand_sgd_step

import corolux
from corolux import Stage
from corolux.metrics import Accuracy

F = torch.nn.functional


# -- data and models ---------------------------------------------------------------------------


def digits_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): 1497 / 300 real digits."""
    x, y = digits()
    return (x[300:], y[300:]), (x[:300], y[:300])


def mlp(n_in: int = 64, n_out: int = 10, hidden: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def sgd(lr: float = 0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def make_trainer(model: torch.nn.Module | None = None, **kwargs) -> corolux.Trainer:
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", sgd())
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return corolux.Trainer(model if model is not None else mlp(4, 3, 16), **kwargs)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Recorder(corolux.Callback):
    """Calls ``fn(stage, ctx)`` at the given stages."""

    def __init__(self, fn, *stages: str, weight: float = 0) -> None:
        self.fn = fn
        self.stages = frozenset(stages)
        self.weight = weight

    def _on(self, stage: str, ctx) -> None:
        if stage in self.stages:
            self.fn(stage, ctx)


for _stage in Stage:
    setattr(Recorder, _stage.value, lambda self, ctx, _s=_stage.value: self._on(_s, ctx))
del _stage


# -- construction and its errors ---------------------------------------------------------------


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=r"model.*torch\.nn\.Module"):
        corolux.Trainer(lambda x: x, loss_fn=F.mse_loss, optimizer=sgd())


@pytest.mark.parametrize("bad", [0.1, "adam", [1, 2]])
def test_optimizer_of_the_wrong_kind_is_a_type_error_naming_argument_and_fix(bad):
    with pytest.raises(TypeError) as info:
        corolux.Trainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=bad, progress=False)
    message = str(info.value)
    assert "optimizer" in message
    assert "Optimizer" in message and "factory" in message  # says what to pass instead


def test_optimizer_class_instead_of_factory_shows_the_lambda_fix():
    with pytest.raises(TypeError, match=r"optimizer.*lambda"):
        corolux.Trainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=torch.optim.SGD)


def test_optimizer_instance_and_factory_are_accepted():
    model = mlp(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = corolux.Trainer(model, loss_fn=F.cross_entropy, optimizer=opt, device="cpu")
    assert list(trainer.optimizers.values()) == [opt]
    trainer = corolux.Trainer(model, loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu")
    (built,) = trainer.optimizers.values()
    assert isinstance(built, torch.optim.SGD)
    got = {id(p) for g in built.param_groups for p in g["params"]}
    assert got == {id(p) for p in model.parameters()}


def test_dict_of_factories_gets_each_submodules_parameters():
    model = GanToy()
    trainer = corolux.Trainer(
        model,
        loss_fn=F.mse_loss,
        device="cpu",
        optimizer={"gen": sgd(), "disc": lambda p: torch.optim.Adam(p, lr=1e-3)},
    )
    assert list(trainer.optimizers) == ["gen", "disc"]
    for name, opt in trainer.optimizers.items():
        got = {id(p) for g in opt.param_groups for p in g["params"]}
        assert got == {id(p) for p in model.get_submodule(name).parameters()}
    assert isinstance(trainer.optimizers["disc"], torch.optim.Adam)


def test_dict_factory_without_such_submodule_is_a_clear_error():
    with pytest.raises((ValueError, TypeError, KeyError)) as info:
        corolux.Trainer(GanToy(), loss_fn=F.mse_loss, optimizer={"generator": sgd(), "disc": sgd()})
    message = str(info.value)
    assert "generator" in message
    assert "gen" in message.replace("generator", "")  # names the submodules (or suggests one)


def test_dict_may_mix_an_optimizer_instance():
    model = GanToy()
    disc_opt = torch.optim.SGD(model.disc.parameters(), lr=0.1)
    trainer = corolux.Trainer(model, loss_fn=F.mse_loss, optimizer={"gen": sgd(), "disc": disc_opt})
    assert trainer.optimizers["disc"] is disc_opt


@pytest.mark.parametrize("epochs", [0, -1])
def test_epochs_below_one_is_a_value_error(epochs):
    with pytest.raises(ValueError, match="epochs"):
        make_trainer().fit(iris(), epochs=epochs)


@pytest.mark.parametrize("epochs", [(3, 2), (1, 0), (-1, 2)])
def test_bad_epochs_range_is_a_value_error(epochs):
    with pytest.raises(ValueError, match="epochs"):
        make_trainer().fit(iris(), epochs=epochs)


@pytest.mark.parametrize("epochs", [(1, 2, 3), "3", 2.0, (1.0, 2), None])
def test_malformed_epochs_is_rejected(epochs):
    with pytest.raises((TypeError, ValueError), match="epochs"):
        make_trainer().fit(iris(), epochs=epochs)


def test_bad_arguments_are_rejected_before_the_first_event():
    trainer = make_trainer()
    with pytest.raises(ValueError):
        trainer.run(iris(), epochs=0)  # no next(): checked when run() is called


@pytest.mark.parametrize("max_steps", [3, 7])
def test_max_steps_stops_after_that_many_optimizer_steps(max_steps):
    seen = {}
    model = mlp(4, 3)
    trainer = make_trainer(model)
    x, y = iris()
    history = trainer.fit(
        (x, y),
        epochs=10,
        batch_size=32,
        max_steps=max_steps,
        callbacks=[
            Recorder(
                lambda s, ctx: seen.update(step=ctx.step, reason=ctx.stop_reason, epoch=ctx.epoch),
                "on_fit_end",
            )
        ],
    )
    assert seen["step"] == max_steps
    assert seen["epoch"] == math.ceil(max_steps / 5)  # 150 samples: 5 batches an epoch
    assert len(history["train_loss"]) == seen["epoch"]


@pytest.mark.parametrize("max_steps", [0, -2, 1.5])
def test_bad_max_steps_is_rejected(max_steps):
    with pytest.raises((ValueError, TypeError), match="max_steps"):
        make_trainer().fit(iris(), max_steps=max_steps)


def test_device_auto_and_cpu():
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu")
    )
    assert make_trainer(device="auto").device.type == expected
    model = mlp(4, 3)
    trainer = make_trainer(model, device="cpu")
    assert trainer.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    devices = []
    trainer.fit(iris(), callbacks=[Recorder(lambda s, ctx: devices.append(ctx.device), "on_fit_begin")])
    assert devices == [torch.device("cpu")]


def test_device_default_is_auto():
    trainer = corolux.Trainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=sgd(), progress=False)
    assert trainer.device == make_trainer(device="auto").device


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_precision_trains_on_cpu(precision):
    torch.manual_seed(0)
    model = mlp(4, 3, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(model, precision=precision, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    cpu_warnings = [w for w in caught if "bf16-mixed is the CPU's mixed precision" in str(w.message)]
    assert len(cpu_warnings) == (1 if precision == "16-mixed" else 0)
    scalers = []
    history = trainer.fit(
        iris(),
        epochs=8,
        batch_size=16,
        callbacks=[Recorder(lambda s, ctx: scalers.append(ctx.scaler), "on_fit_begin")],
    )
    losses = history["train_loss"]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    if precision == "16-mixed":
        assert isinstance(scalers[0], torch.amp.GradScaler)
    else:
        assert scalers == [None]  # no GradScaler outside "16-mixed"


def test_bf16_mixed_runs_the_forward_under_autocast():
    dtypes = []
    model = mlp(4, 3)
    model[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    make_trainer(model, precision="bf16-mixed").fit(iris())
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("precision", ["fp16", "64", "16", "bf16", 32.5, ""])
def test_bad_precision_is_a_value_error(precision):
    with pytest.raises(ValueError, match="precision"):
        make_trainer(precision=precision)


# -- fit ---------------------------------------------------------------------------------------


def test_fit_learnsdigits():
    torch.manual_seed(0)
    (train_x, train_y), test = digits_split()
    model = mlp(64, 10, 64)
    trainer = corolux.Trainer(
        model,
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
        metrics=[Accuracy()],
        device="cpu",
        progress=False,
    )
    history = trainer.fit((train_x, train_y), epochs=4, valid_data=test, batch_size=64)
    assert isinstance(history, corolux.History)
    assert trainer.history is history
    losses = history["train_loss"]
    assert len(losses) == 4
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert history["valid_acc"][-1] > 0.85
    assert history.last("valid_acc") == history["valid_acc"][-1]
    assert trainer.evaluate(test)["acc"] > 0.85


def test_history_names_are_phase_underscore_metric():
    trainer = make_trainer(metrics=[Accuracy()])
    x, y = iris()
    history = trainer.fit((x, y), epochs=2, valid_data=(x[:30], y[:30]))
    assert set(history.to_dict()) == {"epoch", "train_loss", "train_acc", "valid_loss", "valid_acc"}
    assert history["epoch"] == [1, 2]
    for name in ("train_loss", "train_acc", "valid_loss", "valid_acc"):
        assert len(history[name]) == 2
        assert all(isinstance(v, float) for v in history[name])


def test_without_validation_there_are_no_valid_names():
    history = make_trainer(metrics=[Accuracy()]).fit(iris(), epochs=2)
    assert set(history.to_dict()) == {"epoch", "train_loss", "train_acc"}


def test_epochs_range_sets_min_and_max_epochs():
    seen = []
    history = make_trainer().fit(
        iris(),
        epochs=(2, 4),
        callbacks=[
            Recorder(
                lambda s, ctx: seen.append((ctx.min_epochs, ctx.max_epochs, ctx.epoch)), "on_epoch_begin"
            )
        ],
    )
    assert seen == [(2, 4, 1), (2, 4, 2), (2, 4, 3), (2, 4, 4)]
    assert len(history["train_loss"]) == 4


def test_int_epochs_sets_no_minimum():
    seen = []
    make_trainer().fit(
        iris(),
        epochs=3,
        callbacks=[Recorder(lambda s, ctx: seen.append((ctx.min_epochs, ctx.max_epochs)), "on_fit_begin")],
    )
    assert seen == [(0, 3)]  # DESIGN section 5: epochs=n means (0, n)


def test_counters_epoch_iter_step_completed():
    seen = []
    x, y = iris()
    make_trainer().fit(
        (x[:70], y[:70]),
        epochs=2,
        batch_size=32,
        valid_data=(x[70:90], y[70:90]),
        callbacks=[
            Recorder(
                lambda s, ctx: seen.append(
                    (s, ctx.epoch, ctx.iter, ctx.step, ctx.completed_epochs, ctx.training)
                ),
                "on_train_batch_end",
                "on_valid_batch_end",
                "on_epoch_end",
            )
        ],
    )
    assert seen == [
        ("on_train_batch_end", 1, 1, 1, 0, True),
        ("on_train_batch_end", 1, 2, 2, 0, True),
        ("on_train_batch_end", 1, 3, 3, 0, True),
        ("on_valid_batch_end", 1, 1, 3, 0, False),
        ("on_epoch_end", 1, 1, 3, 1, False),
        ("on_train_batch_end", 2, 1, 4, 1, True),
        ("on_train_batch_end", 2, 2, 5, 1, True),
        ("on_train_batch_end", 2, 3, 6, 1, True),
        ("on_valid_batch_end", 2, 1, 6, 1, False),
        ("on_epoch_end", 2, 1, 6, 2, False),
    ]


# -- run(): the event stream --------------------------------------------------------------------


TRAIN_BATCH = [
    "on_train_batch_begin",
    "on_train_batch_after_pred",
    "on_train_batch_after_loss",
    "on_train_batch_before_backward",
    "on_train_batch_before_step",
    "on_train_batch_after_step",
    "on_train_batch_end",
]
VALID_BATCH = [
    "on_valid_batch_begin",
    "on_valid_batch_after_pred",
    "on_valid_batch_after_loss",
    "on_valid_batch_end",
]


def expected_tree(epochs: int, train_batches: int, valid_batches: int) -> list[str]:
    out = ["on_fit_begin"]
    for _ in range(epochs):
        out += ["on_epoch_begin", "on_train_begin"]
        out += TRAIN_BATCH * train_batches
        out += ["on_train_end"]
        if valid_batches:
            out += ["on_valid_begin", *VALID_BATCH * valid_batches, "on_valid_end"]
        out += ["on_epoch_end"]
    return out + ["on_fit_end"]


def test_run_yields_the_full_tree_in_order():
    x, y = iris()
    trainer = make_trainer()
    events = list(trainer.run((x[:50], y[:50]), epochs=2, batch_size=25, valid_data=(x[50:60], y[50:60])))
    stages = [e.stage for e in events]
    assert stages == expected_tree(2, 2, 1)
    assert all(isinstance(e, corolux.Event) for e in events)
    assert all(isinstance(s, Stage) for s in stages)
    assert len({id(e.ctx) for e in events}) == 1  # one live ctx for the run


def test_run_without_validation_yields_no_valid_events():
    x, y = iris()
    stages = [e.stage for e in make_trainer().run((x[:40], y[:40]), epochs=1, batch_size=20)]
    assert stages == expected_tree(1, 2, 0)


def test_event_ctx_carries_the_contract_attributes():
    x, y = iris()
    model = mlp(4, 3)
    trainer = make_trainer(model, hparams={"lr": 0.1})
    for event in trainer.run((x, y), epochs=1):
        if event.stage == "on_train_batch_after_loss":
            ctx = event.ctx
            assert ctx.model is model
            assert ctx.optimizers == trainer.optimizers
            assert ctx.opt is trainer.optimizers[ctx.opt_name]
            assert ctx.loss_fn is F.cross_entropy
            assert ctx.training is True
            assert ctx.stage == "on_train_batch_after_loss"
            assert ctx.hparams == {"lr": 0.1}
            assert ctx.is_main_process is True
            assert ctx.loss.ndim == 0
            assert torch.equal(ctx.input, ctx.batch[0]) and torch.equal(ctx.target, ctx.batch[1])
            assert ctx.pred.shape == (ctx.input.shape[0], 3)
            assert ctx.skipped is False
            assert ctx.train_data is not None and ctx.valid_data is None
            assert isinstance(ctx.history, corolux.History)
            assert isinstance(ctx.metrics, dict)
            break


def test_zero_loss_means_no_parameter_moves():
    model = mlp(4, 3)
    before = params_of(model)
    trainer = make_trainer(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    n = 0
    for event in trainer.run(iris(), epochs=2):
        if event.stage == "on_train_batch_after_loss":
            event.ctx.loss = event.ctx.loss * 0
            n += 1
    assert n == 10
    assert same_params(before, params_of(model))


def test_control_zero_loss_lets_parameters_move():
    model = mlp(4, 3)
    before = params_of(model)
    for _ in make_trainer(model).run(iris(), epochs=1):
        pass
    assert not same_params(before, params_of(model))


def test_loss_assigned_by_a_callback_is_what_backward_uses():
    model = mlp(4, 3)
    before = params_of(model)

    class ZeroLoss(corolux.Callback):
        def on_train_batch_after_loss(self, ctx):
            ctx.loss = ctx.loss * 0

    make_trainer(model).fit(iris(), epochs=1, callbacks=[ZeroLoss()])
    assert same_params(before, params_of(model))


@pytest.mark.parametrize(
    "value, says", [(0.0, "got float 0.0"), (torch.zeros(3, requires_grad=True), "got shape (3,)")]
)
def test_a_bad_value_assigned_to_the_loss_is_named_with_the_stage(value, says):
    set_loss = Recorder(lambda stage, ctx: setattr(ctx, "loss", value), "on_train_batch_after_loss")
    with pytest.raises(ValueError, match="the loss must be a scalar tensor") as info:
        make_trainer().fit(iris(), callbacks=[set_loss])
    message = str(info.value)
    assert says in message and "'on_train_batch_before_backward'" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's error hidden


def test_a_bad_value_assigned_to_the_loss_in_validation_is_a_clear_error():
    set_loss = Recorder(lambda stage, ctx: setattr(ctx, "loss", 0.0), "on_valid_batch_after_loss")
    with pytest.raises(ValueError, match="the loss must be a scalar tensor, got float 0.0"):
        make_trainer().fit(iris(), valid_data=iris(), callbacks=[set_loss])


def test_assigned_input_is_what_the_model_sees():
    model = mlp(4, 3)
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    x, y = iris()
    for event in make_trainer(model).run((x[:10], y[:10]), epochs=1, batch_size=10):
        if event.stage == "on_train_batch_begin":
            event.ctx.input = torch.full_like(event.ctx.input, 7.0)
    assert len(seen) == 1
    assert torch.equal(seen[0], torch.full((10, 4), 7.0))


def test_assigned_target_is_what_the_loss_uses():
    x, y = iris()
    losses = []
    for event in make_trainer().run((x[:10], y[:10]), epochs=1, batch_size=10):
        ctx = event.ctx
        if event.stage == "on_train_batch_after_pred":
            ctx.target = torch.full_like(ctx.target, 2)
            expected = F.cross_entropy(ctx.pred.detach(), ctx.target)
        if event.stage == "on_train_batch_after_loss":
            losses.append((ctx.loss.detach(), expected))
    ((got, want),) = losses
    assert torch.allclose(got, want)


def test_assigned_target_changes_the_loss_against_the_original():
    x, y = iris()
    pairs = []
    for event in make_trainer().run((x[:10], y[:10]), epochs=1, batch_size=10):
        ctx = event.ctx
        if event.stage == "on_train_batch_after_pred":
            original = F.cross_entropy(ctx.pred.detach(), ctx.target)
            replaced = F.cross_entropy(ctx.pred.detach(), (ctx.target + 1) % 3)
            ctx.target = (ctx.target + 1) % 3
        if event.stage == "on_train_batch_after_loss":
            pairs.append((ctx.loss.item(), replaced.item(), original.item()))
    ((got, replaced, original),) = pairs
    assert got == pytest.approx(replaced)
    assert got != pytest.approx(original)


def test_assigned_pred_is_what_the_loss_uses():
    x, y = iris()
    losses = []
    for event in make_trainer().run((x[:10], y[:10]), epochs=1, batch_size=10):
        ctx = event.ctx
        if event.stage == "on_train_batch_after_pred":
            ctx.pred = ctx.pred * 0  # uniform logits: the loss is log(3)
        if event.stage == "on_train_batch_after_loss":
            losses.append(ctx.loss.item())
    assert losses == [pytest.approx(math.log(3))]


def test_assigned_pred_is_what_the_metrics_see():
    x, y = iris()

    class AlwaysClassZero(corolux.Callback):
        def on_valid_batch_after_pred(self, ctx):
            ctx.pred = torch.zeros_like(ctx.pred)
            ctx.pred[:, 0] = 1.0

    trainer = make_trainer(metrics=[Accuracy()])
    result = trainer.evaluate((x, y), callbacks=[AlwaysClassZero()])
    assert result["acc"] == pytest.approx((y == 0).float().mean().item())


# -- evaluate ----------------------------------------------------------------------------------


def test_evaluate_returns_floats_equal_to_the_epoch_valid_loss():
    x, y = iris()
    valid = (x[::3], y[::3])  # 50 samples: batches of 32 and 18
    trainer = make_trainer(metrics=[Accuracy()])
    history = trainer.fit((x, y), epochs=1, valid_data=valid)
    result = trainer.evaluate(valid)
    assert set(result) == {"loss", "acc"}
    assert all(type(v) is float for v in result.values())
    assert result["loss"] == pytest.approx(history["valid_loss"][-1], rel=1e-6)
    assert result["acc"] == pytest.approx(history["valid_acc"][-1])
    with torch.no_grad():
        logits = trainer.model(valid[0])
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, valid[1]).item(), rel=1e-5)
    assert result["acc"] == pytest.approx((logits.argmax(-1) == valid[1]).float().mean().item())


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_runs_in_eval_mode_and_restores_the_mode(training):
    model = mlp(4, 3)
    model.train(training)
    modes = []
    trainer = make_trainer(model)
    trainer.evaluate(
        iris(), callbacks=[Recorder(lambda s, ctx: modes.append(ctx.model.training), "on_valid_batch_begin")]
    )
    assert modes and not any(modes)
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def test_evaluate_restores_each_submodules_mode():
    """A frozen BatchNorm (eval inside a training model) stays frozen after evaluate()."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    model.train()
    model[1].eval()
    make_trainer(model).evaluate(iris())
    assert [m.training for m in model] == [True, False, True]
    assert model.training is True


def test_evaluate_yields_only_valid_events():
    x, y = iris()
    stages = [e.stage for e in make_trainer().run_evaluate((x[:40], y[:40]), batch_size=20)]
    assert stages == ["on_valid_begin", *VALID_BATCH * 2, "on_valid_end"]


def test_evaluate_does_not_change_parameters():
    model = mlp(4, 3)
    before = params_of(model)
    make_trainer(model).evaluate(iris())
    assert same_params(before, params_of(model))


def test_fit_restores_the_mode_it_found():
    model = mlp(4, 3)
    model.eval()
    make_trainer(model).fit(iris(), valid_data=iris())
    assert model.training is False


# -- predict -----------------------------------------------------------------------------------


def test_predict_concatenates_tensor_outputs_on_cpu():
    x, y = iris()
    model = mlp(4, 3)
    trainer = make_trainer(model)
    for data in (x, (x, y), [(x[:70],), (x[70:],)]):
        preds = trainer.predict(data)
        assert isinstance(preds, torch.Tensor)
        assert preds.device.type == "cpu"
        assert preds.shape == (150, 3)
        assert not preds.requires_grad
        with torch.no_grad():
            assert torch.allclose(preds, model(x), atol=1e-6)


class TwoHeads(torch.nn.Module):
    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 1)

    def forward(self, x):
        if self.as_dict:
            return {"logits": self.a(x), "score": self.b(x)}
        return self.a(x), self.b(x)


def test_predict_concatenates_tuple_outputs_leaf_by_leaf():
    x, _ = iris()
    model = TwoHeads(as_dict=False)
    preds = make_trainer(model).predict(x, batch_size=40)  # 4 batches, the last of 30
    assert isinstance(preds, tuple) and len(preds) == 2
    assert preds[0].shape == (150, 3) and preds[1].shape == (150, 1)
    with torch.no_grad():
        a, b = model(x)
    assert torch.allclose(preds[0], a, atol=1e-6) and torch.allclose(preds[1], b, atol=1e-6)


def test_predict_concatenates_dict_outputs_leaf_by_leaf():
    x, _ = iris()
    model = TwoHeads(as_dict=True)
    preds = make_trainer(model).predict(x, batch_size=40)
    assert isinstance(preds, dict) and set(preds) == {"logits", "score"}
    assert preds["logits"].shape == (150, 3) and preds["score"].shape == (150, 1)
    assert preds["logits"].device.type == "cpu"


def test_predict_yields_predict_events_in_eval_mode():
    x, _ = iris()
    model = mlp(4, 3)
    events = []
    for e in make_trainer(model).run_predict(x, batch_size=100):
        events.append((e.stage, e.ctx.model.training))
    assert [s for s, _ in events] == [
        "on_predict_begin",
        "on_predict_batch_begin",
        "on_predict_batch_after_pred",
        "on_predict_batch_end",
        "on_predict_batch_begin",
        "on_predict_batch_after_pred",
        "on_predict_batch_end",
        "on_predict_end",
    ]
    assert not any(training for _, training in events)
    assert model.training is True


def test_predict_without_optimizer_or_loss():
    x, _ = iris()
    trainer = corolux.Trainer(mlp(4, 3), device="cpu", progress=False)
    assert trainer.predict(x).shape == (150, 3)


def test_fit_without_optimizer_says_how_to_give_one():
    trainer = corolux.Trainer(mlp(4, 3), loss_fn=F.cross_entropy, device="cpu", progress=False)
    with pytest.raises((ValueError, TypeError), match="optimizer"):
        trainer.fit(iris())


def test_a_custom_step_that_updates_by_hand_runs_without_an_optimizer():
    # pytorch/examples' regression script: p.data.add_(-lr * p.grad), no torch optimizer.
    model = mlp(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(model, optimizer=None, train_step=hand_sgd_step(F.cross_entropy))
    steps: list[int] = []
    record = Recorder(lambda stage, ctx: steps.append(ctx.step), "on_fit_end")
    history = trainer.fit(iris(), epochs=2, batch_size=50, callbacks=[record])
    assert steps == [6] and len(history) == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert history["train_loss"][1] < history["train_loss"][0]


# -- corolux.fit -------------------------------------------------------------------------------


def test_one_call_fit():
    x, y = iris()
    torch.manual_seed(0)
    history = corolux.fit(
        mlp(4, 3, 32),
        (x, y),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
        metrics=[Accuracy()],
        device="cpu",
        progress=False,
        epochs=15,
        valid_data=0.2,
        batch_size=16,
    )
    assert isinstance(history, corolux.History)
    assert len(history["train_loss"]) == 15
    assert history["valid_acc"][-1] > 0.8
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_one_call_fit_rejects_unknown_arguments_with_a_suggestion():
    with pytest.raises(TypeError, match="did you mean 'epochs'"):
        corolux.fit(mlp(4, 3), iris(), loss_fn=F.cross_entropy, optimizer=sgd(), epoch=3)


# -- one run at a time -------------------------------------------------------------------------


def test_a_second_run_while_one_is_open_is_a_runtime_error():
    trainer = make_trainer()
    gen = trainer.run(iris(), epochs=2)
    next(gen)
    with pytest.raises(RuntimeError, match=r"(?i)finish|close"):
        trainer.fit(iris())
    with pytest.raises(RuntimeError):
        trainer.run(iris())
    with pytest.raises(RuntimeError):
        trainer.evaluate(iris())
    with pytest.raises(RuntimeError):
        trainer.predict(iris()[0])
    gen.close()
    assert len(trainer.fit(iris())["train_loss"]) == 1


def test_a_run_that_never_started_is_discarded_when_another_starts():
    # At the REPL, `trainer.run(data)` typed without a name stays alive in `_`.
    trainer = make_trainer()
    forgotten = trainer.run(iris(), epochs=2)
    history = trainer.fit(iris(), epochs=1)
    assert len(history) == 1
    assert list(forgotten) == []  # closed before it ran: not one event, no setup, no teardown


def test_the_open_run_error_names_close_run_and_close_run_closes_it():
    teardowns: list[str] = []
    cb = corolux.callback("cb", teardown=lambda self, ctx: teardowns.append(ctx.stage))()
    trainer = make_trainer()
    gen = trainer.run(iris(), epochs=2, callbacks=[cb])
    next(gen)
    with pytest.raises(RuntimeError, match=r"trainer\.close_run\(\) \(for a stepper, s\.close\(\)\)"):
        trainer.fit(iris())
    trainer.close_run()
    assert teardowns == ["on_fit_begin"] and list(gen) == []  # cleanup ran; nothing more yielded
    trainer.close_run()  # no open run: a no-op
    assert len(trainer.fit(iris())) == 1


def test_trainer_is_reusable_after_break():
    trainer = make_trainer()
    for event in trainer.run(iris(), epochs=3):
        if event.stage == "on_train_batch_end":
            break
    history = trainer.fit(iris(), epochs=2)
    assert history["epoch"] == [1, 2]


def test_trainer_is_reusable_after_an_exception():
    class Boom(corolux.Callback):
        def on_train_batch_end(self, ctx):
            raise ZeroDivisionError("boom")

    trainer = make_trainer()
    with pytest.raises(ZeroDivisionError, match="boom"):
        trainer.fit(iris(), callbacks=[Boom()])
    assert len(trainer.fit(iris()).records) == 1


def test_each_run_starts_fresh_history_and_counters_but_keeps_the_model():
    model = mlp(4, 3)
    trainer = make_trainer(model)
    trainer.fit(iris(), epochs=2)
    after_first = params_of(model)
    steps = []
    h2 = trainer.fit(
        iris(),
        epochs=1,
        callbacks=[Recorder(lambda s, ctx: steps.append((ctx.step, ctx.epoch)), "on_train_batch_end")],
    )
    assert h2["epoch"] == [1]
    assert steps[0] == (1, 1)
    assert not same_params(after_first, params_of(model))  # trained on from the first run's state


# -- custom steps and stages -------------------------------------------------------------------


def halving_step(ctx):
    """A custom step: the default step with the loss halved, using the ctx helpers."""
    ctx.pred = ctx.model(ctx.input)
    yield "on_train_batch_after_pred"
    ctx.loss = ctx.loss_fn(ctx.pred, ctx.target) * 0.5
    yield "on_train_batch_after_loss"
    yield from backward_and_step(ctx)


class HalvingTrainer(corolux.Trainer):
    def train_step(self, ctx):
        return halving_step(ctx)


@pytest.mark.parametrize("how", ["subclass", "argument"])
def test_custom_train_step(how):
    model = mlp(4, 3)
    before = params_of(model)
    kwargs = dict(loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu", progress=False)
    if how == "subclass":
        trainer = HalvingTrainer(model, **kwargs)
    else:
        trainer = corolux.Trainer(model, train_step=halving_step, **kwargs)
    x, y = iris()
    seen = []
    for event in trainer.run((x, y), epochs=1, batch_size=50):
        if event.stage == "on_train_batch_after_loss":
            full = F.cross_entropy(event.ctx.pred.detach(), event.ctx.target)
            seen.append((event.ctx.loss.item(), full.item()))
        last_step = event.ctx.step
    assert len(seen) == 3
    assert all(got == pytest.approx(full / 2) for got, full in seen)
    assert last_step == 3
    assert not same_params(before, params_of(model))
    assert len(trainer.history["train_loss"]) == 1


@pytest.mark.parametrize("drive", ["fit", "run"])
def test_a_custom_step_yielding_plain_strings_counts_steps_and_stops_at_max_steps(drive):
    # The step yields str stage names; the loop maps them to Stage members, counts ctx.step at
    # after_step and stops at max_steps, whether fit() leaves the unwatched stages silent or not.
    seen = []
    watcher = corolux.callback(
        "watcher",
        on_train_batch_after_step=lambda self, ctx: seen.append(
            (ctx.stage is corolux.Stage.on_train_batch_after_step, ctx.step)
        ),
    )()
    trainer = corolux.Trainer(
        mlp(4, 3),
        loss_fn=F.cross_entropy,
        optimizer=sgd(),
        train_step=halving_step,
        device="cpu",
        progress=False,
    )
    x, y = iris()
    if drive == "fit":
        trainer.fit((x, y), epochs=3, batch_size=50, max_steps=4, callbacks=[watcher])
    else:
        for _ in trainer.run((x, y), epochs=3, batch_size=50, max_steps=4, callbacks=[watcher]):
            pass
    assert seen == [(True, 1), (True, 2), (True, 3), (True, 4)]
    assert trainer.history.to_dict()["epoch"] == [1, 2]


def test_custom_valid_step_argument():
    calls = []

    def valid_step(ctx):
        with torch.no_grad():
            ctx.pred = ctx.model(ctx.input)
        calls.append(ctx.iter)
        yield "on_valid_batch_after_pred"
        ctx.loss = F.cross_entropy(ctx.pred, ctx.target)
        yield "on_valid_batch_after_loss"

    trainer = make_trainer(valid_step=valid_step)
    result = trainer.evaluate(iris(), batch_size=50)
    assert calls == [1, 2, 3]
    assert set(result) == {"loss"}


class GenTrainer(corolux.Trainer):
    stages = ("on_gen_after_loss",)

    def train_step(self, ctx):
        ctx.pred = ctx.model(ctx.input)
        yield "on_train_batch_after_pred"
        ctx.loss = ctx.loss_fn(ctx.pred, ctx.target)
        yield "on_gen_after_loss"
        yield "on_train_batch_after_loss"
        yield "on_train_batch_before_backward"
        ctx.backward(ctx.loss)
        yield "on_train_batch_before_step"
        ctx.step_optimizer()
        yield "on_train_batch_after_step"


def test_custom_stages_are_yielded_and_listened_to():
    x, y = iris()
    heard = []

    class Listener(corolux.Callback):
        def on_gen_after_loss(self, ctx):
            heard.append((ctx.iter, ctx.stage))

    trainer = GenTrainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu", progress=False)
    stages = [e.stage for e in trainer.run((x, y), epochs=1, batch_size=75, callbacks=[Listener()])]
    assert heard == [(1, "on_gen_after_loss"), (2, "on_gen_after_loss")]
    batch = stages[stages.index("on_train_batch_begin") : stages.index("on_train_batch_end") + 1]
    assert batch == [
        "on_train_batch_begin",
        "on_train_batch_after_pred",
        "on_gen_after_loss",
        "on_train_batch_after_loss",
        "on_train_batch_before_backward",
        "on_train_batch_before_step",
        "on_train_batch_after_step",
        "on_train_batch_end",
    ]


def test_custom_stage_in_a_coroutine_and_the_callback_factory():
    x, y = iris()
    heard = []

    @corolux.coroutine
    def waiter():
        while True:
            event = yield "on_gen_after_loss"
            heard.append(event.ctx.iter)

    Factory = corolux.callback("gen_listener", on_gen_after_loss=lambda self, ctx: heard.append("f"))
    trainer = GenTrainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu", progress=False)
    trainer.fit((x, y), batch_size=75, callbacks=[waiter(), Factory()])
    assert sorted(map(str, heard)) == ["1", "2", "f", "f"]


def test_unknown_stage_from_a_custom_step_errors_with_did_you_mean():
    class Typo(GenTrainer):
        def train_step(self, ctx):
            ctx.pred = ctx.model(ctx.input)
            yield "on_train_batch_after_pred"
            yield "on_gen_after_los"

    trainer = Typo(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu", progress=False)
    with pytest.raises((ValueError, TypeError), match="did you mean 'on_gen_after_loss'"):
        trainer.fit(iris())


def test_unknown_stage_from_a_train_step_argument_errors_with_did_you_mean():
    def step(ctx):
        ctx.pred = ctx.model(ctx.input)
        yield "on_train_batch_after_perd"

    trainer = make_trainer(train_step=step)
    with pytest.raises((ValueError, TypeError), match="did you mean 'on_train_batch_after_pred'"):
        trainer.fit(iris())


def test_callback_for_an_undeclared_custom_stage_is_rejected_before_the_first_event():
    class Listener(corolux.Callback):
        def on_gen_after_los(self, ctx):
            pass

    trainer = GenTrainer(mlp(4, 3), loss_fn=F.cross_entropy, optimizer=sgd(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="did you mean 'on_gen_after_loss'"):
        trainer.run(iris(), callbacks=[Listener()])


def test_custom_stage_names_must_start_with_on():
    with pytest.raises((ValueError, TypeError)):

        class Bad(corolux.Trainer):  # noqa: F841
            stages = ("gen_after_loss",)


# -- several optimizers ------------------------------------------------------------------------


def test_several_optimizers_record_a_loss_each_and_set_opt_name():
    torch.manual_seed(0)
    x, _ = iris()
    target = x.sum(1)
    model = GanToy()
    trainer = corolux.Trainer(
        model,
        loss_fn=F.mse_loss,
        device="cpu",
        progress=False,
        optimizer={"gen": sgd(0.05), "disc": sgd(0.05)},
    )
    seen = []
    moved = []
    snapshot = {}

    class Watch(corolux.Callback):
        def _rec(self, ctx):
            seen.append((ctx.iter, ctx.stage, ctx.opt_name, ctx.opt is ctx.optimizers[ctx.opt_name]))

        on_train_batch_after_pred = on_train_batch_after_loss = _rec
        on_train_batch_before_backward = _rec

        def on_train_batch_before_step(self, ctx):
            self._rec(ctx)
            snapshot["gen"] = params_of(ctx.model.gen)
            snapshot["disc"] = params_of(ctx.model.disc)

        def on_train_batch_after_step(self, ctx):
            self._rec(ctx)
            moved.append(
                (
                    ctx.opt_name,
                    not same_params(snapshot["gen"], params_of(ctx.model.gen)),
                    not same_params(snapshot["disc"], params_of(ctx.model.disc)),
                )
            )

    history = trainer.fit(
        (x, target), epochs=3, batch_size=75, callbacks=[Watch()], valid_data=(x[:20], target[:20])
    )
    assert {"train_loss_gen", "train_loss_disc"} <= set(history.to_dict())
    assert len(history["train_loss_gen"]) == 3
    assert all(math.isfinite(v) for v in history["train_loss_gen"] + history["train_loss_disc"])
    assert "valid_loss" in history
    per_batch = [(s, name, ok) for it, s, name, ok in seen if it == 1][:10]
    inner = [
        "on_train_batch_after_pred",
        "on_train_batch_after_loss",
        "on_train_batch_before_backward",
        "on_train_batch_before_step",
        "on_train_batch_after_step",
    ]
    assert per_batch == [(s, "gen", True) for s in inner] + [(s, "disc", True) for s in inner]
    # each optimizer moves its own submodule only
    assert moved[:2] == [("gen", True, False), ("disc", False, True)]
    assert all(m in (("gen", True, False), ("disc", False, True)) for m in moved)


def test_several_optimizers_step_count():
    x, _ = iris()
    trainer = corolux.Trainer(
        GanToy(),
        loss_fn=F.mse_loss,
        device="cpu",
        progress=False,
        optimizer={"gen": sgd(0.01), "disc": sgd(0.01)},
    )
    last = None
    for event in trainer.run((x, x.sum(1)), batch_size=75):
        last = event.ctx.step
    assert last == 4  # two batches, two optimizer steps each


# -- loss carried by the output -----------------------------------------------------------------


class CarriesLoss(torch.nn.Module):
    """Called with a dict input (as Hugging Face models are); returns its own loss."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.net = mlp(4, 3, 16)

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        if self.as_dict:
            return {"loss": loss, "logits": logits}
        return types.SimpleNamespace(loss=loss, logits=logits)


@pytest.mark.parametrize("as_dict", [False, True])
def test_loss_fn_none_uses_the_loss_the_output_carries(as_dict):
    torch.manual_seed(0)
    x, y = iris()
    batches = [({"x": x[i : i + 25], "labels": y[i : i + 25]}, y[i : i + 25]) for i in range(0, 150, 25)]
    model = CarriesLoss(as_dict)
    trainer = corolux.Trainer(
        model, loss_fn=None, device="cpu", progress=False, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    history = trainer.fit(batches, epochs=6)
    losses = history["train_loss"]
    assert losses[-1] < 0.7 * losses[0]
    result = trainer.evaluate(batches)
    with torch.no_grad():
        expected = sum(F.cross_entropy(model.net(b["x"]), t, reduction="sum") for b, t in batches) / 150
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_loss_fn_none_with_a_plain_output_says_to_pass_loss_fn():
    trainer = corolux.Trainer(mlp(4, 3), loss_fn=None, optimizer=sgd(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        trainer.fit(iris())


def test_non_scalar_loss_is_a_value_error():
    trainer = make_trainer(loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        trainer.fit(iris())


def test_non_scalar_loss_in_evaluate_is_a_value_error():
    trainer = make_trainer(loss_fn=torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="scalar"):
        trainer.evaluate(iris())


# -- seeds -------------------------------------------------------------------------------------


def _seeded_fit(model: torch.nn.Module, seed: int | None):
    x, y = iris()
    net = copy.deepcopy(model)
    trainer = make_trainer(net, seed=seed, optimizer=lambda p: torch.optim.SGD(p, lr=0.2))
    history = trainer.fit((x, y), epochs=3, batch_size=16, valid_data=0.2)
    return history.to_dict(), params_of(net)


def test_seed_makes_two_fits_identical():
    torch.manual_seed(123)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )
    h1, p1 = _seeded_fit(model, seed=7)
    torch.manual_seed(999)  # global state in between must not matter
    h2, p2 = _seeded_fit(model, seed=7)
    assert h1 == h2
    assert same_params(p1, p2)
    # control: a different seed shuffles and drops out differently
    h3, p3 = _seeded_fit(model, seed=8)
    assert not same_params(p1, p3)


def test_a_one_element_loss_trains_as_the_scalar_one():
    torch.manual_seed(0)
    a, b = mlp(4, 3), mlp(4, 3)
    b.load_state_dict(a.state_dict())
    plain = make_trainer(a, seed=0).fit(iris(), epochs=2, batch_size=50)
    shaped = make_trainer(b, seed=0, loss_fn=lambda pred, y: F.cross_entropy(pred, y).reshape(1)).fit(
        iris(), epochs=2, batch_size=50
    )
    assert shaped["train_loss"] == plain["train_loss"]
    assert same_params(params_of(a), params_of(b))


def test_with_several_optimizers_a_loss_that_is_not_a_tensor_is_a_clear_error():
    trainer = make_trainer(GanToy(), loss_fn=lambda pred, y: 0.5, optimizer={"gen": sgd(), "disc": sgd()})
    with pytest.raises(ValueError, match="the loss must be a scalar tensor, got float 0.5"):
        trainer.fit(iris())


def test_the_bad_loss_error_shows_the_value_given_not_the_accumulated_share():
    accumulate = Recorder(lambda stage, ctx: setattr(ctx, "accumulate_steps", 4), "on_fit_begin")
    set_loss = Recorder(lambda stage, ctx: setattr(ctx, "loss", 1.0), "on_train_batch_after_loss")
    with pytest.raises(ValueError, match="got float 1.0;"):
        make_trainer().fit(iris(), callbacks=[accumulate, set_loss])


def test_validation_and_prediction_run_under_one_no_grad_for_the_whole_phase():
    modes: list[tuple[str, bool]] = []
    stages = (
        "on_train_batch_begin",
        "on_train_end",
        "on_valid_begin",
        "on_valid_batch_begin",
        "on_valid_batch_after_loss",
        "on_valid_end",
        "on_epoch_end",
        "on_predict_begin",
        "on_predict_batch_after_pred",
        "on_predict_end",
    )
    record = Recorder(lambda stage, ctx: modes.append((stage, torch.is_grad_enabled())), *stages)
    trainer = make_trainer()
    trainer.fit(iris(), epochs=1, batch_size=75, valid_data=iris(), callbacks=[record])
    trainer.predict(iris()[0], batch_size=75, callbacks=[record])
    grad = {stage: mode for stage, mode in modes}
    assert grad["on_train_batch_begin"] and grad["on_train_end"] and grad["on_epoch_end"]
    assert not any(mode for stage, mode in modes if "valid" in stage or "predict" in stage)
    assert torch.is_grad_enabled()  # restored after the run


def test_a_stepper_paused_in_validation_gives_the_prompt_its_grad_mode_back():
    trainer = make_trainer()
    s = trainer.stepper(iris(), epochs=2, batch_size=75, valid_data=iris())
    event = s.until("on_valid_batch_after_pred")
    assert event is not None and not event.ctx.pred.requires_grad  # the forward ran under no_grad
    assert torch.is_grad_enabled()  # at the prompt: the user's mode
    assert s.until("on_valid_batch_after_loss") is not None and not s.ctx.loss.requires_grad
    history = s.finish()
    assert len(history) == 2 and torch.is_grad_enabled()
