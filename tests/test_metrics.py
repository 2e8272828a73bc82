"""Metrics: values against hand computation (per-sample means over batches of different
sizes), names, phase-only metrics, torchmetrics objects, and no host sync per update."""

from __future__ import annotations

import math

import pytest
import torch
from realdata import digits, iris

import corolux
from corolux.metrics import MAE, MSE, RMSE, Accuracy, BinaryAccuracy, BinaryAUROC, Mean, MulticlassAUROC

F = torch.nn.functional


SIZES = [5, 17, 3, 40, 1, 34]  # uneven on purpose: a mean of batch means would differ


def uneven_batches(x: torch.Tensor, y: torch.Tensor, sizes=SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def trainer_for(model, **kwargs) -> corolux.Trainer:
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return corolux.Trainer(model, **kwargs)


def classification_batches():
    """Real iris logits from a fixed random linear model, in uneven batches."""
    torch.manual_seed(0)
    x, y = iris()
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        logits = model(x)
    return model, uneven_batches(x, y), uneven_batches(logits, y)


def regression_batches():
    torch.manual_seed(1)
    x, _ = iris()
    target = x[:, 3]  # predict petal width from the other features
    model = torch.nn.Linear(3, 1)
    with torch.no_grad():
        pred = model(x[:, :3])
    return model, uneven_batches(x[:, :3], target.unsqueeze(1)), uneven_batches(pred, target.unsqueeze(1))


# -- values against hand computation ---------------------------------------------------------------


def test_accuracy_is_the_per_sample_mean_over_batches():
    _, _, pairs = classification_batches()
    metric = Accuracy()
    metric.reset()
    for pred, target in pairs:
        metric.update(pred, target)
    correct = sum((p.argmax(-1) == t).sum().item() for p, t in pairs)
    total = sum(len(t) for _, t in pairs)
    mean_of_means = sum((p.argmax(-1) == t).float().mean().item() for p, t in pairs) / len(pairs)
    value = metric.compute()
    assert float(value) == pytest.approx(correct / total)
    assert float(value) != pytest.approx(mean_of_means)  # the batches really are uneven
    metric.reset()
    metric.update(*pairs[0])
    first_pred, first_target = pairs[0]
    expected = (first_pred.argmax(-1) == first_target).float().mean().item()
    assert float(metric.compute()) == pytest.approx(expected)


def test_accuracy_accepts_one_hot_targets():
    _, _, pairs = classification_batches()
    metric = Accuracy()
    for pred, target in pairs:
        metric.update(pred, F.one_hot(target, 3).float())
    correct = sum((p.argmax(-1) == t).sum().item() for p, t in pairs)
    assert float(metric.compute()) == pytest.approx(correct / 100)


def test_accuracy_accepts_probability_targets():
    _, _, pairs = classification_batches()
    metric = Accuracy()
    for pred, target in pairs:
        soft = 0.8 * F.one_hot(target, 3).float() + 0.2 / 3  # label smoothing keeps the argmax
        metric.update(pred, soft)
    correct = sum((p.argmax(-1) == t).sum().item() for p, t in pairs)
    assert float(metric.compute()) == pytest.approx(correct / 100)


@pytest.mark.parametrize(
    ("pred_shape", "target_shape", "float_target"),
    [((8, 1), (8,), False), ((8, 1), (8, 1), True), ((8,), (8,), False), ((8,), (8,), True)],
    ids=["N1-indices", "N1-float-N1", "N-indices", "N-float"],
)
def test_accuracy_refuses_a_binary_output_and_points_to_binary_accuracy(
    pred_shape, target_shape, float_target
):
    """One score per sample: argmax is always 0, so the value would mean nothing (with an
    (N, 1) float target of the same shape it would even read 1.0)."""
    target = torch.randint(0, 2, target_shape)
    if float_target:
        target = target.float()
    metric = Accuracy()
    with pytest.raises(ValueError) as info:
        metric.update(torch.rand(pred_shape), target)
    message = str(info.value)
    assert f"pred {pred_shape}" in message and f"target {target_shape}" in message
    assert "C >= 2" in message
    assert "BinaryAccuracy" in message
    assert metric.count == 0  # nothing was counted


def test_accuracy_on_a_binary_model_fails_at_the_first_batch_through_the_trainer():
    x, y = iris(100)  # two classes
    trainer = trainer_for(
        torch.nn.Linear(4, 1),
        loss_fn=lambda pred, target: F.binary_cross_entropy_with_logits(pred.squeeze(-1), target.float()),
        metrics=[Accuracy()],
    )
    with pytest.raises(ValueError, match=r"pred \(32, 1\) and target \(32,\).*BinaryAccuracy"):
        trainer.fit((x, y))
    history = trainer_for(
        torch.nn.Linear(4, 1),
        loss_fn=lambda pred, target: F.binary_cross_entropy_with_logits(pred.squeeze(-1), target.float()),
        metrics=[corolux.metrics.BinaryAccuracy(from_logits=True)],
    ).fit((x, y))
    assert 0 <= history.last("train_binary_acc") <= 1  # the fix the message gives works


def test_regression_metrics_are_per_sample_means_over_batches():
    _, _, pairs = regression_batches()
    diffs = torch.cat([(p - t).flatten() for p, t in pairs])
    expected = {
        "mae": diffs.abs().mean().item(),
        "mse": diffs.square().mean().item(),
        "rmse": math.sqrt(diffs.square().mean().item()),
    }
    per_batch_rmse = sum(math.sqrt((p - t).square().mean().item()) for p, t in pairs) / len(pairs)
    for metric in (MAE(), MSE(), RMSE()):
        metric.reset()
        for pred, target in pairs:
            metric.update(pred, target)
        assert float(metric.compute()) == pytest.approx(expected[metric.name], rel=1e-5), metric.name
    assert expected["rmse"] != pytest.approx(per_batch_rmse)


def test_regression_metrics_accept_a_flat_target():
    _, _, pairs = regression_batches()
    metric = MAE()
    for pred, target in pairs:
        metric.update(pred, target.squeeze(1))
    diffs = torch.cat([(p - t).flatten() for p, t in pairs])
    assert float(metric.compute()) == pytest.approx(diffs.abs().mean().item(), rel=1e-5)


def test_mean_of_pred_and_of_a_function():
    _, _, pairs = regression_batches()
    plain = Mean()
    l1 = Mean(lambda pred, target: (pred - target).abs(), name="l1")
    for pred, target in pairs:
        plain.update(pred, target)
        l1.update(pred, target)
    preds = torch.cat([p.flatten() for p, _ in pairs])
    diffs = torch.cat([(p - t).flatten() for p, t in pairs])
    assert float(plain.compute()) == pytest.approx(preds.mean().item(), rel=1e-5)
    assert float(l1.compute()) == pytest.approx(diffs.abs().mean().item(), rel=1e-5)
    assert l1.name == "l1"


def test_reset_starts_over():
    _, _, pairs = regression_batches()
    metric = MSE()
    for pred, target in pairs:
        metric.update(pred, target)
    metric.reset()
    pred, target = pairs[1]
    metric.update(pred, target)
    assert float(metric.compute()) == pytest.approx((pred - target).square().mean().item(), rel=1e-5)


def test_metric_values_through_the_trainer_match_hand_computation():
    model, batches, pairs = classification_batches()
    trainer = trainer_for(model, metrics=[Accuracy()])
    result = trainer.evaluate(batches)
    logits = torch.cat([p for p, _ in pairs])
    targets = torch.cat([t for _, t in pairs])
    assert result["acc"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    mean_of_batch_losses = sum(F.cross_entropy(p, t).item() for p, t in pairs) / len(pairs)
    assert result["loss"] != pytest.approx(mean_of_batch_losses, rel=1e-5)


def test_regression_metrics_through_the_trainer():
    model, batches, pairs = regression_batches()
    trainer = trainer_for(model, loss_fn=F.mse_loss, metrics=[MAE(), MSE(), RMSE()])
    result = trainer.evaluate(batches)
    diffs = torch.cat([(p - t).flatten() for p, t in pairs])
    assert set(result) == {"loss", "mae", "mse", "rmse"}
    assert result["mae"] == pytest.approx(diffs.abs().mean().item(), rel=1e-5)
    assert result["mse"] == pytest.approx(diffs.square().mean().item(), rel=1e-5)
    assert result["rmse"] == pytest.approx(math.sqrt(diffs.square().mean().item()), rel=1e-5)
    assert result["loss"] == pytest.approx(result["mse"], rel=1e-5)


def test_train_metrics_are_per_sample_means_of_what_each_batch_saw():
    """Training metrics see the prediction made before that batch's step."""
    x, y = iris()
    model = torch.nn.Linear(4, 3)
    batches = uneven_batches(x, y)
    seen = []

    class Keep(corolux.Callback):
        def on_train_batch_after_loss(self, ctx):
            seen.append((ctx.pred.detach().clone(), ctx.target, ctx.loss.detach().clone()))

    history = trainer_for(model, metrics=[Accuracy()]).fit(batches, callbacks=[Keep()])
    correct = sum((p.argmax(-1) == t).sum().item() for p, t, _ in seen)
    loss = sum(batch_loss.item() * len(t) for _, t, batch_loss in seen) / 100
    assert history["train_acc"] == [pytest.approx(correct / 100)]
    assert history["train_loss"] == [pytest.approx(loss, rel=1e-5)]


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "name", "higher"),
    [
        (Accuracy(), "acc", True),
        (Mean(), "mean", False),
        (MAE(), "mae", False),
        (MSE(), "mse", False),
        (RMSE(), "rmse", False),
    ],
)
def test_names_and_direction(metric, name, higher):
    assert metric.name == name
    assert metric.higher_is_better is higher


