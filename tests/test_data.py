"""What data a Trainer accepts and how it batches it (DESIGN §5 Data, §8 Data)."""

from __future__ import annotations

import pytest
import torch
from realdata import iris
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

import corolux
import corolux.data
from corolux.data import TensorBatches

F = torch.nn.functional


def indexed(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real iris inputs whose targets are their row numbers (to see order and splits);
    the loss is an MSE on the row number so any index is a valid target."""
    x, _ = iris(n)
    return x, torch.arange(n)


def trainer_for(model: torch.nn.Module | None = None, **kwargs) -> corolux.Trainer:
    kwargs.setdefault("loss_fn", F.cross_entropy)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05))
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return corolux.Trainer(model if model is not None else torch.nn.Linear(4, 3), **kwargs)


def index_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.squeeze(-1), target.float())


class BatchLog(corolux.Callback):
    """Records each batch's (phase, epoch, input, target) as the step sees it."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, object, object]] = []

    def _log(self, ctx) -> None:
        self.batches.append((ctx.phase, ctx.epoch, ctx.input, ctx.target))

    on_train_batch_after_pred = _log
    on_valid_batch_after_pred = _log

    def targets(self, phase: str, epoch: int | None = None) -> list[torch.Tensor]:
        return [t for p, e, _, t in self.batches if p == phase and (epoch is None or e == epoch)]

    def sizes(self, phase: str, epoch: int | None = None) -> list[int]:
        return [len(t) for t in self.targets(phase, epoch)]


def fit_log(data, *, model=None, trainer_kwargs=None, **fit_kwargs) -> BatchLog:
    log = BatchLog()
    trainer_for(model, **(trainer_kwargs or {})).fit(data, callbacks=[log], **fit_kwargs)
    return log


# -- kinds of data -----------------------------------------------------------------------------


def test_dataloader_is_used_as_it_is():
    x, y = iris()
    loader = DataLoader(TensorDataset(x, y), batch_size=40)
    log = fit_log(loader, epochs=2)
    assert log.sizes("train", 1) == [40, 40, 40, 30]
    assert torch.equal(torch.cat(log.targets("train", 1)), y)  # not reshuffled by corolux


def test_list_of_batches_is_used_as_it_is():
    x, y = iris()
    batches = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 150, 50)]
    log = fit_log(batches, epochs=2)
    assert log.sizes("train", 1) == [50, 50, 50]
    assert log.sizes("train", 2) == [50, 50, 50]
    for (_, _, inp, tgt), (bx, by) in zip(log.batches[:3], batches, strict=True):
        assert inp is bx and tgt is by


def test_list_batches_may_be_lists():
    x, y = iris()
    log = fit_log([[x[:75], y[:75]], [x[75:], y[75:]]])
    assert log.sizes("train") == [75, 75]


class RowDataset(Dataset):
    """A map-style dataset of (row, index) samples."""

    def __init__(self, n: int) -> None:
        self.x, self.y = indexed(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _regressor() -> torch.nn.Module:
    return torch.nn.Linear(4, 1)


@pytest.mark.parametrize("kind", ["pair", "dataset", "numpy"])
def test_batched_for_you_default_32_last_partial_kept_training_shuffled(kind):
    n = 70
    x, y = indexed(n)
    data = {
        "pair": (x, y),
        "dataset": RowDataset(n),
        "numpy": (x.numpy(), y.numpy()),
    }[kind]
    valid = {"pair": (x, y), "dataset": RowDataset(n), "numpy": (x.numpy(), y.numpy())}[kind]
    log = fit_log(
        data, epochs=2, valid_data=valid, model=_regressor(), trainer_kwargs={"loss_fn": index_loss}
    )
    for epoch in (1, 2):
        assert log.sizes("train", epoch) == [32, 32, 6]
        assert log.sizes("valid", epoch) == [32, 32, 6]
        seen = torch.cat(log.targets("train", epoch))
        assert sorted(seen.tolist()) == list(range(n))  # every sample once per epoch
        assert torch.cat(log.targets("valid", epoch)).tolist() == list(range(n))  # not shuffled
    first, second = (torch.cat(log.targets("train", e)).tolist() for e in (1, 2))
    assert first != list(range(n)) and second != list(range(n)) and first != second  # shuffled
    inputs = [inp for p, _, inp, _ in log.batches if p == "train"]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in inputs)


