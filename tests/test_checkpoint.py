"""Checkpoints and resume (in one process): exact continuation, safe files, clear refusals.

The kill-and-rerun acceptance tests, with real processes and SIGKILL, are in
tests/test_resume_process.py.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch
from kill import KillAt as Kill
from realdata import digits
from torch.utils.data import DataLoader, Dataset, TensorDataset

import corolux
from corolux import checkpoint
from corolux.callbacks import AutoResume
from corolux.checkpoint import CheckpointError

EPOCHS = 4


class Augmented(Dataset):
    """A dataset whose samples draw from the global RNG (noise), as augmentations do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i] + 0.05 * torch.randn(self.x.shape[1:]), self.y[i]


def make_trainer(seed: int = 0, **kwargs) -> corolux.Trainer:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 10)
    )
    kwargs.setdefault("metrics", [corolux.metrics.Accuracy()])
    return corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
        device="cpu",
        progress=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x[:480], y[:480], x[480:600], y[480:600]


def same_state(a: corolux.Trainer, b: corolux.Trainer) -> bool:
    params = all(
        torch.equal(p, q)
        for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )
    opt_a, opt_b = a.optimizers["opt"].state_dict(), b.optimizers["opt"].state_dict()
    states = all(
        torch.equal(opt_a["state"][k][name], opt_b["state"][k][name])
        for k in opt_a["state"]
        for name in opt_a["state"][k]
    )
    return params and states and opt_a["param_groups"] == opt_b["param_groups"]


def reference(data, make_data, metrics=None, **fit):
    torch.manual_seed(1)
    trainer = make_trainer() if metrics is None else make_trainer(metrics=metrics)
    history = trainer.fit(make_data(data), epochs=EPOCHS, valid_data=(data[2], data[3]), **fit)
    return trainer, history


def tensors(data):
    return data[0], data[1]


def loader(data):
    return DataLoader(TensorDataset(data[0], data[1]), batch_size=32, shuffle=True)


def augmented(data):
    return DataLoader(Augmented(data[0], data[1]), batch_size=32, shuffle=True)


def batches(data):
    return [(data[0][i : i + 40], data[1][i : i + 40]) for i in range(0, len(data[0]), 40)]