def test_mean_direction_can_be_given():
    assert Mean(higher_is_better=True).higher_is_better is True


@pytest.mark.parametrize("cls", [Accuracy, MAE, MSE, RMSE])
def test_name_override(cls):
    assert cls(name="custom").name == "custom"
    assert cls().name != "custom"  # the override does not leak into the class


def test_name_override_names_the_history_entries():
    x, y = iris()
    trainer = trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy(name="top1"), Accuracy()])
    history = trainer.fit((x, y), valid_data=(x, y))
    assert {"train_top1", "valid_top1", "train_acc", "valid_acc"} <= set(history.to_dict())
    assert history["valid_top1"] == history["valid_acc"]


def test_two_metrics_with_one_name_is_a_value_error():
    with pytest.raises(ValueError, match="acc"):
        trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy(), Accuracy()])
    with pytest.raises(ValueError, match="top"):
        trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy(name="top"), MAE(name="top")])


def test_a_metric_and_a_phase_metric_with_one_name_is_a_value_error():
    with pytest.raises(ValueError, match="acc"):
        trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy()], valid_metrics=[Accuracy()])


def test_the_same_name_in_different_phases_is_fine():
    x, y = iris()
    trainer = trainer_for(torch.nn.Linear(4, 3), train_metrics=[Accuracy()], valid_metrics=[Accuracy()])
    history = trainer.fit((x, y), valid_data=(x, y))
    assert {"train_acc", "valid_acc"} <= set(history.to_dict())


