"""MixUp: fit() with MixUp trains bit for bit as a hand loop that makes the same draws in the same
order (and a loop that draws in another order differs); validation is not mixed; bad inputs fail
clearly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from realdata import digits
from torch.utils.data import DataLoader, TensorDataset

import corolux
from corolux.callbacks.mixup import MixUp

F = torch.nn.functional
nn = torch.nn

ALPHA = 0.4


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def loader() -> DataLoader:
    x, y = digits()
    return DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True)


def hand_loop(
    model: nn.Module, epochs: int, *, perm_first: bool = False, bf16: bool = False
) -> list[torch.Tensor]:
    """The textbook mixup loop: per batch lam ~ Beta(alpha, alpha), then a permutation; with
    ``bf16``, the forward and each loss under bfloat16 autocast, as the trainer's mixed precision."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    beta = torch.distributions.Beta(torch.tensor(ALPHA), torch.tensor(ALPHA))
    data = loader()
    losses = []
    for _ in range(epochs):
        model.train()
        for x, y in data:
            if perm_first:  # WRONG order on purpose
                perm = torch.randperm(x.shape[0])
                lam = float(beta.sample())
            else:
                lam = float(beta.sample())
                perm = torch.randperm(x.shape[0])
            mixed = lam * x + (1 - lam) * x[perm]
            with autocast():
                out = model(mixed)
            with autocast():
                loss = F.cross_entropy(out, y)
            with autocast():
                other = F.cross_entropy(out, y[perm])
            loss = lam * loss + (1 - lam) * other
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
    return losses


class Losses(corolux.Callback):
    weight = 10  # after MixUp (0): the loss the backward gets

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_after_loss(self, ctx):
        self.losses.append(ctx.loss.detach().clone())


def lux_fit(
    model: nn.Module, epochs: int, callbacks: list, precision: str = "32", **kwargs
) -> corolux.History:
    trainer = corolux.Trainer(
        model,
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        device="cpu",
        precision=precision,
        progress=False,
    )
    return trainer.fit(loader(), epochs=epochs, callbacks=callbacks, **kwargs)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_with_mixup_is_bit_identical_to_the_hand_loop():
    hand = mlp()
    torch.manual_seed(1234)
    hand_losses = hand_loop(hand, epochs=2)
    hand_rng = torch.get_rng_state()

    lux, rec = mlp(), Losses()
    torch.manual_seed(1234)
    history = lux_fit(lux, 2, [MixUp(alpha=ALPHA), rec])
    assert torch.equal(torch.get_rng_state(), hand_rng)  # the same draws, no more, no fewer
    assert len(rec.losses) == len(hand_losses) == 16
    assert all(torch.equal(a, b) for a, b in zip(hand_losses, rec.losses, strict=True))
    assert same_weights(hand, lux)
    # the epoch's train_loss is the mean of the mixed losses (8 full batches of 32)
    assert history["train_loss"][1] == pytest.approx(torch.stack(hand_losses[8:]).mean().item(), rel=1e-6)

    wrong = mlp()
    torch.manual_seed(1234)
    hand_loop(wrong, epochs=2, perm_first=True)
    assert not same_weights(wrong, lux)  # the order of the draws is part of the contract
    plain = mlp()
    torch.manual_seed(1234)
    lux_fit(plain, 2, [])
    assert not same_weights(plain, lux)  # and MixUp did change the training


def test_under_mixed_precision_the_permuted_loss_is_computed_under_autocast_too():
    hand = mlp()
    torch.manual_seed(1234)
    hand_losses = hand_loop(hand, epochs=1, bf16=True)
    lux, rec = mlp(), Losses()
    torch.manual_seed(1234)
    lux_fit(lux, 1, [MixUp(alpha=ALPHA), rec], precision="bf16-mixed")
    assert all(torch.equal(a, b) for a, b in zip(hand_losses, rec.losses, strict=True))
    assert same_weights(hand, lux)


def test_only_training_batches_are_mixed():
    seen = {"train": [], "valid": []}

    class Inputs(corolux.Callback):
        weight = 10  # after MixUp

        def on_train_batch_begin(self, ctx):
            seen["train"].append(torch.equal(ctx.input, ctx.batch[0]))

        def on_valid_batch_begin(self, ctx):
            seen["valid"].append(ctx.input is ctx.batch[0])

    mixup = MixUp(alpha=1.0)
    x, y = digits()
    lux_fit(mlp(), 1, [mixup, Inputs()], valid_data=DataLoader(TensorDataset(x[256:320], y[256:320]), 32))
    assert seen["train"] == [False] * 8 and seen["valid"] == [True, True]
    assert 0 < mixup.lam < 1 and sorted(mixup.perm.tolist()) == list(range(32))


def test_a_run_is_reproducible_under_manual_seed():
    a, b, c = mlp(), mlp(), mlp()
    for model, seed in ((a, 7), (b, 7), (c, 8)):
        torch.manual_seed(seed)
        lux_fit(model, 1, [MixUp()])
    assert same_weights(a, b) and not same_weights(a, c)


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0, -0.5, float("inf"), float("nan")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive, finite number"):
        MixUp(alpha=alpha)


@pytest.mark.parametrize("alpha", ["0.4", True, None])
def test_alpha_must_be_a_number(alpha):
    with pytest.raises(TypeError, match="alpha must be a positive number"):
        MixUp(alpha=alpha)  # type: ignore[arg-type]


def test_without_a_loss_fn_fit_fails_before_training():
    class CarriesLoss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x, y=None):
            return {"loss": self.linear(x).sum()}

    steps: list[int] = []

    class Seen(corolux.Callback):
        def on_train_batch_begin(self, ctx):
            steps.append(ctx.iter)

    trainer = corolux.Trainer(CarriesLoss(), optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False)
    with pytest.raises(ValueError, match=r"MixUp needs the trainer's loss_fn.*Trainer\(loss_fn=\.\.\.\)"):
        trainer.fit(loader(), epochs=1, callbacks=[MixUp(), Seen()])
    assert steps == []


def test_an_input_that_is_not_a_float_tensor_is_a_clear_error():
    x, y = digits()

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, a, b):
            return self.linear(a + b)

    trainer = corolux.Trainer(
        TwoInputs(), loss_fn=F.cross_entropy, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), progress=False
    )
    pairs = [((x[:32], x[:32]), y[:32])]
    with pytest.raises(TypeError, match="floating-point input tensor.*is tuple") as info:
        trainer.fit(pairs, epochs=1, callbacks=[MixUp()])
    assert any("MixUp" in note and "on_train_batch_begin" in note for note in info.value.__notes__)

    ids = corolux.Trainer(
        nn.Sequential(nn.Embedding(17, 4), nn.Flatten(), nn.Linear(256, 10)),
        loss_fn=F.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        progress=False,
    )
    with pytest.raises(TypeError, match=r"is a torch\.int64 tensor"):
        ids.fit((x.long(), y), epochs=1, callbacks=[MixUp()])
