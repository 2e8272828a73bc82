"""torch.compile end to end (corolux/compiling.py): ``Trainer(compile=...)``, a model compiled
by the user, and torch's own counters; real training on the digits.

A compilation by inductor (torch.compile's default) takes seconds, one by the ``eager`` or
``aot_eager`` backends a fraction of one: they trace with dynamo as inductor does (same
graphs, guards, recompilations and graph breaks) and skip code generation. So the tests that
count compilations or graph breaks, or check prefixes and copies, use them and share their
runs through module-scoped fixtures; inductor runs once, in the acceptance test. Each fixture
that counts starts with ``torch._dynamo.reset()``: graphs compiled by an earlier test (dynamo
keeps them on the forward's code object) would otherwise be reused and not counted.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch._dynamo
from realdata import adam_trainer, digits, digits_mlp_trainer

import corolux
from corolux.callbacks import AutoResume, KeepBestModel, ModelCheckpoint, Profile
from corolux.compiling import compile_counts

F = torch.nn.functional


class Net(torch.nn.Module):
    """A digits classifier with a forward of its own (its own code object: graphs compiled for
    torch's Sequential elsewhere in the session are not shared with it)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, hidden)
        self.out = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class Breaking(Net):
    """A forward with a graph break in the middle (a call dynamo does not trace)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        torch._dynamo.graph_break()
        return self.out(h)


def splits():
    """1,000 digits to train on (15 batches of 64 and one of 40) and 300 to validate (4 of
    64 and one of 44): every epoch ends with a partial batch in both phases."""
    x, y = digits()
    return (x[:1000], y[:1000]), (x[1000:1300], y[1000:1300])


trainer = adam_trainer


def net(seed: int = 0, cls: type[Net] = Net, hidden: int = 32) -> Net:
    torch.manual_seed(seed)
    return cls(hidden)


# -- the compile= argument ------------------------------------------------------------------------


def test_compile_must_be_a_bool_or_a_dict_of_torch_compile_arguments():
    expected = r"compile must be False, True, 'step' or a dict.*compile=\{'mode': 'max-autotune'\}"
    with pytest.raises(TypeError, match=expected):
        trainer(Net(), compile="max-autotune")
    with pytest.raises(ValueError, match="no argument 'fulgraph'; did you mean 'fullgraph'?"):
        trainer(Net(), compile={"fulgraph": True})
    with pytest.raises(RuntimeError, match="Unrecognized mode") as info:  # torch's own check, at once
        trainer(Net(), compile={"mode": "fastest"})
    assert "in corolux.Trainer(compile={'mode': 'fastest'})" in info.value.__notes__


def test_a_model_compiled_already_is_not_compiled_again():
    with pytest.raises(ValueError, match=r"compiled already.*compile=False"):
        trainer(torch.compile(Net()), compile=True)
    in_place = Net()
    in_place.compile()
    with pytest.raises(ValueError, match=r"compiled in place \(model.compile\(\)"):
        trainer(in_place, compile={"backend": "eager"})


def test_a_torch_whose_compiler_does_not_work_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    with pytest.raises(RuntimeError, match=r"torch.compile does not work with this PyTorch.*compile=False"):
        trainer(Net(), compile=True)
    trainer(Net(), compile=False)  # eager needs no compiler


def test_a_compiler_failure_names_the_backend_and_the_fix_and_leaves_the_model_as_it_was():
    def broken_backend(graph, inputs):
        raise RuntimeError("no code generator here")

    (x, y), _ = splits()
    model = Net()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        trainer(model, compile={"backend": broken_backend}).fit((x[:64], y[:64]))
    note = next(n for n in info.value.__notes__ if n.startswith("corolux:"))
    assert "could not compile the model's forward" in note and "compile=False" in note
    assert "forward" not in model.__dict__
    default = corolux.compiling.options(True, Net())
    assert "C++ compiler" in corolux.compiling.CompiledForward(print, default, "x").failure_note()  # inductor
    # compile="step": predict() compiles the forward alone, and a failure there says so
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        trainer(Net(), compile={"step": True, "backend": broken_backend}).predict(x[:64])
    note = next(n for n in info.value.__notes__ if n.startswith("corolux:"))
    assert "could not compile the model's forward" in note


# -- a compiled run, against the same run eager -----------------------------------------------------


class Watch(corolux.Callback):
    """What callbacks see of ctx.model during a compiled run."""

    def __init__(self, model):
        self.model = model
        self.seen: dict[str, object] = {}

    def on_train_batch_begin(self, ctx):
        if (ctx.epoch, ctx.iter) != (1, 2):
            return
        self.seen["is_users_module"] = ctx.model is self.model
        self.seen["forward"] = type(ctx.model.__dict__.get("forward")).__name__
        self.seen["keys"] = sorted(ctx.model.state_dict())
        twin = copy.deepcopy(ctx.model)  # e.g. AveragedModel(ctx.model): a module of its own
        with torch.no_grad():
            twin.out.bias.add_(1.0)
        # (called as the step calls it, with grad: no graph other than the step's own)
        self.seen["twin_differs"] = not torch.equal(twin(ctx.input), ctx.model(ctx.input))
        thawed = pickle.loads(pickle.dumps(ctx.model))
        self.seen["thawed_forward"] = (thawed.forward.__func__, thawed.forward.__self__ is thawed)


@pytest.fixture(scope="module")
def runs():
    """The same training (3 epochs, partial last batches, validation) eager and compiled with
    aot_eager and fullgraph=True; then a second fit, evaluate and predict of the compiled one."""
    train, valid = splits()
    eager = trainer(net()).fit(train, epochs=3, valid_data=valid, batch_size=64)
    torch._dynamo.reset()
    model = net()
    compiled = trainer(model, compile={"backend": "aot_eager", "fullgraph": True})
    profile, watch = Profile(), Watch(model)
    before = compile_counts()
    history = compiled.fit(train, epochs=3, valid_data=valid, batch_size=64, callbacks=[profile, watch])
    first = compile_counts() - before
    before = compile_counts()
    compiled.fit(train, epochs=1, valid_data=valid, batch_size=64)
    results = compiled.evaluate(valid, batch_size=64)
    predictions = compiled.predict(valid[0], batch_size=64)
    again = compile_counts() - before
    return {
        "eager": eager,
        "compiled": history,
        "model": model,
        "profile": profile.summary(),
        "seen": watch.seen,
        "first": first,
        "again": again,
        "results": results,
        "predictions": predictions,
    }


def test_a_compiled_fit_trains_as_the_eager_one(runs):
    for name in ("train_loss", "valid_loss", "train_acc", "valid_acc"):
        assert runs["compiled"][name] == pytest.approx(runs["eager"][name], abs=1e-5), name
    assert runs["compiled"]["valid_acc"][-1] > 0.8  # it learnt


def test_compilations_stay_at_two_per_mode_over_epochs_with_partial_batches(runs):
    train, valid = runs["profile"]["train"], runs["profile"]["valid"]
    # train: the full batches' graph, then one with a dynamic batch size for the partial one;
    # eval (another graph: eval mode, no grad): at most the same two; none in epochs 2 and 3
    assert 1 <= train["compilations"] <= 2 and 1 <= valid["compilations"] <= 2, runs["profile"]
    assert train["compilations"] + valid["compilations"] == runs["first"].compilations
    assert runs["first"].graph_breaks == 0 and train["graph_breaks"] == valid["graph_breaks"] == 0
    assert runs["first"].recompiles == runs["first"].compilations - 1  # one function, compiled once first


def test_a_second_fit_evaluate_and_predict_reuse_the_graphs(runs):
    assert runs["again"].compilations == 0, runs["again"]
    assert runs["results"]["acc"] > 0.8
    assert runs["predictions"].shape == (300, 10)


def test_ctx_model_is_the_users_module_with_plain_keys_and_copies_of_its_own(runs):
    seen = runs["seen"]
    assert seen["is_users_module"] and seen["forward"] == "_Installed"  # compiled while the run is open
    assert seen["keys"] == ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
    assert seen["twin_differs"]  # a deep copy computes with its own weights, not the original's
    assert seen["thawed_forward"] == (Net.forward, True)  # a pickled copy: its class's forward, its own
    model = runs["model"]
    assert "forward" not in vars(model)  # after the run: the module as it was
    copy.deepcopy(model), pickle.dumps(model)


def test_custom_steps_get_the_compiled_forward_and_a_closed_stepper_removes_it():
    def train_step(ctx):
        ctx.pred = ctx.model(ctx.input)  # what a custom step does
        yield "on_train_batch_after_pred"
        ctx.loss = F.cross_entropy(ctx.pred, ctx.target)
        yield "on_train_batch_after_loss"
        ctx.backward(ctx.loss)
        yield "on_train_batch_before_step"
        ctx.step_optimizer()
        yield "on_train_batch_after_step"

    torch._dynamo.reset()
    (x, y), _ = splits()
    model = net(hidden=24)
    custom = trainer(model, compile={"backend": "eager"}, train_step=train_step)
    before = compile_counts()
    stepper = custom.stepper((x[:256], y[:256]), epochs=2, batch_size=64)
    stepper.until("on_train_batch_after_pred")
    assert isinstance(stepper.ctx.model.forward, corolux.compiling._Installed)
    assert (compile_counts() - before).compilations == 1
    stepper.close()
    assert "forward" not in vars(model)


def test_overlapping_runs_of_two_trainers_over_one_module_leave_it_as_it_was():
    (x, y), _ = splits()
    model = Net()
    for first_closed in ("a", "b"):
        a, b = (trainer(model, compile={"backend": "eager"}) for _ in range(2))
        sa, sb = a.stepper((x[:64], y[:64])), b.stepper((x[:64], y[:64]))
        sa.until("on_train_begin")
        sb.until("on_train_begin")
        assert model.forward.compiled is b._compiled
        (sa if first_closed == "a" else sb).close()
        assert isinstance(model.forward, corolux.compiling._Installed)  # the open run's
        (sb if first_closed == "a" else sa).close()
        assert "forward" not in vars(model)


# -- graph breaks -----------------------------------------------------------------------------------


def test_graph_breaks_are_counted_and_fullgraph_refuses_them():
    torch._dynamo.reset()
    (x, y), _ = splits()
    profile = Profile()
    trainer(net(cls=Breaking), compile={"backend": "eager"}).fit((x[:128], y[:128]), callbacks=[profile])
    assert profile.summary()["train"]["graph_breaks"] >= 1
    assert "breaks" in str(profile)
    model = net(cls=Breaking, hidden=16)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        trainer(model, compile={"backend": "eager", "fullgraph": True}).fit((x[:128], y[:128]))
    assert "forward" not in vars(model)


# -- a model the user compiled ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def user_compiled(tmp_path_factory):
    """torch.compile(model) trained with KeepBestModel, ModelCheckpoint and AutoResume."""
    folder = tmp_path_factory.mktemp("user_compiled")
    train, valid = splits()
    model = torch.compile(net(seed=1), backend="eager")
    best = ModelCheckpoint(str(folder / "best.pt"), monitor="valid_loss", save_best_only=True)
    t = trainer(model)
    history = t.fit(
        train,
        epochs=4,
        valid_data=valid,
        batch_size=64,
        callbacks=[KeepBestModel(), best, AutoResume(folder / "auto.pt")],
    )
    return {"trainer": t, "model": model, "history": history, "folder": folder}


def test_a_compiled_model_trains_and_checkpoints_without_prefixes(user_compiled):
    model, folder = user_compiled["model"], user_compiled["folder"]
    saved = torch.load(folder / "best.pt", weights_only=True)
    assert sorted(saved["model"]) == ["hidden.bias", "hidden.weight", "out.bias", "out.weight"]
    # KeepBestModel restored the best epoch, the one ModelCheckpoint wrote
    for key, value in saved["model"].items():
        assert torch.equal(model._orig_mod.state_dict()[key], value), key
    assert user_compiled["history"]["valid_acc"][-1] > 0.8
    assert not (folder / "auto.pt").exists()  # AutoResume deleted it: training done


def test_a_compiled_models_checkpoint_loads_into_a_plain_model_and_back(user_compiled, tmp_path):
    t = user_compiled["trainer"]
    _, valid = splits()
    t.save_checkpoint(tmp_path / "compiled.pt")
    plain = trainer(net(seed=5))
    plain.load_checkpoint(tmp_path / "compiled.pt")
    assert plain.evaluate(valid) == pytest.approx(t.evaluate(valid), abs=1e-6)
    plain.save_checkpoint(tmp_path / "plain.pt")
    back = trainer(torch.compile(net(seed=6), backend="eager"))
    back.load_checkpoint(tmp_path / "plain.pt")
    assert back.evaluate(valid) == pytest.approx(t.evaluate(valid), abs=1e-6)


def test_a_compiled_model_evaluates_predicts_and_steps(user_compiled):
    t, model = user_compiled["trainer"], user_compiled["model"]
    _, (xv, yv) = splits()
    with torch.no_grad():
        expected = model(xv)
    assert torch.allclose(t.predict(xv), expected, atol=1e-6)
    stepper = t.stepper((xv, yv), epochs=1)
    event = stepper.until("on_train_batch_after_loss")
    assert event.ctx.model is model and event.ctx.loss.requires_grad
    assert "train" in stepper.where()
    stepper.finish()


class StopAt(corolux.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.epoch:
            ctx.stop_training("time_limit")


def test_a_compiled_model_resumes_with_autoresume_bit_identically(tmp_path):
    train, valid = splits()
    kwargs = {"epochs": 3, "valid_data": valid, "batch_size": 64}
    reference = trainer(torch.compile(net(seed=2), backend="eager"), seed=0)
    expected = reference.fit(train, **kwargs)
    path = tmp_path / "auto.pt"
    first = trainer(torch.compile(net(seed=2), backend="eager"), seed=0)
    first.fit(train, **kwargs, callbacks=[AutoResume(path), StopAt(2)])
    assert path.exists() and len(first.history) == 2
    model = torch.compile(net(seed=9), backend="eager")  # other weights: the file's are loaded
    history = trainer(model, seed=0).fit(train, **kwargs, callbacks=[AutoResume(path)])
    assert history.to_dict() == expected.to_dict()
    for key, value in reference.model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# -- acceptance: inductor ---------------------------------------------------------------------------


def test_digits_compiled_by_inductor_train_as_eager_and_checkpoints_round_trip(tmp_path):
    """compile=True (inductor) against eager from the same seed; then a checkpoint of the
    compiled trainer into a plain one and one of the plain into a compiled one. (Full batches
    only: each inductor compilation costs seconds; the recompilations of partial batches are
    counted above, with the same dynamo.)"""
    x, y = digits()
    train, valid = (x[:1536], y[:1536]), (x[1536:1792], y[1536:1792])  # 24 and 4 batches of 64
    kwargs = {"epochs": 3, "valid_data": valid, "batch_size": 64}
    eager = digits_mlp_trainer(seed=0).fit(train, **kwargs)
    torch._dynamo.reset()
    compiled = digits_mlp_trainer(seed=0, compile=True)
    before = compile_counts()
    history = compiled.fit(train, **kwargs)
    counts = compile_counts() - before
    assert counts.compilations >= 1 and counts.graph_breaks == 0, counts
    for name in ("train_loss", "valid_loss"):
        assert history[name] == pytest.approx(eager[name], abs=1e-5), name
    for name in ("train_acc", "valid_acc"):  # inductor may reorder float sums: one sample may flip
        samples = len(train[0]) if name == "train_acc" else len(valid[0])
        assert all(abs(a - b) * samples <= 1 + 1e-9 for a, b in zip(history[name], eager[name], strict=True))
    assert history["valid_acc"][-1] > 0.85
    results = compiled.evaluate(valid, batch_size=64)

    compiled.save_checkpoint(tmp_path / "compiled.pt")
    plain = digits_mlp_trainer(seed=1)
    plain.load_checkpoint(tmp_path / "compiled.pt")
    assert plain.evaluate(valid, batch_size=64) == pytest.approx(results, abs=1e-5)
    plain.save_checkpoint(tmp_path / "plain.pt")
    again = digits_mlp_trainer(seed=2, compile=True)
    again.load_checkpoint(tmp_path / "plain.pt")
    assert again.evaluate(valid, batch_size=64) == pytest.approx(results, abs=1e-5)
    for key, value in compiled.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


# -- compile="step": the forward and the loss as one graph ------------------------------------------


def recorder(graphs):
    """A backend that keeps the graphs dynamo hands it and runs them as they are."""

    def backend(graph, inputs):
        graphs.append(graph)
        return graph.forward

    return backend


def has_loss(graph) -> bool:
    return any("cross_entropy" in str(node.target) for node in graph.graph.nodes)


def test_compile_step_compiles_forward_and_loss_as_one_graph_and_trains_as_eager():
    train, valid = splits()
    kwargs = {"epochs": 2, "valid_data": valid, "batch_size": 64}
    eager = trainer(net(seed=3)).fit(train, **kwargs)
    torch._dynamo.reset()
    forward_only: list = []
    trainer(net(seed=3, hidden=20), compile={"backend": recorder(forward_only)}).fit(train, **kwargs)
    assert forward_only and not any(has_loss(g) for g in forward_only)  # compile=True: the forward alone
    graphs: list = []
    profile = Profile()
    fused = trainer(net(seed=3), compile={"step": True, "backend": recorder(graphs)})
    history = fused.fit(train, **kwargs, callbacks=[profile])
    assert graphs and all(has_loss(g) for g in graphs)  # every graph holds the loss
    summary = profile.summary()
    assert 1 <= summary["train"]["compilations"] <= 2 and 1 <= summary["valid"]["compilations"] <= 2
    for name, values in eager.to_dict().items():
        assert history[name] == pytest.approx(values, abs=1e-6), name
    before = len(graphs)
    predictions = fused.predict(valid[0], batch_size=64)  # the forward alone, compiled
    assert len(graphs) > before and not has_loss(graphs[-1])
    with torch.no_grad():
        assert torch.allclose(predictions, fused.model(valid[0]), atol=1e-6)
    assert "forward" not in vars(fused.model)


class AtPred(corolux.Callback):
    def on_train_batch_after_pred(self, ctx):
        ctx.pred = ctx.pred * 2


def test_compile_step_refuses_what_listens_between_forward_and_loss_and_custom_steps():
    train, valid = splits()
    fused = trainer(Net(), compile="step")
    with pytest.raises(ValueError, match=r"'on_train_batch_after_pred'.*AtPred listen\(s\).*compile=True"):
        fused.fit(train, callbacks=[AtPred()])
    at_valid = corolux.callback("at_valid", on_valid_batch_after_pred=lambda self, ctx: None)
    with pytest.raises(ValueError, match="'on_valid_batch_after_pred'"):
        fused.evaluate(valid, callbacks=[at_valid()])

    def train_step(ctx):
        yield from corolux.loop.train_step(ctx)

    with pytest.raises(ValueError, match="has its own train_step; pass compile=True"):
        trainer(Net(), compile="step", train_step=train_step)
    with pytest.raises(TypeError, match="'step' must be True or False"):
        trainer(Net(), compile={"step": "yes"})


def test_compile_step_refuses_a_pred_changed_where_no_listener_was_seen_at_the_start():
    """A coroutine that begins waiting at after_pred later in the run, or a run() consumer,
    is not among the handlers checked at the start: the step itself refuses the change."""
    train, _ = splits()

    @corolux.coroutine
    def later():
        yield "on_train_begin"
        event = yield "on_train_batch_after_pred"
        event.ctx.pred = event.ctx.pred * 0

    fused = trainer(Net(), compile={"step": True, "backend": "eager"})
    with pytest.raises(RuntimeError, match=r"replaced at 'on_train_batch_after_pred'.*compile=True"):
        fused.fit(train, callbacks=[later()])
    events = fused.run(train, epochs=1)
    for event in events:
        if event.stage == "on_train_batch_after_pred":
            event.ctx.pred = event.ctx.pred + 1
            break
    with pytest.raises(RuntimeError, match="ctx.pred was replaced"):
        for _ in events:  # (on_exception comes first, then the error)
            pass