@pytest.mark.parametrize("batch_size", [1, 10, 64, 500])
def test_batch_size_for_a_pair(batch_size):
    x, y = iris(64)
    log = fit_log((x, y), batch_size=batch_size)
    full, rest = divmod(64, batch_size)
    assert log.sizes("train") == [batch_size] * full + ([rest] if rest else [])


@pytest.mark.parametrize("batch_size", [0, -3, 2.5])
def test_bad_batch_size_is_rejected(batch_size):
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        trainer_for().fit(iris(), batch_size=batch_size)


def test_numpy_pair_trains():
    x, y = iris()
    model = torch.nn.Linear(4, 3)
    trainer = trainer_for(model, optimizer=lambda p: torch.optim.Adam(p, lr=0.05))
    history = trainer.fit((x.numpy(), y.numpy()), epochs=5)
    assert history["train_loss"][-1] < history["train_loss"][0]
    result = trainer.evaluate((x.numpy(), y.numpy()))
    assert result["loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def test_mismatched_pair_lengths_is_a_value_error():
    x, y = iris()
    with pytest.raises(ValueError, match="length"):
        trainer_for().fit((x, y[:-1]))


def test_dict_batches():
    x, y = iris()
    batches = [{"input": x[i : i + 50], "target": y[i : i + 50]} for i in range(0, 150, 50)]
    log = fit_log(batches, epochs=1, valid_data=batches[:1])
    assert log.sizes("train") == [50, 50, 50]
    assert log.sizes("valid") == [50]
    assert torch.equal(log.batches[0][2], x[:50]) and torch.equal(log.batches[0][3], y[:50])


class DictDataset(Dataset):
    def __init__(self) -> None:
        self.x, self.y = iris()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"input": self.x[i], "target": self.y[i]}


def test_dict_samples_batched_by_a_dataloader():
    log = fit_log(DataLoader(DictDataset(), batch_size=50))
    assert log.sizes("train") == [50, 50, 50]


def test_dict_dataset_batched_by_corolux():
    log = fit_log(DictDataset(), batch_size=100)
    assert log.sizes("train") == [100, 50]


def test_unpack_handles_any_layout():
    x, y = iris()
    batches = [{"features": x[i : i + 50], "label": y[i : i + 50], "id": i} for i in range(0, 150, 50)]
    trainer = trainer_for(unpack=lambda b: (b["features"], b["label"]))
    log = BatchLog()
    trainer.fit(batches, callbacks=[log], valid_data=batches)
    assert log.sizes("train") == [50, 50, 50]
    assert torch.equal(log.batches[0][2], x[:50])
    result = trainer.evaluate(batches)
    assert set(result) == {"loss"}


def test_unpack_reorders_a_pair():
    x, y = iris()
    trainer = trainer_for(unpack=lambda b: (b[1], b[0]))
    log = BatchLog()
    trainer.fit([(y, x)], callbacks=[log])
    assert torch.equal(log.batches[0][2], x) and torch.equal(log.batches[0][3], y)


@pytest.mark.parametrize(
    "batch",
    [
        "triple",
        "dict_without_input",
        "tensor",
    ],
)
def test_a_batch_of_another_layout_names_unpack(batch):
    x, y = iris()
    bad = {
        "triple": (x, y, y),
        "dict_without_input": {"features": x, "label": y},
        "tensor": x,
    }[batch]
    error = ValueError if batch == "tensor" else TypeError  # a tensor is an input without a target
    with pytest.raises(error, match=r"Trainer\(unpack="):
        trainer_for().fit([bad])


def test_non_callable_unpack_is_rejected():
    with pytest.raises(TypeError, match="unpack"):
        trainer_for(unpack="input")


@pytest.mark.parametrize("kind", ["dataloader", "list"])
def test_batch_size_with_already_batched_data_is_a_value_error(kind):
    x, y = iris()
    data = DataLoader(TensorDataset(x, y), batch_size=10) if kind == "dataloader" else [(x, y)]
    with pytest.raises(ValueError, match="batch_size"):
        trainer_for().fit(data, batch_size=16)


def test_batch_size_with_an_already_batched_evaluate_is_a_value_error():
    x, y = iris()
    with pytest.raises(ValueError, match="batch_size"):
        trainer_for().evaluate([(x, y)], batch_size=16)


# -- valid_data as a fraction ------------------------------------------------------------------