def test_a_metric_class_instead_of_an_instance_is_a_type_error():
    with pytest.raises(TypeError, match=r"Accuracy\(\)"):
        trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy])


def test_something_that_is_not_a_metric_is_a_type_error():
    with pytest.raises(TypeError, match="metrics"):
        trainer_for(torch.nn.Linear(4, 3), metrics=["accuracy"])


# -- torchmetrics ----------------------------------------------------------------------------------


def test_torchmetrics_object_works_unchanged_and_is_named_in_snake_case():
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.classification import MulticlassAccuracy

    torch.manual_seed(0)
    x, y = digits()
    model = torch.nn.Linear(64, 10)
    tm = MulticlassAccuracy(num_classes=10, average="micro")
    trainer = trainer_for(model, metrics=[tm, Accuracy()], optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    batches = uneven_batches(x[:300], y[:300], [64, 64, 64, 64, 44])
    valid = uneven_batches(x[300:500], y[300:500], [7, 93, 100])
    history = trainer.fit(batches, epochs=2, valid_data=valid)
    names = set(history.to_dict())
    assert {"train_multiclass_accuracy", "valid_multiclass_accuracy"} <= names
    for phase in ("train", "valid"):
        got = history[f"{phase}_multiclass_accuracy"]
        assert all(isinstance(v, float) for v in got)
        assert got == pytest.approx(history[f"{phase}_acc"], abs=1e-6)
    result = trainer.evaluate(valid)
    assert result["multiclass_accuracy"] == pytest.approx(result["acc"], abs=1e-6)
    assert isinstance(tm, torchmetrics.Metric)


def test_torchmetrics_regression_metric():
    pytest.importorskip("torchmetrics")
    from torchmetrics.regression import MeanAbsoluteError

    model, batches, pairs = regression_batches()
    result = trainer_for(model, loss_fn=F.mse_loss, metrics=[MeanAbsoluteError()]).evaluate(batches)
    diffs = torch.cat([(p - t).flatten() for p, t in pairs])
    assert result["mean_absolute_error"] == pytest.approx(diffs.abs().mean().item(), rel=1e-5)


# -- phase-only metrics ------------------------------------------------------------------------


def test_train_and_valid_metrics_are_phase_only():
    x, y = iris()
    trainer = trainer_for(
        torch.nn.Linear(4, 3),
        metrics=[Accuracy()],
        train_metrics=[Mean(lambda p, t: p.softmax(-1).max(-1).values, name="confidence")],
        valid_metrics=[Mean(lambda p, t: (p.argmax(-1) != t).float(), name="error")],
    )
    history = trainer.fit((x, y), epochs=2, valid_data=(x[:50], y[:50]))
    assert set(history.to_dict()) == {
        "epoch",
        "train_loss",
        "train_acc",
        "train_confidence",
        "valid_loss",
        "valid_acc",
        "valid_error",
    }
    assert history["valid_error"] == pytest.approx([1 - a for a in history["valid_acc"]])
    result = trainer.evaluate((x, y))
    assert set(result) == {"loss", "acc", "error"}


def test_evaluate_metrics_argument_replaces_the_validation_metrics():
    x, y = iris()
    trainer = trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy()])
    result = trainer.evaluate((x, y), metrics=[Mean(name="avg_logit")])
    assert set(result) == {"loss", "avg_logit"}