class Count(corolux.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []

    def on_train_batch_end(self, ctx):
        self.batches.append((ctx.epoch, ctx.iter))


# -- exact continuation ------------------------------------------------------------------------


@pytest.mark.parametrize("make_data", [tensors, loader, augmented, batches])
def test_resume_from_an_epoch_checkpoint_is_bit_identical(data, make_data, tmp_path):
    ref, ref_history = reference(data, make_data)
    torch.manual_seed(1)
    first = make_trainer()
    first.fit(make_data(data), epochs=2, valid_data=(data[2], data[3]))
    first.save_checkpoint(tmp_path / "run.pt")
    torch.manual_seed(123)  # another process: another RNG state, another initialisation
    second = make_trainer(seed=7)
    history = second.fit(
        make_data(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from=tmp_path / "run.pt"
    )
    assert same_state(ref, second)
    assert history.to_dict() == ref_history.to_dict()
    assert history.completed_epochs == EPOCHS


@pytest.mark.parametrize("make_data", [tensors, loader, augmented, batches])
def test_autoresume_inside_an_epoch_continues_at_the_next_batch(data, make_data, tmp_path):
    ref, ref_history = reference(data, make_data)
    path = tmp_path / "auto.pt"
    torch.manual_seed(1)
    with pytest.raises(SystemExit):
        make_trainer().fit(
            make_data(data),
            epochs=EPOCHS,
            valid_data=(data[2], data[3]),
            callbacks=[AutoResume(path, every_n_steps=5), Kill(epoch=3, batch=9)],
        )
    saved = checkpoint.read(path)
    assert saved["position"]["epoch"] == 3 and saved["position"]["batches_done"] in (5, 6, 7, 8)
    done = saved["position"]["batches_done"]
    count = Count()
    torch.manual_seed(99)
    resumed = make_trainer(seed=5)
    history = resumed.fit(
        make_data(data),
        epochs=EPOCHS,
        valid_data=(data[2], data[3]),
        callbacks=[AutoResume(path, every_n_steps=5), count],
    )
    assert same_state(ref, resumed)
    assert history.to_dict() == ref_history.to_dict()  # epoch 3's means cover all its batches
    per_epoch = sum(1 for epoch, _ in count.batches if epoch == 4)
    assert per_epoch == -(-480 // (40 if make_data is batches else 32))
    assert count.batches[0] == (3, done + 1)  # no batch replayed
    assert len(count.batches) == 2 * per_epoch - done
    assert not path.exists()  # training is done: the resume file goes


def test_resume_from_last_after_ctrl_c_at_an_epoch_boundary(data):
    ref, ref_history = reference(data, tensors)

    class CtrlC(corolux.Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 2:
                ctx.request_interrupt()

    torch.manual_seed(1)
    trainer = make_trainer()
    with pytest.warns(RuntimeWarning, match="interrupted"):
        first = trainer.fit(tensors(data), epochs=EPOCHS, valid_data=(data[2], data[3]), callbacks=[CtrlC()])
    assert first.interrupted and first.completed_epochs == 2
    trainer.evaluate((data[2], data[3]))  # draws from the RNG in between: "last" restores it
    history = trainer.fit(tensors(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from="last")
    assert same_state(ref, trainer)
    assert history.to_dict() == ref_history.to_dict()
    assert not history.interrupted and history.stop_reason is None


def test_resume_from_last_asks_for_more_epochs(data):
    ref, ref_history = reference(data, tensors)
    torch.manual_seed(1)
    trainer = make_trainer()
    trainer.fit(tensors(data), epochs=1, valid_data=(data[2], data[3]))
    trainer.fit(tensors(data), epochs=3, valid_data=(data[2], data[3]), resume_from="last")
    history = trainer.fit(tensors(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from="last")
    assert history["epoch"] == [1, 2, 3, 4]
    assert same_state(ref, trainer) and history.to_dict() == ref_history.to_dict()


def test_resume_from_last_after_a_ctrl_c_inside_an_epoch_continues_there(data):
    torch.manual_seed(1)
    trainer = make_trainer()

    class CtrlC(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (2, 4):
                ctx.request_interrupt()

    with pytest.warns(RuntimeWarning, match="interrupted"):
        trainer.fit(tensors(data), epochs=EPOCHS, callbacks=[CtrlC()])
    count = Count()
    history = trainer.fit(tensors(data), epochs=EPOCHS, resume_from="last", callbacks=[count])
    assert count.batches[0] == (2, 5)  # the stop came after batch 4's end: it was trained
    assert history["epoch"] == [1, 2, 3, 4] and history.completed_epochs == EPOCHS


def test_a_checkpoint_taken_during_validation_runs_that_validation_again(data, tmp_path):
    ref, ref_history = reference(data, loader)
    path = tmp_path / "valid.pt"

    class SaveThenDie(corolux.Callback):
        def on_valid_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (2, 2):
                checkpoint.save(ctx, path)
                raise SystemExit("killed")

    torch.manual_seed(1)
    with pytest.raises(SystemExit):
        make_trainer().fit(
            loader(data), epochs=EPOCHS, valid_data=(data[2], data[3]), callbacks=[SaveThenDie()]
        )
    resumed = make_trainer(seed=3)
    history = resumed.fit(loader(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from=path)
    assert same_state(ref, resumed)
    assert history.to_dict() == ref_history.to_dict()


def test_data_without_an_index_resumes_at_the_start_of_the_epoch_with_a_warning(data, tmp_path):
    class Stream:  # re-iterable, but no index to skip to
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

    path = tmp_path / "stream.pt"
    with pytest.raises(SystemExit):
        make_trainer().fit(
            Stream(batches(data)), epochs=3, callbacks=[AutoResume(path, every_n_steps=4), Kill(2, 6)]
        )
    count = Count()
    with pytest.warns(
        RuntimeWarning, match=r"cannot be resumed at a batch: it is a Stream.*runs again from its start"
    ):
        history = make_trainer().fit(
            Stream(batches(data)), epochs=3, callbacks=[AutoResume(path, every_n_steps=4), count]
        )
    assert count.batches[0] == (2, 1)
    assert history["epoch"] == [1, 2, 3]


def test_rng_of_python_and_numpy_are_restored(tmp_path):
    trainer = make_trainer()
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    random.seed(3)
    np.random.seed(3)
    trainer.fit((x, y), epochs=1)
    trainer.save_checkpoint(tmp_path / "rng.pt")  # the RNG states of the run's end
    expected = (random.random(), np.random.rand(), torch.rand(()))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    make_trainer().fit((x, y), epochs=1, resume_from=tmp_path / "rng.pt")  # nothing left to train
    assert (random.random(), np.random.rand(), torch.rand(())) == expected


# -- callbacks' state --------------------------------------------------------------------------


class Counter(corolux.Callback):
    def __init__(self) -> None:
        self.epochs = 0

    def on_epoch_end(self, ctx):
        self.epochs += 1

    def state_dict(self):
        return {"epochs": self.epochs}

    def load_state_dict(self, state):
        self.epochs = state["epochs"]


class Other(Counter):
    state_key = "other"


def test_callback_states_are_matched_by_key_not_position(tmp_path):
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    trainer = make_trainer()
    first, second, other = Counter(), Counter(), Other()
    second.epochs = 10
    trainer.fit((x, y), epochs=2, callbacks=[first, other, second])
    trainer.save_checkpoint(tmp_path / "cb.pt")
    saved = checkpoint.read(tmp_path / "cb.pt")["callbacks"]
    assert saved["Counter"] == {"epochs": 2} and saved["Counter#2"] == {"epochs": 12}
    assert saved["other"] == {"epochs": 2}
    a, b, c = Other(), Counter(), Counter()
    make_trainer().fit((x, y), epochs=3, callbacks=[a, b, c], resume_from=tmp_path / "cb.pt")
    assert (a.epochs, b.epochs, c.epochs) == (3, 3, 13)


def test_a_missing_stateful_callback_is_an_error_and_a_new_one_a_warning(tmp_path):
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    trainer = make_trainer()
    trainer.fit((x, y), epochs=1, callbacks=[Counter()])
    trainer.save_checkpoint(tmp_path / "cb.pt")
    with pytest.raises(CheckpointError, match=r"callback\(s\) \['Counter'\].*pass them in callbacks="):
        make_trainer().fit((x, y), epochs=2, resume_from=tmp_path / "cb.pt")
    with pytest.warns(RuntimeWarning, match=r"no state for callback\(s\) \['other'\]"):
        make_trainer().fit((x, y), epochs=2, resume_from=tmp_path / "cb.pt", callbacks=[Counter(), Other()])


def test_a_callback_state_that_is_not_plain_is_refused_at_save_naming_where(tmp_path):
    class Holds(corolux.Callback):
        def on_epoch_end(self, ctx):
            pass

        def state_dict(self):
            return {"rng": np.random.default_rng(0)}

        def load_state_dict(self, state):
            pass

    trainer = make_trainer()
    trainer.fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), epochs=1, callbacks=[Holds()])
    with pytest.raises(
        TypeError, match=r"checkpoint\['callbacks'\]\['Holds'\]\['rng'\] is a numpy.random.*Generator"
    ):
        trainer.save_checkpoint(tmp_path / "bad.pt")
    assert list(tmp_path.iterdir()) == []


# -- weights only --------------------------------------------------------------------------------


def test_load_checkpoint_restores_weights_into_a_trainer_that_never_ran(tmp_path):
    x, y = torch.randn(96, 64), torch.randint(0, 10, (96,))
    trainer = make_trainer()
    trainer.fit((x, y), epochs=2)
    trainer.save_checkpoint(tmp_path / "w.pt")
    fresh = make_trainer(seed=9)
    fresh.load_checkpoint(tmp_path / "w.pt")
    assert same_state(trainer, fresh)
    assert len(fresh.history) == 0  # the training state waits for resume_from


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_file_loads_with_weights_only_and_has_no_wrapper_prefixes(tmp_path):
    trainer = make_trainer()
    wrapped = corolux.Trainer(
        torch.nn.DataParallel(trainer.model), loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), device="cpu", progress=False,
    )  # fmt: skip
    wrapped.fit((torch.randn(32, 64), torch.randint(0, 10, (32,))), epochs=1)
    wrapped.save_checkpoint(tmp_path / "dp.pt")
    raw = torch.load(tmp_path / "dp.pt", weights_only=True)
    assert raw["format"] == "corolux-checkpoint"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in raw["model"])
    plain = make_trainer(seed=4)
    plain.load_checkpoint(tmp_path / "dp.pt")
    assert all(
        torch.equal(p, q) for p, q in zip(plain.model.parameters(), trainer.model.parameters(), strict=True)
    )
    compiled = torch.compile(make_trainer(seed=4).model)  # not called: nothing compiles
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    corolux.Trainer(compiled, loss_fn=torch.nn.functional.cross_entropy, device="cpu").load_checkpoint(
        tmp_path / "dp.pt"
    )
    assert torch.equal(compiled._orig_mod[0].weight, trainer.model[0].weight)


def test_a_checkpoint_of_another_model_is_refused_with_its_differences_and_nothing_changes(tmp_path):
    trainer = make_trainer()
    trainer.fit((torch.randn(32, 64), torch.randint(0, 10, (32,))), epochs=1)
    trainer.save_checkpoint(tmp_path / "m.pt")
    torch.manual_seed(0)
    other = corolux.Trainer(
        torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)),
        loss_fn=torch.nn.functional.cross_entropy, optimizer=lambda p: torch.optim.Adam(p), device="cpu",
    )  # fmt: skip
    before = [p.clone() for p in other.model.parameters()]
    with pytest.raises(
        CheckpointError, match=r"another model.*'0.weight': shape \(32, 64\) in the file, \(16, 64\) here"
    ):
        other.load_checkpoint(tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"missing '2.weight'.*unexpected '3.weight'"):
        other.fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), resume_from=tmp_path / "m.pt")
    assert all(torch.equal(p, q) for p, q in zip(before, other.model.parameters(), strict=True))
    sgd = make_trainer()
    sgd.optimizers["opt"] = torch.optim.SGD(sgd.model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match=r"other optimizers: 'opt': Adam in the file, SGD here"):
        sgd.load_checkpoint(tmp_path / "m.pt")