def _split_targets(log: BatchLog) -> tuple[list[int], list[int]]:
    train = torch.cat(log.targets("train", 1)).tolist()
    valid = torch.cat(log.targets("valid", 1)).tolist()
    return train, valid


@pytest.mark.parametrize("kind", ["pair", "numpy", "dataset"])
def test_valid_fraction_splits_a_pair_or_dataset(kind):
    n = 100
    x, y = indexed(n)
    data = {"pair": (x, y), "numpy": (x.numpy(), y.numpy()), "dataset": RowDataset(n)}[kind]
    log = fit_log(
        data,
        valid_data=0.2,
        batch_size=16,
        epochs=2,
        model=_regressor(),
        trainer_kwargs={"loss_fn": index_loss},
    )
    train, valid = _split_targets(log)
    assert len(train) == 80 and len(valid) == 20
    assert sorted(train + valid) == list(range(n))  # disjoint, and nothing lost
    assert log.sizes("train", 1) == [16] * 5
    assert log.sizes("valid", 1) == [16, 4]
    train2 = torch.cat(log.targets("train", 2)).tolist()
    valid2 = torch.cat(log.targets("valid", 2)).tolist()
    assert sorted(train2) == sorted(train)  # the same split every epoch
    assert valid2 == valid
    assert valid != sorted(valid) or train != sorted(train)  # a random split, not the tail


def test_valid_fraction_split_is_the_same_on_every_run():
    runs = []
    for _ in range(2):
        log = fit_log(
            indexed(60), valid_data=0.25, model=_regressor(), trainer_kwargs={"loss_fn": index_loss}
        )
        runs.append(sorted(torch.cat(log.targets("valid")).tolist()))
    assert runs[0] == runs[1]
    assert len(runs[0]) == 15


def _tagging_collate(samples):
    xs, ys = zip(*samples, strict=True)
    return {"input": torch.stack(xs), "target": torch.stack(ys), "tag": "mine"}


def test_valid_fraction_rebuilds_a_dataloader_keeping_batch_size_and_collate():
    n = 100
    x, y = indexed(n)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True, collate_fn=_tagging_collate)
    seen = []

    class Tags(corolux.Callback):
        def on_train_batch_begin(self, ctx):
            seen.append(("train", ctx.batch["tag"], len(ctx.target)))

        def on_valid_batch_begin(self, ctx):
            seen.append(("valid", ctx.batch["tag"], len(ctx.target)))

        def on_fit_begin(self, ctx):
            for data in (ctx.train_data, ctx.valid_data):
                assert isinstance(data, DataLoader)
                assert data.batch_size == 7
                assert data.collate_fn is _tagging_collate

    log = BatchLog()
    trainer_for(_regressor(), loss_fn=index_loss).fit(
        loader, valid_data=0.2, epochs=2, callbacks=[Tags(), log]
    )
    assert {tag for _, tag, _ in seen} == {"mine"}
    assert [s for p, _, s in seen if p == "train"] == ([7] * 11 + [3]) * 2
    assert [s for p, _, s in seen if p == "valid"] == [7, 7, 6] * 2
    train, valid = _split_targets(log)
    assert sorted(train + valid) == list(range(n))
    train2 = torch.cat(log.targets("train", 2)).tolist()
    valid2 = torch.cat(log.targets("valid", 2)).tolist()
    assert valid2 == valid  # the validation loader is not shuffled
    assert sorted(train2) == sorted(train) and train2 != train  # the training one still is