# -- epoch valid_loss and evaluate() --------------------------------------------------------------


def test_epoch_valid_loss_equals_evaluate_loss_on_the_same_data():
    x, y = digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)
    )
    trainer = trainer_for(model, metrics=[Accuracy()], optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    valid = uneven_batches(x[:200], y[:200], [13, 100, 50, 37])
    history = trainer.fit((x[200:800], y[200:800]), epochs=2, valid_data=valid)
    result = trainer.evaluate(valid)
    assert result["loss"] == pytest.approx(history["valid_loss"][-1], rel=1e-6)
    assert result["acc"] == pytest.approx(history["valid_acc"][-1], rel=1e-6)
    model.eval()
    with torch.no_grad():
        logits = model(x[:200])
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y[:200]).item(), rel=1e-5)


def test_skipped_batches_are_not_counted():
    model, batches, pairs = classification_batches()

    class SkipSecond(corolux.Callback):
        def on_valid_batch_after_pred(self, ctx):
            if ctx.iter == 2:
                ctx.skip_batch()

    result = trainer_for(model, metrics=[Accuracy()]).evaluate(batches, callbacks=[SkipSecond()])
    kept = pairs[:1] + pairs[2:]
    logits = torch.cat([p for p, _ in kept])
    targets = torch.cat([t for _, t in kept])
    assert result["acc"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())


# -- the loss tracker ------------------------------------------------------------------------------


def test_loss_tracker_is_the_per_sample_mean():
    tracker = corolux.metrics.LossTracker()
    tracker.update(torch.tensor(1.0), 3)
    tracker.update(torch.tensor(4.0), 1)
    assert tracker.count == 4
    assert tracker.compute() == pytest.approx(7 / 4)


@pytest.mark.parametrize("loss", [0.0, 3, None, [torch.tensor(1.0)]], ids=["float", "int", "None", "list"])
def test_loss_tracker_refuses_a_loss_that_is_not_a_tensor(loss):
    with pytest.raises(ValueError) as info:
        corolux.metrics.LossTracker().update(loss, 4)
    message = str(info.value)
    assert message.startswith(f"the loss must be a scalar tensor, got {type(loss).__name__} {loss!r}")
    assert "ctx.loss = ctx.loss * 0" in message  # the fix
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no AttributeError chained


@pytest.mark.parametrize("phase", ["train", "valid"])
def test_a_float_assigned_to_ctx_loss_is_a_clear_value_error_through_the_trainer(phase):
    x, y = iris()
    stage = "on_train_batch_end" if phase == "train" else "on_valid_batch_after_loss"

    class ZeroLoss(corolux.Callback):
        weight = -1000  # before the metrics tracker reads the loss at *_batch_end

    setattr(ZeroLoss, stage, lambda self, ctx: setattr(ctx, "loss", 0.0))
    with pytest.raises(ValueError, match=r"the loss must be a scalar tensor, got float 0\.0") as info:
        trainer_for(torch.nn.Linear(4, 3)).fit((x, y), valid_data=(x, y), callbacks=[ZeroLoss()])
    assert any("MetricsTracker" in note for note in getattr(info.value, "__notes__", []))


# -- no host sync per update ---------------------------------------------------------------------


SYNC_METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