# -- files ---------------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "corolux-checkpoint", "version": 1, "model": RunsCode(str(marker))}, path)
    for load in (checkpoint.read, make_trainer().load_checkpoint):
        with pytest.raises(CheckpointError, match=rf"{path}.*refused: loading it would run code"):
            load(path)
    with pytest.raises(CheckpointError, match="would run code"):
        make_trainer().fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), resume_from=path)
    plain_pickle = tmp_path / "evil.pkl"
    plain_pickle.write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(CheckpointError, match=str(plain_pickle)):
        checkpoint.read(plain_pickle)
    assert not marker.exists()


def test_foreign_truncated_and_empty_files_are_refused_naming_the_path(tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=rf"{foreign}.*not a corolux checkpoint.*\['weight'\]"):
        checkpoint.read(foreign)
    trainer = make_trainer()
    trainer.save_checkpoint(tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{truncated}.*truncated or corrupt"):
        checkpoint.read(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{empty}.*truncated or corrupt \(0 bytes"):
        checkpoint.read(empty)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.read(tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match=r"resume_from='last': this trainer has not run fit\(\) yet"):
        make_trainer().fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), resume_from="last")


def test_a_failed_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    trainer = make_trainer()
    path = tmp_path / "c.pt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with torch.no_grad():
        trainer.model[0].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_a_checkpoint_inside_a_batch_is_refused(tmp_path):
    trainer = make_trainer()
    s = trainer.stepper((torch.randn(8, 64), torch.randint(0, 10, (8,))), epochs=1)
    s.until("on_train_batch_after_loss")
    with pytest.raises(RuntimeError, match="inside a batch.*on_train_batch_end or later"):
        trainer.save_checkpoint(tmp_path / "x.pt")
    s.until("on_train_batch_end")
    trainer.save_checkpoint(tmp_path / "x.pt")
    s.close()
    assert checkpoint.read(tmp_path / "x.pt")["position"]["batches_done"] == 1


def test_autoresume_keeps_its_file_after_a_stop_and_deletes_it_when_done(tmp_path):
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    path = tmp_path / "sub" / "auto.pt"

    class Stop(corolux.Callback):
        def on_train_batch_end(self, ctx):
            if (ctx.epoch, ctx.iter) == (2, 1):
                ctx.stop_training("time_limit")

    history = make_trainer().fit((x, y), epochs=4, callbacks=[AutoResume(path), Stop()])
    assert history.stop_reason == "time_limit" and path.exists()
    assert checkpoint.read(path)["counters"]["completed_epochs"] == 1  # the epoch cut short is not saved
    history = make_trainer().fit((x, y), epochs=4, callbacks=[AutoResume(path)])
    assert history["epoch"] == [1, 2, 3, 4] and not path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer().fit((x, y), epochs=1, callbacks=[AutoResume(path)])  # no file: a fresh start


def test_autoresume_and_resume_from_together_are_refused(tmp_path):
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    trainer = make_trainer()
    trainer.save_checkpoint(tmp_path / "a.pt")
    trainer.save_checkpoint(tmp_path / "b.pt")
    with pytest.raises(ValueError, match="pass one of them"):
        trainer.fit((x, y), callbacks=[AutoResume(tmp_path / "a.pt")], resume_from=tmp_path / "b.pt")
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1"):
        AutoResume(tmp_path / "a.pt", every_n_steps=0)


def generator_loader(data):
    return DataLoader(
        TensorDataset(data[0], data[1]),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(11),
    )


def distributed(data):
    sampler = torch.utils.data.DistributedSampler(
        TensorDataset(data[0], data[1]), num_replicas=1, rank=0, seed=3
    )
    return DataLoader(TensorDataset(data[0], data[1]), batch_size=32, sampler=sampler)


@pytest.mark.parametrize("make_data", [generator_loader, distributed])
def test_loaders_with_their_own_generator_or_epoch_seeded_sampler_resume_exactly(data, make_data, tmp_path):
    ref, ref_history = reference(data, make_data)
    path = tmp_path / "g.pt"
    torch.manual_seed(1)
    with pytest.raises(SystemExit):
        make_trainer().fit(
            make_data(data),
            epochs=EPOCHS,
            valid_data=(data[2], data[3]),
            callbacks=[AutoResume(path, every_n_steps=7), Kill(epoch=3, batch=12)],
        )
    resumed = make_trainer(seed=2)
    history = resumed.fit(
        make_data(data),
        epochs=EPOCHS,
        valid_data=(data[2], data[3]),
        callbacks=[AutoResume(path, every_n_steps=7)],
    )
    assert same_state(ref, resumed) and history.to_dict() == ref_history.to_dict()
    torch.manual_seed(1)
    first = make_trainer()
    first.fit(make_data(data), epochs=2, valid_data=(data[2], data[3]))
    first.save_checkpoint(tmp_path / "epoch.pt")
    resumed = make_trainer(seed=2)
    history = resumed.fit(
        make_data(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from=tmp_path / "epoch.pt"
    )
    assert same_state(ref, resumed) and history.to_dict() == ref_history.to_dict()


def test_set_epoch_is_called_on_the_sampler_every_epoch_zero_based(data):
    loader = distributed(data)
    seen = []
    original = loader.sampler.set_epoch
    loader.sampler.set_epoch = lambda epoch: (seen.append(epoch), original(epoch))
    orders = []

    class Order(corolux.Callback):
        def on_train_batch_begin(self, ctx):
            if ctx.iter == 1:
                orders.append(ctx.target[:8].tolist())

    make_trainer().fit(loader, epochs=3, callbacks=[Order()])
    assert seen == [0, 1, 2]
    assert orders[0] != orders[1] != orders[2]


@pytest.mark.filterwarnings("ignore:precision='16-mixed' on the CPU:UserWarning")
def test_the_grad_scaler_state_is_saved_and_restored(data, tmp_path):
    def scaled(seed=0):
        trainer = make_trainer(seed, precision="16-mixed")
        trainer.scaler._init_scale = 2.0**10
        return trainer

    torch.manual_seed(1)
    ref = scaled()
    ref_history = ref.fit(tensors(data), epochs=3)
    torch.manual_seed(1)
    first = scaled()
    first.fit(tensors(data), epochs=1)
    first.save_checkpoint(tmp_path / "s.pt")
    assert checkpoint.read(tmp_path / "s.pt")["scaler"]["scale"] == first.scaler.get_scale()
    resumed = scaled(seed=4)
    history = resumed.fit(tensors(data), epochs=3, resume_from=tmp_path / "s.pt")
    assert resumed.scaler.get_scale() == ref.scaler.get_scale()
    assert same_state(ref, resumed) and history.to_dict() == ref_history.to_dict()
    with pytest.warns(RuntimeWarning, match="holds a GradScaler state"):
        make_trainer().load_checkpoint(tmp_path / "s.pt")


def test_after_stage_runs_once_every_handler_of_the_stage_ran():
    seen = []

    class Early(corolux.Callback):
        weight = -5

        def on_epoch_end(self, ctx):
            ctx.after_stage(lambda c: seen.append(("after", c.stage, list(order))))

    order = []

    class Late(corolux.Callback):
        weight = float("inf")

        def on_epoch_end(self, ctx):
            order.append(ctx.epoch)

        def on_fit_end(self, ctx):
            with pytest.raises(RuntimeError, match="does not go on after this stage"):
                ctx.after_stage(print)

    make_trainer().fit(
        (torch.randn(8, 64), torch.randint(0, 10, (8,))), epochs=2, callbacks=[Early(), Late()]
    )
    assert seen == [("after", "on_epoch_end", [1]), ("after", "on_epoch_end", [1, 2])]


def test_subclasses_of_plain_types_are_refused_at_save_and_numpy_scalars_logged_are_floats(tmp_path):
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Holds(corolux.Callback):
        def on_epoch_end(self, ctx):
            ctx.log("sk_auc", np.float64(0.75))  # what scikit-learn's metrics return

        def state_dict(self):
            return {"color": Color.RED}

        def load_state_dict(self, state):
            pass

    trainer = make_trainer()
    history = trainer.fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), epochs=1, callbacks=[Holds()])
    assert type(history["sk_auc"][0]) is float
    with pytest.raises(TypeError, match=r"\['Holds'\]\['color'\] is a .*Color.*an enum with .value"):
        trainer.save_checkpoint(tmp_path / "bad.pt")
    Holds.state_dict = lambda self: {"n": 1}
    trainer.fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), epochs=1, callbacks=[Holds()])
    trainer.save_checkpoint(tmp_path / "good.pt")
    assert checkpoint.read(tmp_path / "good.pt")["history"]["records"][0]["sk_auc"] == 0.75