def test_valid_fraction_of_a_list_is_a_type_error():
    x, y = iris()
    with pytest.raises(TypeError, match="valid_data"):
        trainer_for().fit([(x, y)], valid_data=0.2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_valid_fraction_out_of_range_is_a_value_error(fraction):
    with pytest.raises(ValueError, match="valid_data"):
        trainer_for().fit(iris(), valid_data=fraction)


@pytest.mark.parametrize("number", [0, 1, True])
def test_valid_data_as_an_int_says_fractions_are_floats_in_0_1(number):
    with pytest.raises(ValueError, match=r"must be a float in \(0, 1\), e\.g\. valid_data=0\.2"):
        trainer_for().fit(iris(), valid_data=number)


# -- iterators, empty and wrong data --------------------------------------------------------------


def test_one_shot_iterator_is_accepted_for_one_epoch():
    x, y = iris()
    batches = iter([(x[:75], y[:75]), (x[75:], y[75:])])
    log = fit_log(batches, epochs=1)
    assert log.sizes("train") == [75, 75]


def test_generator_is_accepted_for_one_epoch_and_as_validation_data():
    x, y = iris()
    gen = ((x[i : i + 50], y[i : i + 50]) for i in range(0, 150, 50))
    valid = ((x[i : i + 50], y[i : i + 50]) for i in range(0, 150, 50))
    log = fit_log(gen, epochs=1, valid_data=valid)
    assert log.sizes("train") == [50, 50, 50]
    assert log.sizes("valid") == [50, 50, 50]


@pytest.mark.parametrize("epochs", [2, (1, 3)])
def test_one_shot_iterator_for_several_epochs_is_a_type_error(epochs):
    x, y = iris()
    with pytest.raises(TypeError, match=r"list.*Dataset.*DataLoader|DataLoader.*list"):
        trainer_for().fit(iter([(x, y)]), epochs=epochs)


def test_one_shot_validation_iterator_for_several_epochs_is_a_type_error():
    x, y = iris()
    with pytest.raises(TypeError, match="valid_data"):
        trainer_for().fit([(x, y)], epochs=2, valid_data=iter([(x, y)]))


@pytest.mark.parametrize(
    "empty",
    ["list", "pair", "dataset", "dataloader", "generator"],
)
def test_empty_data_is_a_value_error(empty):
    data = {
        "list": lambda: [],
        "pair": lambda: (torch.empty(0, 4), torch.empty(0, dtype=torch.long)),
        "dataset": lambda: TensorDataset(torch.empty(0, 4), torch.empty(0, dtype=torch.long)),
        "dataloader": lambda: DataLoader(TensorDataset(torch.empty(0, 4), torch.empty(0))),
        "generator": lambda: (b for b in []),
    }[empty]()
    with pytest.raises(ValueError, match="empty|no batches"):
        trainer_for().fit(data)


def test_empty_validation_data_is_a_value_error():
    with pytest.raises(ValueError):
        trainer_for().fit(iris(), valid_data=[])


@pytest.mark.parametrize("bad", [42, object(), None, 3.5])
def test_non_iterable_data_is_a_type_error(bad):
    with pytest.raises(TypeError, match="train_data"):
        trainer_for().fit(bad)


def test_non_iterable_evaluate_data_is_a_type_error():
    with pytest.raises(TypeError):
        trainer_for().evaluate(42)


# -- how the model is called ------------------------------------------------------------------


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(2, 3)
        self.b = torch.nn.Linear(2, 3)
        self.calls: list[tuple[int, int]] = []

    def forward(self, left, right):
        self.calls.append((left.shape[0], right.shape[0]))
        return self.a(left) + self.b(right)


def test_tuple_input_is_spread_as_positional_arguments():
    x, y = iris()
    model = TwoInputs()
    batches = [((x[i : i + 50, :2], x[i : i + 50, 2:]), y[i : i + 50]) for i in range(0, 150, 50)]
    trainer = trainer_for(model)
    history = trainer.fit(batches, epochs=2, valid_data=batches[:1])
    assert model.calls[:3] == [(50, 50)] * 3
    assert len(history["valid_loss"]) == 2
    preds = trainer.predict([(inp,) for inp, _ in batches])
    assert preds.shape == (150, 3)


def test_list_input_is_spread_as_positional_arguments():
    x, y = iris()
    model = TwoInputs()
    trainer_for(model).fit([([x[:, :2], x[:, 2:]], y)])
    assert model.calls == [(150, 150)]


def test_dict_input_is_spread_as_keyword_arguments():
    x, y = iris()
    model = TwoInputs()
    batches = [
        ({"right": x[i : i + 50, 2:], "left": x[i : i + 50, :2]}, y[i : i + 50]) for i in range(0, 150, 50)
    ]
    trainer = trainer_for(model)
    trainer.fit(batches)
    assert model.calls == [(50, 50)] * 3
    result = trainer.evaluate(batches)
    with torch.no_grad():
        expected = F.cross_entropy(model.a(x[:, :2]) + model.b(x[:, 2:]), y)
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_dict_batch_with_dict_input():
    x, y = iris()
    model = TwoInputs()
    batches = [{"input": {"left": x[:, :2], "right": x[:, 2:]}, "target": y}]
    trainer_for(model).fit(batches)
    assert model.calls == [(150, 150)]


# -- order of work (DESIGN §8 Data) -------------------------------------------------------------


class ModelDependentBatches:
    """Batches built from the model as it is when each one is requested (as RL episodes or
    hard-negative mining are); records the weight it saw and when it was asked."""

    def __init__(self, model: torch.nn.Module, events: list[str], n: int = 4) -> None:
        self.model, self.events, self.n = model, events, n
        self.seen: list[torch.Tensor] = []

    def __iter__(self):
        x, y = iris(8 * self.n)
        for i in range(self.n):
            self.seen.append(self.model.weight.detach().clone())
            self.events.append(f"fetch {i + 1}")
            yield x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)]