@pytest.fixture
def count_syncs(monkeypatch):
    """Count the calls that read a tensor's value on the host, while ``counting[0]`` is set."""
    calls: list[str] = []
    counting = [False]
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls, counting


@pytest.mark.parametrize(
    "metric",
    [Accuracy(), Mean(), Mean(lambda p, t: (p - t).abs()), MAE(), MSE(), RMSE()],
    ids=["acc", "mean", "mean_fn", "mae", "mse", "rmse"],
)
def test_update_does_no_host_sync(metric, count_syncs):
    calls, counting = count_syncs
    if metric.name == "acc":
        _, _, pairs = classification_batches()
    else:
        _, _, pairs = regression_batches()
    metric.reset()
    counting[0] = True
    for pred, target in pairs:
        metric.update(pred, target)
    counting[0] = False
    assert calls == []
    counting[0] = True
    metric.compute()  # one read here is the point of compute()
    counting[0] = False
    assert len(calls) <= 1


def test_the_counter_sees_a_sync(count_syncs):
    """Control for the fixture: real reads are counted."""
    calls, counting = count_syncs
    counting[0] = True
    t = torch.tensor([1.5])
    t.item(), float(t), t.tolist(), bool(t)
    counting[0] = False
    assert calls == ["item", "__float__", "tolist", "__bool__"]


def test_training_batches_do_no_host_sync_for_metrics(count_syncs):
    """Between on_train_begin and on_train_end (where metrics are computed) nothing reads a
    tensor on the host: the loss tracker and the metrics accumulate on the device."""
    calls, counting = count_syncs
    x, y = iris()

    class Window(corolux.Callback):
        weight = {"on_train_begin": -1000, "on_train_end": -1000}

        def on_train_begin(self, ctx):
            counting[0] = True

        def on_train_end(self, ctx):
            counting[0] = False

    conf = Mean(lambda p, t: p.softmax(-1).max(-1).values, name="conf")
    trainer = trainer_for(torch.nn.Linear(4, 3), metrics=[Accuracy(), conf])
    # A list of batches: a DataLoader's sampler reads its random indices on the host.
    history = trainer.fit(uneven_batches(x, y), epochs=2, callbacks=[Window()])
    assert calls == []
    assert len(history["train_acc"]) == 2  # the metrics were computed after the window


# -- the built-ins DESIGN names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "name", "higher"),
    [
        ("Accuracy", "acc", True),
        ("BinaryAccuracy", "binary_acc", True),
        ("BinaryAUROC", "auroc", True),
        ("MulticlassAUROC", "auroc", True),
        ("MAE", "mae", False),
        ("MSE", "mse", False),
        ("RMSE", "rmse", False),
        ("Mean", "mean", False),
    ],
)
def test_every_builtin_named_in_design_exists(cls, name, higher):
    """DESIGN §8 "Numbers and records" lists these built-ins and their names."""
    metric_cls = getattr(corolux.metrics, cls, None)
    assert metric_cls is not None, f"corolux.metrics.{cls} is missing"
    kwargs = {"num_classes": 3} if cls == "MulticlassAUROC" else {}
    try:
        metric = metric_cls(**kwargs)
    except TypeError:
        metric = metric_cls()
    assert metric.name == name
    assert metric.higher_is_better is higher


@pytest.mark.parametrize("phase", ["train", "valid"])
def test_a_per_sample_loss_assigned_to_ctx_loss_is_refused(phase):
    x, y = iris()
    per_sample = corolux.callback(
        "per_sample",
        **{
            f"on_{phase}_batch_after_loss": lambda self, ctx: setattr(
                ctx, "loss", F.cross_entropy(ctx.pred, ctx.target, reduction="none")
            )
        },
    )()
    trainer = corolux.Trainer(
        torch.nn.Linear(4, 3),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
    )
    with pytest.raises(ValueError, match=r"the loss must be a scalar tensor, got shape \(50,\)"):
        if phase == "valid":
            trainer.evaluate((x, y), batch_size=50, callbacks=[per_sample])
        else:
            trainer.fit((x, y), batch_size=50, callbacks=[per_sample])


def test_an_error_inside_a_metric_names_the_metric_phase_epoch_and_batch():
    import corolux

    class Broken:
        name = "broken"
        higher_is_better = True

        def reset(self):
            self.n = 0

        def update(self, pred, target):
            self.n += 1
            if self.n == 3:
                raise RuntimeError("bad shapes")

        def compute(self):
            return 0.0

    trainer = corolux.Trainer(
        torch.nn.Linear(4, 3),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=False,
        valid_metrics=[Broken()],
    )
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    with pytest.raises(RuntimeError, match="bad shapes") as info:
        trainer.fit((x, y), epochs=2, batch_size=16, valid_data=(x[:48], y[:48]))
    assert "in metric 'broken'.update, valid phase, epoch 1, batch 3" in info.value.__notes__