def test_a_refused_resume_changes_nothing(tmp_path):
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    trainer = make_trainer()
    trainer.fit((x, y), epochs=1, callbacks=[Counter()])
    trainer.save_checkpoint(tmp_path / "cb.pt")
    other = make_trainer(seed=3)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"callback\(s\) \['Counter'\]"):
        other.fit((x, y), epochs=2, resume_from=tmp_path / "cb.pt")
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert other.optimizers["opt"].state_dict()["state"] == {}


class Accumulate(corolux.Callback):
    def setup(self, ctx):
        ctx.accumulate_steps = 2


def test_autoresume_never_saves_inside_an_accumulation_window(data, tmp_path):
    ref, ref_history = reference(data, tensors, callbacks=[Accumulate()])
    path = tmp_path / "acc.pt"
    for kill in [(1, 3), (1, 6)]:  # killed twice at the same place: a resume of a resumed run
        torch.manual_seed(1)
        with pytest.raises(SystemExit):
            make_trainer().fit(
                tensors(data),
                epochs=EPOCHS,
                valid_data=(data[2], data[3]),
                callbacks=[Accumulate(), AutoResume(path, every_n_steps=1), Kill(*kill)],
            )
        saved = checkpoint.read(path)
        assert saved["position"]["batches_done"] % 2 == 0  # after an optimizer step only
    resumed = make_trainer(seed=2)
    history = resumed.fit(
        tensors(data),
        epochs=EPOCHS,
        valid_data=(data[2], data[3]),
        callbacks=[Accumulate(), AutoResume(path, 1)],
    )
    assert same_state(ref, resumed) and history.to_dict() == ref_history.to_dict()


