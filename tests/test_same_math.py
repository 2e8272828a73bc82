"""fit() does the same math as a hand-written loop, bit for bit, RNG draws in the same order included.

Each test runs a textbook PyTorch loop and ``Trainer(...).fit(...)`` side by side, from the same
seeds, and compares with ``torch.equal`` (never allclose): every tensor of the final
``state_dict()``, the optimizer's state, and the per-batch losses. Where it is cheap, a
deliberately WRONG hand loop (one that asks for the next batch before the step, one that scales
the last accumulation window by 1/steps, ...) is shown to differ, so each comparison has teeth.

Real data: scikit-learn's bundled digits and iris (``tests/realdata.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from realdata import digits, iris
from strategies import backward_and_step
from torch.utils.data import DataLoader, Dataset, TensorDataset

import corolux

F = torch.nn.functional
nn = torch.nn

MODEL_SEED = 0  # torch.manual_seed before building each model
RUN_SEED = 1234  # torch.manual_seed right before each training run


# -- comparing runs -----------------------------------------------------------------------------


def assert_same_weights(hand: nn.Module, lux: nn.Module) -> None:
    a, b = hand.state_dict(), lux.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"state_dict()[{name!r}] differs"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_same_optimizer_state(hand: torch.optim.Optimizer, lux: torch.optim.Optimizer) -> None:
    a, b = hand.state_dict()["state"], lux.state_dict()["state"]
    assert a.keys() == b.keys()
    for index in a:
        assert a[index].keys() == b[index].keys()
        for name, value in a[index].items():
            other = b[index][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"optimizer state[{index}][{name!r}] differs"
            else:
                assert value == other, f"optimizer state[{index}][{name!r}] differs"


def assert_same_tensors(hand: list[torch.Tensor], lux: list[torch.Tensor], what: str) -> None:
    assert len(hand) == len(lux), f"{what}: {len(hand)} in the hand loop, {len(lux)} under fit()"
    for i, (a, b) in enumerate(zip(hand, lux, strict=True)):
        assert torch.equal(a, b), f"{what}: entry {i} differs ({a} vs {b})"


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def only_optimizer(trainer: corolux.Trainer) -> torch.optim.Optimizer:
    (opt,) = trainer.optimizers.values()
    return opt


class Rec(corolux.Callback):
    """Records what fit() computed: per-batch train and valid losses, and ctx.step at the end."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.valid_losses: list[torch.Tensor] = []
        self.final_step: int | None = None

    def on_train_batch_after_loss(self, ctx: Any) -> None:
        self.losses.append(ctx.loss.detach().clone())

    def on_valid_batch_after_loss(self, ctx: Any) -> None:
        self.valid_losses.append(ctx.loss.detach().clone())

    def on_fit_end(self, ctx: Any) -> None:
        self.final_step = ctx.step


def lux_trainer(model: nn.Module, **kwargs: Any) -> corolux.Trainer:
    return corolux.Trainer(model, device="cpu", progress=False, **kwargs)


def validate(model: nn.Module, loader: DataLoader, loss_fn: Any) -> list[torch.Tensor]:
    """The hand loops' validation: eval mode, no_grad, one mean loss per batch."""
    model.eval()
    losses = []
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            losses.append(loss_fn(out, y))
    return losses


# -- (a) a pytorch/examples-style script: a Dataset drawing from torch's global RNG ---------------