@pytest.mark.parametrize("drive", ["fit", "run"])
def test_the_next_batch_is_requested_after_this_batchs_end_handlers(drive):
    events: list[str] = []
    model = torch.nn.Linear(4, 3)
    data = ModelDependentBatches(model, events)
    ends = corolux.callback("ends", on_train_batch_end=lambda self, ctx: events.append(f"end {ctx.iter}"))()
    trainer = trainer_for(model)
    if drive == "fit":
        trainer.fit(data, epochs=1, callbacks=[ends])
    else:
        for _ in trainer.run(data, epochs=1, callbacks=[ends]):
            pass
    assert events == ["fetch 1", "end 1", "fetch 2", "end 2", "fetch 3", "end 3", "fetch 4", "end 4"]
    # Each batch was built from the weights that the previous batch's step produced.
    assert all(not torch.equal(a, b) for a, b in zip(data.seen, data.seen[1:], strict=False))


def test_is_last_batch_comes_from_the_length():
    seen: list[tuple[int, bool]] = []
    log = corolux.callback(
        "log", on_train_batch_begin=lambda self, ctx: seen.append((ctx.iter, ctx.is_last_batch))
    )()
    x, y = iris(40)
    trainer_for().fit((x, y), epochs=1, batch_size=16, callbacks=[log])
    assert seen == [(1, False), (2, False), (3, True)]


def test_predict_over_a_dataloader_of_bare_tensors():
    # DataLoader(x) yields bare tensors: each batch is the input alone (DESIGN §8 Data).
    x, _ = iris(40)
    trainer = trainer_for()
    expected = trainer.predict(x, batch_size=16)
    assert torch.equal(trainer.predict(DataLoader(x, batch_size=16)), expected)
    assert expected.shape == (40, 3)


# -- in-memory data: batched by indexing, with a DataLoader's RNG draws ---------------------------


def _textbook(model, opt, train_loader, valid_loader, epochs):
    """pytorch/examples' loop: DataLoaders, dropout in training, no_grad validation."""
    losses = []
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        if valid_loader is not None:
            model.eval()
            with torch.no_grad():
                for x, y in valid_loader:
                    losses.append(F.cross_entropy(model(x), y))
    return losses


def _dropout_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)
    )