def test_resume_from_last_after_a_stop_inside_an_epoch_keeps_its_loss_exact(data):
    ref, ref_history = reference(data, tensors)
    torch.manual_seed(1)
    trainer = make_trainer()
    trainer.fit(tensors(data), epochs=EPOCHS, valid_data=(data[2], data[3]), max_steps=20)
    history = trainer.fit(tensors(data), epochs=EPOCHS, valid_data=(data[2], data[3]), resume_from="last")
    assert same_state(ref, trainer) and history.to_dict() == ref_history.to_dict()


def test_autoresume_keeps_its_file_after_max_steps_and_a_resumed_run_takes_no_more(tmp_path):
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    path = tmp_path / "steps.pt"
    make_trainer().fit((x, y), epochs=5, max_steps=3, callbacks=[AutoResume(path, every_n_steps=3)])
    assert path.exists()  # DESIGN section 8: only a finished or early-stopped training deletes it
    count = Count()
    history = make_trainer().fit((x, y), epochs=5, max_steps=3, callbacks=[AutoResume(path, 3), count])
    assert count.batches == [] and history.stop_reason == "max_steps"


def test_autoresume_names_its_file_when_it_belongs_to_another_model(tmp_path):
    path = tmp_path / "auto.pt"
    make_trainer().save_checkpoint(path)
    other = corolux.Trainer(
        torch.nn.Linear(64, 10),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p),
    )
    with pytest.raises(
        CheckpointError, match="another model.*It is AutoResume's file: to start afresh, delete it"
    ):
        other.fit((torch.randn(8, 64), torch.randint(0, 10, (8,))), callbacks=[AutoResume(path)])
    assert path.exists()