def test_auroc_and_accuracy_match_scikit_learn_on_the_same_inputs():
    metrics_sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (600,), generator=g)
    score = (0.35 * target + 0.65 * torch.rand(600, generator=g)).clamp(0, 1)
    binary = BinaryAUROC(num_thresholds=2001)
    for i in range(0, 600, 64):  # batch by batch, as the tracker feeds it
        binary.update(score[i : i + 64], target[i : i + 64])
    assert binary.compute() == pytest.approx(metrics_sk.roc_auc_score(target, score), abs=1e-3)

    classes = torch.randint(0, 4, (800,), generator=g)
    logits = torch.randn(800, 4, generator=g) + 1.5 * torch.nn.functional.one_hot(classes, 4)
    probs = logits.softmax(-1)
    for average in ("macro", "weighted"):
        multi = MulticlassAUROC(num_thresholds=2001, average=average)
        multi.update(probs, classes)
        expected = metrics_sk.roc_auc_score(classes, probs, multi_class="ovr", average=average)
        assert multi.compute() == pytest.approx(expected, abs=1e-3), average
    accuracy = Accuracy()
    accuracy.update(logits, classes)
    assert accuracy.compute() == pytest.approx(
        metrics_sk.accuracy_score(classes, logits.argmax(-1)), abs=1e-12
    )
    binary_acc = BinaryAccuracy()
    binary_acc.update(score, target)
    assert binary_acc.compute() == pytest.approx(metrics_sk.accuracy_score(target, score >= 0.5), abs=1e-12)


@pytest.mark.parametrize(
    "make",
    [Accuracy, lambda: Mean(name="m"), MSE, MulticlassAUROC, corolux.metrics.LossTracker, "torchmetrics"],
    ids=["accuracy", "mean", "mse", "auroc", "loss", "torchmetrics"],
)
def test_merged_states_of_shares_equal_the_metric_on_the_whole_data(make):
    """What a checkpoint of a DDP run holds per rank, merged into one: the whole data's value."""
    if make == "torchmetrics":
        torchmetrics = pytest.importorskip("torchmetrics")
        make = lambda: torchmetrics.classification.MulticlassAccuracy(num_classes=10, average="micro")  # noqa: E731
    x, y = digits()
    logits = torch.nn.Linear(64, 10)(x[:300]).detach()
    y = y[:300]

    def fed(indices):
        metric = make()
        for start in range(0, len(indices), 32):
            part = indices[start : start + 32]
            if isinstance(metric, corolux.metrics.LossTracker):
                metric.update(torch.nn.functional.cross_entropy(logits[part], y[part]), len(part))
            elif isinstance(metric, (MSE,)):
                metric.update(logits[part, :1], y[part, None].float())
            else:
                metric.update(logits[part], y[part])
        return metric

    whole = fed(torch.arange(300))
    shares = [fed(torch.arange(r, 300, 3)) for r in range(3)]  # three ranks' shares
    merged = make()
    corolux.metrics.load_metric_state(
        merged, corolux.metrics.merge_metric_states(make(), [corolux.metrics.metric_state(s) for s in shares])
    )
    assert float(merged.compute()) == pytest.approx(float(whole.compute()), rel=1e-6)
    assert float(shares[0].compute()) != pytest.approx(float(whole.compute()), rel=1e-6)  # a share is not


def test_a_no_grad_loss_tracker_keeps_graphless_losses_as_they_are_and_detaches_the_others():
    tracker = corolux.metrics.LossTracker(no_grad=True)
    with torch.no_grad():
        plain = torch.tensor(2.0) * 1
    w = torch.ones((), requires_grad=True)
    graphed = w * 4.0  # a custom validation step that enabled gradients
    tracker.update(plain, 2)
    tracker.update(graphed, 2)
    kept = tracker.state_dict()["losses"]
    assert kept[0] is plain
    assert kept[1] is not graphed and kept[1].grad_fn is None and not kept[1].requires_grad
    assert tracker.compute() == 3.0
    training = corolux.metrics.LossTracker()  # the default detaches every loss
    training.update(plain, 2)
    assert training.state_dict()["losses"][0] is not plain