class LossLog(corolux.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_after_loss(self, ctx) -> None:
        self.losses.append(ctx.loss.detach().clone())

    def on_valid_batch_after_loss(self, ctx) -> None:
        self.losses.append(ctx.loss.detach().clone())


@pytest.mark.parametrize("given", ["pair", "tensor_dataset", "fraction"])
def test_in_memory_data_trains_bit_identically_to_the_textbook_dataloader_loop(given):
    x, y = iris()
    xv, yv = iris(40)
    hand, ours = _dropout_net(), _dropout_net()
    hand_opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    if given == "fraction":  # valid_data=0.2: the same random_split, then DataLoaders over the Subsets
        train_part, valid_part = random_split(
            TensorDataset(x, y), [120, 30], generator=torch.Generator().manual_seed(0)
        )
        loaders = DataLoader(train_part, batch_size=16, shuffle=True), DataLoader(valid_part, batch_size=16)
    else:
        loaders = (
            DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
            DataLoader(TensorDataset(xv, yv), batch_size=16),
        )
    torch.manual_seed(7)
    expected = _textbook(hand, hand_opt, *loaders, epochs=3)
    rng_after_hand = torch.get_rng_state()

    train, valid = {
        "pair": ((x, y), (xv, yv)),
        "tensor_dataset": (TensorDataset(x, y), TensorDataset(xv, yv)),
        "fraction": ((x, y), 0.2),
    }[given]
    trainer = trainer_for(ours, optimizer=torch.optim.SGD(ours.parameters(), lr=0.1))
    log = LossLog()
    torch.manual_seed(7)
    trainer.fit(train, epochs=3, valid_data=valid, batch_size=16, callbacks=[log])
    assert len(log.losses) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(log.losses, expected, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(hand.state_dict().values(), ours.state_dict().values(), strict=True)
    )
    assert torch.equal(torch.get_rng_state(), rng_after_hand)  # the same draws, no more and no fewer


def test_in_memory_data_is_indexed_not_read_sample_by_sample():
    class Counted(TensorDataset):
        reads = 0

        def __getitem__(self, index):
            Counted.reads += 1
            return super().__getitem__(index)

    x, y = iris(64)
    seen: list[type] = []
    probe = corolux.callback("probe", on_fit_begin=lambda self, ctx: seen.append(type(ctx.train_data)))()
    trainer_for().fit(TensorDataset(x, y), epochs=1, batch_size=16, callbacks=[probe])
    assert seen[0].__name__ == "TensorBatches"
    # A subclass may override __getitem__ (augmentation): it keeps going through a DataLoader.
    trainer_for().fit(Counted(x, y), epochs=1, batch_size=16, callbacks=[probe])
    assert seen[1] is DataLoader and Counted.reads == 64


def test_validation_and_prediction_batches_of_a_tensor_are_views_without_copies():
    x, y = iris(50)
    storages: list[int] = []
    probe = corolux.callback(
        "probe",
        on_valid_batch_begin=lambda self, ctx: storages.append(ctx.input.untyped_storage().data_ptr()),
        on_predict_batch_begin=lambda self, ctx: storages.append(ctx.input.untyped_storage().data_ptr()),
    )()
    trainer = trainer_for()
    trainer.evaluate((x, y), batch_size=20, callbacks=[probe])
    trainer.predict(x, batch_size=20, callbacks=[probe])
    assert storages == [x.untyped_storage().data_ptr()] * 6


def test_in_memory_batches_have_a_dataloaders_length_and_sizes():
    x, y = iris(70)
    for batch_size in (1, 16, 70, 100):
        batches = TensorBatches((x, y), None, batch_size=batch_size, shuffle=True)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
        assert len(batches) == len(loader)
        assert [len(b[0]) for b in batches] == [len(b[0]) for b in loader]


@pytest.fixture(params=[None, 7], ids=["chunks", "chunks-of-7"])
def chunk_batches(request, monkeypatch):
    """The batches TensorBatches makes at a time: its own (more than these tests' passes have),
    or 7, so that a pass crosses chunk boundaries and ends with a partial chunk."""
    if request.param is not None:
        monkeypatch.setattr(corolux.data, "_CHUNK_BATCHES", request.param)
    return request.param


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [16, 3])  # 5 batches; 50
def test_in_memory_batches_equal_a_dataloaders_for_one_two_or_three_tensors(
    count, shuffle, batch_size, chunk_batches
):
    x, y = iris(150)
    tensors = (x, y, torch.arange(150.0))[:count]
    torch.manual_seed(5)
    ours = [tuple(batch) for batch in TensorBatches(tensors, None, batch_size=batch_size, shuffle=shuffle)]
    torch.manual_seed(5)
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)
    theirs = [tuple(batch) for batch in loader]
    assert len(ours) == len(theirs) == -(-150 // batch_size)
    for a, b in zip(ours, theirs, strict=True):
        assert type(a) is tuple and len(a) == count
        assert all(torch.equal(s, t) for s, t in zip(a, b, strict=True))


def test_a_pass_resumed_after_some_batches_gives_the_rest_of_the_same_shuffled_order(chunk_batches):
    x, y = iris(150)
    torch.manual_seed(2)
    whole = list(TensorBatches((x, y), None, batch_size=3, shuffle=True))
    torch.manual_seed(2)
    rest = list(TensorBatches((x, y), None, batch_size=3, shuffle=True).iter_from(37))  # mid-chunk
    assert len(rest) == len(whole) - 37
    for (a, b), (c, d) in zip(rest, whole[37:], strict=True):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_shuffled_batches_share_one_gather_only_while_it_stays_small():
    def storages(row_features: int) -> set[int]:
        x = torch.randn(64, row_features)
        batches = list(TensorBatches((x, torch.arange(64)), None, batch_size=8, shuffle=True))  # all alive
        return {b[0].untyped_storage().data_ptr() for b in batches}

    assert len(storages(4)) == 1  # 8 batches of 8 small rows: one gather
    assert len(storages(1 << 15)) == 8  # 8 rows of 128 KiB make 1 MiB: a gather per batch