def test_a_mid_epoch_resume_with_loader_workers_warns_that_their_draws_restart(data, tmp_path):
    def workers(d):
        return DataLoader(TensorDataset(d[0], d[1]), batch_size=32, shuffle=True, num_workers=1)

    path = tmp_path / "w.pt"
    with pytest.raises(SystemExit):
        make_trainer().fit(workers(data), epochs=2, callbacks=[AutoResume(path, every_n_steps=3), Kill(1, 4)])
    with pytest.warns(RuntimeWarning, match="num_workers=1: the batches are the same"):
        make_trainer().fit(workers(data), epochs=2, callbacks=[AutoResume(path, every_n_steps=3)])


def test_checkpoint_files_get_the_permissions_open_gives_not_owner_only(tmp_path):
    mask = os.umask(0o022)
    try:
        make_trainer().save_checkpoint(tmp_path / "p.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "p.pt").stat().st_mode & 0o777 == 0o644


def test_torchmetrics_accumulators_resume_inside_an_epoch(data, tmp_path):
    torchmetrics = pytest.importorskip("torchmetrics")

    def metrics():
        return [torchmetrics.classification.MulticlassF1Score(num_classes=10, average="macro")]

    ref, ref_history = reference(data, loader, metrics=metrics())
    path = tmp_path / "tm.pt"
    torch.manual_seed(1)
    with pytest.raises(SystemExit):
        make_trainer(metrics=metrics()).fit(
            loader(data),
            epochs=EPOCHS,
            valid_data=(data[2], data[3]),
            callbacks=[AutoResume(path, every_n_steps=4), Kill(epoch=2, batch=10)],
        )
    resumed = make_trainer(seed=3, metrics=metrics())
    history = resumed.fit(
        loader(data),
        epochs=EPOCHS,
        valid_data=(data[2], data[3]),
        callbacks=[AutoResume(path, every_n_steps=4)],
    )
    assert "train_multiclass_f1_score" in history
    assert same_state(ref, resumed) and history.to_dict() == ref_history.to_dict()


@pytest.mark.parametrize("how", ["a callback's error", "the loop's error", "close()"])
def test_a_fit_that_ended_inside_a_batch_leaves_nothing_to_continue_from(how):
    """resume_from='last' continues only from a point between batches: a fit that a callback's
    error, a step's error or a close() ended inside a batch is refused, with the reason."""
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    trainer = make_trainer()

    class FailAtBatch3(corolux.Callback):
        def on_train_batch_after_loss(self, ctx):
            if ctx.iter == 3:
                raise RuntimeError("failed on purpose")

    if how == "close()":
        s = trainer.stepper((x, y), epochs=2, batch_size=8)
        s.until("on_train_batch_after_loss")
        s.close()
    else:
        if how == "the loop's error":
            trainer.loss_fn = lambda pred, target: (_ for _ in ()).throw(RuntimeError("failed on purpose"))
        callbacks = [FailAtBatch3()] if how == "a callback's error" else []
        with pytest.raises(RuntimeError, match="failed on purpose"):
            trainer.fit((x, y), epochs=2, batch_size=8, callbacks=callbacks)
    with pytest.raises(ValueError, match=r"resume_from='last': the last fit ended inside a batch"):
        trainer.fit((x, y), epochs=2, batch_size=8, resume_from="last")