class AugmentedDigits(Dataset):
    """8x8 digits; ``__getitem__`` draws from torch's GLOBAL RNG: a random horizontal flip and
    additive noise, as a torchvision-style transform would."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = True) -> None:
        self.x, self.y, self.augment = x, y, augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.x[i].view(8, 8)
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            image = image + 0.05 * torch.randn_like(image)
        return image.reshape(64), self.y[i]


def augmented_loaders(with_valid: bool) -> tuple[DataLoader, DataLoader | None]:
    """Fresh loaders, built identically for each run: 192 training digits in 6 shuffled batches."""
    x, y = digits()
    train = DataLoader(AugmentedDigits(x[:192], y[:192]), batch_size=32, shuffle=True, num_workers=0)
    if not with_valid:
        return train, None
    valid = DataLoader(AugmentedDigits(x[192:320], y[192:320], augment=False), batch_size=64, shuffle=False)
    return train, valid


def dropout_mlp() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}


def textbook_loop(model, opt, train_data, epochs, valid_loader=None):
    """The textbook loop of (a) and (b); ``valid_loader``, when given, runs after each epoch."""
    losses, valid_losses = [], []
    for _ in range(epochs):
        model.train()
        for x, y in train_data:
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        if valid_loader is not None:
            valid_losses += validate(model, valid_loader, F.cross_entropy)
    return losses, valid_losses


def prefetching_loop(model, opt, train_data, epochs, valid_loader=None):
    """WRONG on purpose: asks the data for batch k+1 before batch k's forward and step."""
    losses, valid_losses = [], []
    for _ in range(epochs):
        model.train()
        batches = iter(train_data)
        batch = next(batches, None)
        while batch is not None:
            following = next(batches, None)
            x, y = batch
            opt.zero_grad()
            out = model(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
            batch = following
        if valid_loader is not None:
            valid_losses += validate(model, valid_loader, F.cross_entropy)
    return losses, valid_losses


@pytest.mark.parametrize("with_valid", [False, True], ids=["no_valid", "valid_loader"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_dataset_rng_and_dropout_draws_interleave_as_in_a_for_loop(opt_name, with_valid):
    epochs = 3
    factory = OPTIMIZERS[opt_name]

    hand = dropout_mlp()
    hand_opt = factory(hand.parameters())
    train_loader, valid_loader = augmented_loaders(with_valid)
    torch.manual_seed(RUN_SEED)
    hand_losses, hand_valid = textbook_loop(hand, hand_opt, train_loader, epochs, valid_loader)

    lux = dropout_mlp()
    trainer = lux_trainer(lux, loss_fn=F.cross_entropy, optimizer=factory)
    rec = Rec()
    train_loader, valid_loader = augmented_loaders(with_valid)
    torch.manual_seed(RUN_SEED)
    trainer.fit(train_loader, epochs=epochs, valid_data=valid_loader, callbacks=[rec])

    assert len(hand_losses) == 6 * epochs
    assert_same_tensors(hand_losses, rec.losses, "per-batch train losses")
    assert_same_tensors(hand_valid, rec.valid_losses, "per-batch valid losses")
    assert_same_weights(hand, lux)
    assert_same_optimizer_state(hand_opt, only_optimizer(trainer))

    # Teeth: fetching batch k+1 before batch k's step moves the dataset's draws in front of
    # the dropout masks of batch k, so a look-ahead loop trains differently.
    wrong = dropout_mlp()
    wrong_opt = factory(wrong.parameters())
    train_loader, valid_loader = augmented_loaders(with_valid)
    torch.manual_seed(RUN_SEED)
    wrong_losses, _ = prefetching_loop(wrong, wrong_opt, train_loader, epochs, valid_loader)
    assert not same_tensors(wrong_losses, hand_losses)
    assert not same_weights(wrong, hand)


# -- (b) data that depends on the current model --------------------------------------------------


class HardestOf:
    """Hard-negative mining: each batch draws a pool of digits (global RNG), scores it with the
    CURRENT model under no_grad, and keeps the ``keep`` samples with the highest loss. Records the
    first layer's weight just before yielding each batch. Re-iterable, no ``__len__``."""

    def __init__(self, model: nn.Module, n_batches: int, pool: int = 96, keep: int = 24) -> None:
        self.model, self.n_batches, self.pool, self.keep = model, n_batches, pool, keep
        self.x, self.y = digits()
        self.weights: list[torch.Tensor] = []

    def __iter__(self):
        for _ in range(self.n_batches):
            idx = torch.randint(len(self.x), (self.pool,))
            with torch.no_grad():
                per_sample = F.cross_entropy(self.model(self.x[idx]), self.y[idx], reduction="none")
            hardest = idx[per_sample.topk(self.keep).indices]
            self.weights.append(self.model[0].weight.detach().clone())
            yield self.x[hardest], self.y[hardest]


class SizedHardestOf(HardestOf):
    def __len__(self) -> int:
        return self.n_batches


def plain_mlp() -> nn.Module:
    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def assert_same_run_on_model_dependent_data(
    hand_loop, make_model, data_class, n_batches, epochs, optimizer, **trainer_kwargs
) -> nn.Module:
    """Train ``make_model()`` on ``data_class(model, n_batches)`` by ``hand_loop(model, opt, data,
    epochs) -> losses`` and by fit(), from the same seeds, and check that each batch was drawn by
    the model the previous step left, and the same as in the hand loop; the same per-batch losses,
    final weights and steps. Returns the hand-trained model."""
    hand = make_model()
    hand_opt = optimizer(hand.parameters())
    hand_data = data_class(hand, n_batches)
    torch.manual_seed(RUN_SEED)
    hand_losses = hand_loop(hand, hand_opt, hand_data, epochs)

    lux = make_model()
    trainer = lux_trainer(lux, optimizer=optimizer, **trainer_kwargs)
    lux_data = data_class(lux, n_batches)
    rec = Rec()
    torch.manual_seed(RUN_SEED)
    trainer.fit(lux_data, epochs=epochs, callbacks=[rec])

    assert len(lux_data.weights) == epochs * n_batches
    # Batch 2 was drawn with the model that batch 1's step updated.
    assert not torch.equal(lux_data.weights[1], lux_data.weights[0])
    assert_same_tensors(hand_data.weights, lux_data.weights, f"weights seen by {data_class.__name__}")
    assert_same_tensors(hand_losses, rec.losses, "per-batch train losses")
    assert_same_weights(hand, lux)
    assert rec.final_step == epochs * n_batches
    return hand


@pytest.mark.parametrize("data_class", [HardestOf, SizedHardestOf], ids=["no_len", "len"])
def test_hard_negative_mining_sees_the_model_updated_by_the_previous_step(data_class):
    epochs, n_batches = 2, 5
    sgd = lambda params: torch.optim.SGD(params, lr=0.2)

    def hand_loop(model, opt, data, epochs):
        return textbook_loop(model, opt, data, epochs)[0]

    hand = assert_same_run_on_model_dependent_data(
        hand_loop, plain_mlp, data_class, n_batches, epochs, sgd, loss_fn=F.cross_entropy
    )

    # Teeth: a look-ahead loop mines batch 2 with batch 1's model (no step in between).
    wrong = plain_mlp()
    wrong_data = data_class(wrong, n_batches)
    torch.manual_seed(RUN_SEED)
    prefetching_loop(wrong, sgd(wrong.parameters()), wrong_data, epochs)
    assert torch.equal(wrong_data.weights[1], wrong_data.weights[0])
    assert not same_weights(wrong, hand)


class BanditRollouts:
    """A tiny contextual bandit on iris: the context is a flower's 4 features, pulling the arm of
    its species pays 1, any other arm 0. Each batch samples flowers (global RNG) and actions from
    the CURRENT policy (``torch.multinomial`` under no_grad), and records the policy's weight just
    before yielding ``(contexts, (actions, rewards))``. Re-iterable, no ``__len__``."""

    def __init__(self, policy: nn.Linear, n_batches: int, size: int = 24) -> None:
        self.policy, self.n_batches, self.size = policy, n_batches, size
        self.x, self.y = iris()
        self.weights: list[torch.Tensor] = []

    def __iter__(self):
        for _ in range(self.n_batches):
            idx = torch.randint(len(self.x), (self.size,))
            contexts = self.x[idx]
            with torch.no_grad():
                probs = self.policy(contexts).softmax(-1)
            actions = torch.multinomial(probs, 1).squeeze(1)
            rewards = (actions == self.y[idx]).float()
            self.weights.append(self.policy.weight.detach().clone())
            yield contexts, (actions, rewards)


class SizedBanditRollouts(BanditRollouts):
    def __len__(self) -> int:
        return self.n_batches


def reinforce_loss(logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    log_probs = F.log_softmax(logits, -1).gather(1, actions[:, None]).squeeze(1)
    return -(log_probs * (rewards - rewards.mean())).mean()


def reinforce_step(ctx):
    """A custom corolux step: the REINFORCE loss from the batch's actions and rewards."""
    actions, rewards = ctx.target
    ctx.pred = ctx.model(ctx.input)
    yield "on_train_batch_after_pred"
    ctx.loss = reinforce_loss(ctx.pred, actions, rewards)
    yield "on_train_batch_after_loss"
    yield from backward_and_step(ctx)


def bandit_policy() -> nn.Linear:
    torch.manual_seed(MODEL_SEED)
    return nn.Linear(4, 3)


def textbook_reinforce(policy, opt, rollouts, epochs):
    """The textbook loop with the REINFORCE loss of each batch's actions and rewards."""
    losses = []
    for _ in range(epochs):
        policy.train()
        for contexts, (actions, rewards) in rollouts:
            opt.zero_grad()
            logits = policy(contexts)
            loss = reinforce_loss(logits, actions, rewards)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
    return losses


@pytest.mark.parametrize("data_class", [BanditRollouts, SizedBanditRollouts], ids=["no_len", "len"])
def test_reinforce_rollouts_use_the_current_policy(data_class):
    epochs, n_batches = 3, 4
    sgd = lambda params: torch.optim.SGD(params, lr=0.5)
    assert_same_run_on_model_dependent_data(
        textbook_reinforce, bandit_policy, data_class, n_batches, epochs, sgd, train_step=reinforce_step
    )


# -- (c) gradient accumulation ---------------------------------------------------------------------


class Accumulate(corolux.Callback):
    """Sets the accumulation the default step owns (no built-in GradientAccumulation needed)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def setup(self, ctx: Any) -> None:
        ctx.accumulate_steps = self.n


class Unsized:
    """A generator-backed re-iterable of batches without ``__len__``."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __iter__(self):
        yield from self.batches


def digit_batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = digits()
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]


def momentum_sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def textbook_accumulation(model, opt, batches, steps, epochs):
    """Data with a length: step every ``steps`` batches and at the epoch's end; each loss is
    scaled by 1/steps, by 1/k in a last window of k < steps batches."""
    losses, optimizer_steps = [], 0
    n = len(batches)
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(batches, start=1):
            window_start = (i - 1) // steps * steps
            window = min(steps, n - window_start)
            out = model(x)
            loss = F.cross_entropy(out, y)
            (loss / window).backward()
            losses.append(loss.detach().clone())
            if i % steps == 0 or i == n:
                opt.step()
                opt.zero_grad()
                optimizer_steps += 1
    return losses, optimizer_steps


def textbook_unsized_accumulation(model, opt, batches, steps, epochs):
    """Data without a length: every loss scaled by 1/steps; the last, open window is stepped
    when the data ends."""
    losses, optimizer_steps = [], 0
    for _ in range(epochs):
        model.train()
        i = 0
        for x, y in batches:
            i += 1
            out = model(x)
            loss = F.cross_entropy(out, y)
            (loss / steps).backward()
            losses.append(loss.detach().clone())
            if i % steps == 0:
                opt.step()
                opt.zero_grad()
                optimizer_steps += 1
        if i % steps != 0:
            opt.step()
            opt.zero_grad()
            optimizer_steps += 1
    return losses, optimizer_steps


def assert_same_accumulation(textbook, data, n_batches: int, steps: int, epochs: int) -> nn.Module:
    """Train by the hand loop ``textbook`` and by fit() with ``Accumulate(steps)``, each on a
    fresh ``data()`` from the same seeds, and check the same optimizer steps (one per window),
    per-batch losses, weights and optimizer state. Returns the hand-trained model."""
    hand = plain_mlp()
    hand_opt = momentum_sgd(hand.parameters())
    torch.manual_seed(RUN_SEED)
    hand_losses, hand_steps = textbook(hand, hand_opt, data(), steps, epochs)

    lux = plain_mlp()
    trainer = lux_trainer(lux, loss_fn=F.cross_entropy, optimizer=momentum_sgd)
    rec = Rec()
    torch.manual_seed(RUN_SEED)
    trainer.fit(data(), epochs=epochs, callbacks=[Accumulate(steps), rec])

    assert hand_steps == epochs * -(-n_batches // steps)
    assert rec.final_step == hand_steps
    assert_same_tensors(hand_losses, rec.losses, "per-batch (unscaled) train losses")
    assert_same_weights(hand, lux)
    assert_same_optimizer_state(hand_opt, only_optimizer(trainer))
    return hand


@pytest.mark.parametrize(
    ("n_batches", "steps"), [(7, 3), (8, 3), (6, 3)], ids=["last_window_1", "last_window_2", "even"]
)
def test_accumulation_over_a_list_scales_a_partial_last_window_by_1_over_k(n_batches, steps):
    epochs = 2
    hand = assert_same_accumulation(
        textbook_accumulation, lambda: digit_batches(n_batches), n_batches, steps, epochs
    )

    if n_batches % steps:
        # Teeth: scaling the partial last window by 1/steps trains differently.
        wrong = plain_mlp()
        wrong_opt = momentum_sgd(wrong.parameters())
        batches = digit_batches(n_batches)
        for _ in range(epochs):
            wrong.train()
            for i, (x, y) in enumerate(batches, start=1):
                (F.cross_entropy(wrong(x), y) / steps).backward()
                if i % steps == 0 or i == len(batches):
                    wrong_opt.step()
                    wrong_opt.zero_grad()
        assert not same_weights(wrong, hand)


@pytest.mark.parametrize("n_batches", [7, 6], ids=["open_last_window", "even"])
def test_accumulation_without_a_length_steps_the_open_window_at_the_end(n_batches):
    epochs, steps = 2, 3
    hand = assert_same_accumulation(
        textbook_unsized_accumulation, lambda: Unsized(digit_batches(n_batches)), n_batches, steps, epochs
    )

    if n_batches % steps:
        # Teeth: dropping the open window, or scaling it by 1/k as if the length were known,
        # trains differently.
        for wrong_rule in ("drop", "rescale"):
            wrong = plain_mlp()
            wrong_opt = momentum_sgd(wrong.parameters())
            full = n_batches // steps * steps
            for _ in range(epochs):
                wrong.train()
                for i, (x, y) in enumerate(Unsized(digit_batches(n_batches)), start=1):
                    scale = n_batches - full if wrong_rule == "rescale" and i > full else steps
                    (F.cross_entropy(wrong(x), y) / scale).backward()
                    if i % steps == 0:
                        wrong_opt.step()
                        wrong_opt.zero_grad()
                if wrong_rule == "rescale":
                    wrong_opt.step()
                wrong_opt.zero_grad()
            assert not same_weights(wrong, hand), wrong_rule


BATCH_STAGES = [
    "on_train_batch_begin",
    "on_train_batch_after_pred",
    "on_train_batch_after_loss",
    "on_train_batch_before_backward",
]
STEP_STAGES = ["on_train_batch_before_step", "on_train_batch_after_step"]


@pytest.mark.parametrize("sized", [True, False], ids=["list", "no_len"])
def test_accumulation_stage_order_in_each_epochs_train_phase(sized):
    # 7 batches, steps=3: steps after batches 3 and 6; the last window (batch 7) steps inside
    # batch 7 when the length is known, after its on_train_batch_end when it is not.
    epochs, steps, n_batches = 2, 3, 7
    data = digit_batches(n_batches)
    trainer = lux_trainer(plain_mlp(), loss_fn=F.cross_entropy, optimizer=momentum_sgd)
    log = []
    torch.manual_seed(RUN_SEED)
    for event in trainer.run(data if sized else Unsized(data), epochs=epochs, callbacks=[Accumulate(steps)]):
        ctx = event.ctx
        log.append((str(event.stage), ctx.epoch, ctx.step, getattr(ctx, "in_batch", "no ctx.in_batch")))

    expected = ["on_train_begin"]
    for i in range(1, n_batches + 1):
        expected += BATCH_STAGES
        if i % steps == 0 or (sized and i == n_batches):
            expected += STEP_STAGES
        expected.append("on_train_batch_end")
    if not sized:
        expected += STEP_STAGES
    expected.append("on_train_end")

    for epoch in range(1, epochs + 1):
        stages = [stage for stage, e, _, _ in log if e == epoch]
        train = stages[stages.index("on_train_begin") : stages.index("on_train_end") + 1]
        if not sized:  # the open window is stepped after the last batch, before on_train_end
            assert train[-4:] == ["on_train_batch_end", *STEP_STAGES, "on_train_end"], f"epoch {epoch}"
        assert train == expected, f"epoch {epoch}"
    # ctx.in_batch: true for the steps inside a batch, false for the open window's after the data.
    step_events = [(stage, e, in_batch) for stage, e, _, in_batch in log if stage in STEP_STAGES]
    for epoch in range(1, epochs + 1):
        of_epoch = [in_batch for _, e, in_batch in step_events if e == epoch]
        assert len(of_epoch) == 2 * 3
        expected_in_batch = [True] * 6 if sized else [True] * 4 + [False] * 2
        assert of_epoch == expected_in_batch, f"epoch {epoch}"
    after_steps = [step for stage, _, step, _ in log if stage == "on_train_batch_after_step"]
    assert after_steps == list(range(1, 3 * epochs + 1))  # ctx.step counts every step, the open one too
    assert log[-1][0] == "on_fit_end" and log[-1][2] == 3 * epochs


# -- (d) hand-written updates, optimizer=None ---------------------------------------------------


def iris_regression() -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch/examples' regression script on real data: petal width from polynomial features
    (degree 3) of the (standardised) petal length."""
    x, _ = iris()
    length = x[:, 2:3]
    features = torch.cat([length**i for i in range(1, 4)], 1)
    return features, x[:, 3:4]


def regression_loader() -> DataLoader:
    features, target = iris_regression()
    return DataLoader(TensorDataset(features, target), batch_size=30, shuffle=True)


LR = 0.1


def manual_sgd_step(ctx):
    ctx.pred = ctx.model(ctx.input)
    yield "on_train_batch_after_pred"
    ctx.loss = ctx.loss_fn(ctx.pred, ctx.target)
    yield "on_train_batch_after_loss"
    yield "on_train_batch_before_backward"
    ctx.backward(ctx.loss)
    yield "on_train_batch_before_step"
    for p in ctx.model.parameters():
        p.data.add_(-LR * p.grad)
        p.grad = None
    yield "on_train_batch_after_step"


def regression_model() -> nn.Linear:
    torch.manual_seed(MODEL_SEED)
    return nn.Linear(3, 1)


@pytest.mark.parametrize("data", ["dataloader", "tensor_pair"])
def test_hand_written_updates_with_optimizer_none(data):
    epochs = 4
    fc = regression_model()
    hand_losses = []
    loader = regression_loader()
    torch.manual_seed(RUN_SEED)
    for _ in range(epochs):
        for batch_x, batch_y in loader:
            fc.zero_grad()
            output = F.smooth_l1_loss(fc(batch_x), batch_y)
            output.backward()
            for param in fc.parameters():
                param.data.add_(-LR * param.grad)
            hand_losses.append(output.detach().clone())

    lux = regression_model()
    trainer = lux_trainer(lux, loss_fn=F.smooth_l1_loss, optimizer=None, train_step=manual_sgd_step)
    rec = Rec()
    # The tensor pair is batched by corolux: the same permutation as DataLoader(shuffle=True).
    train_data = regression_loader() if data == "dataloader" else iris_regression()
    batch_size = None if data == "dataloader" else 30
    torch.manual_seed(RUN_SEED)
    trainer.fit(train_data, epochs=epochs, batch_size=batch_size, callbacks=[rec])

    assert len(hand_losses) == 5 * epochs
    assert rec.final_step == len(hand_losses)
    assert_same_tensors(hand_losses, rec.losses, "per-batch train losses")
    assert_same_weights(fc, lux)
    assert not same_weights(fc, regression_model())  # it trained


def test_optimizer_none_with_the_default_step_fails_at_fit_naming_optimizer():
    trainer = lux_trainer(regression_model(), loss_fn=F.smooth_l1_loss, optimizer=None)
    with pytest.raises(ValueError, match="optimizer"):
        trainer.fit(regression_loader(), epochs=1)


# -- (e) pytorch/examples' MNIST script on the 8x8 digits -----------------------------------------


class Net(nn.Module):
    """The MNIST example's network, shrunk to 1x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def mnist_loaders() -> tuple[DataLoader, DataLoader]:
    x, y = digits()
    images = ((x - x.mean()) / x.std()).view(-1, 1, 8, 8)
    train = DataLoader(TensorDataset(images[:384], y[:384]), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(images[384:584], y[384:584]), batch_size=100, shuffle=False)
    return train, test


def conv_net() -> Net:
    torch.manual_seed(MODEL_SEED)
    return Net()


def adadelta(params):
    return torch.optim.Adadelta(params, lr=1.0)


class StepLROnEpochEnd(corolux.Callback):
    def setup(self, ctx: Any) -> None:
        self.scheduler = torch.optim.lr_scheduler.StepLR(ctx.opt, step_size=1, gamma=0.7)
        self.lrs: list[float] = []

    def on_epoch_end(self, ctx: Any) -> None:
        self.scheduler.step()
        self.lrs.append(self.scheduler.get_last_lr()[0])


def mnist_script(model, train_loader, test_loader, epochs, *, eval_mode=True):
    """The MNIST example's train()/test()/scheduler.step() per epoch. ``eval_mode=False`` (WRONG)
    tests in train mode, so dropout draws from the RNG during testing."""
    optimizer = adadelta(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    losses, test_losses, lrs = [], [], []
    for _ in range(1, epochs + 1):
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            output = model(data)
            loss = F.nll_loss(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().clone())
        if eval_mode:
            model.eval()
        else:
            model.train()
        with torch.no_grad():
            for data, target in test_loader:
                output = model(data)
                test_losses.append(F.nll_loss(output, target))
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return optimizer, losses, test_losses, lrs


def test_mnist_example_shape_with_adadelta_steplr_and_a_test_loader():
    epochs = 3
    hand = conv_net()
    train_loader, test_loader = mnist_loaders()
    torch.manual_seed(RUN_SEED)
    hand_opt, hand_losses, hand_test, hand_lrs = mnist_script(hand, train_loader, test_loader, epochs)

    lux = conv_net()
    trainer = lux_trainer(lux, loss_fn=F.nll_loss, optimizer=adadelta)
    rec, schedule = Rec(), StepLROnEpochEnd()
    train_loader, test_loader = mnist_loaders()
    torch.manual_seed(RUN_SEED)
    history = trainer.fit(train_loader, epochs=epochs, valid_data=test_loader, callbacks=[rec, schedule])

    assert len(hand_losses) == 6 * epochs and len(hand_test) == 2 * epochs
    assert_same_tensors(hand_losses, rec.losses, "per-batch train losses")
    assert_same_tensors(hand_test, rec.valid_losses, "per-batch test losses")
    assert schedule.lrs == hand_lrs
    assert_same_weights(hand, lux)
    assert_same_optimizer_state(hand_opt, only_optimizer(trainer))
    assert rec.final_step == 6 * epochs
    assert len(history["valid_loss"]) == epochs

    # Teeth: testing in train mode draws dropout masks, which shifts the next epochs' masks.
    wrong = conv_net()
    train_loader, test_loader = mnist_loaders()
    torch.manual_seed(RUN_SEED)
    mnist_script(wrong, train_loader, test_loader, epochs, eval_mode=False)
    assert not same_weights(wrong, hand)
