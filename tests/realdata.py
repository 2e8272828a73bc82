"""Small real data sets shared by the tests: scikit-learn's bundled iris and digits."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits, load_iris


@functools.cache
def _iris() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_iris()
    x = torch.tensor(d.data, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(d.target)


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def iris(n: int = 150) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of the 150 iris flowers: 4 standardised features, 3 classes (fresh copies)."""
    x, y = _iris()
    return x[:n].clone(), y[:n].clone()


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digits: 64 features in [0, 1], 10 classes (fresh copies)."""
    x, y = _digits()
    return x.clone(), y.clone()


def overfitting_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """200 digits to train on and 300 to validate: a small MLP overfits them, so valid_loss
    goes down, then up and down (what early stopping and best-model callbacks need)."""
    x, y = _digits()
    return (x[:200].clone(), y[:200].clone()), (x[1000:1300].clone(), y[1000:1300].clone())


def digit_batches(n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of ``size`` digits, in order (a list: the same every epoch)."""
    x, y = digits()
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(n)]


def small_mlp() -> torch.nn.Module:
    """A 64-32-10 MLP for the digits, initialised from seed 0."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def linear_trainer(metrics: bool = True):  # -> corolux.Trainer
    """A Linear 4->3 from seed 0 with SGD(0.1), cross-entropy and (``metrics``) accuracy: the
    loggers' tests, which look at what is written, not at what is learnt."""
    import corolux

    torch.manual_seed(0)
    return corolux.Trainer(
        torch.nn.Linear(4, 3),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        metrics=[corolux.metrics.Accuracy()] if metrics else None,
        device="cpu",
        progress=False,
    )


def dropout_mlp(seed: int = 0) -> torch.nn.Module:
    """A 64-32-10 MLP with dropout for the digits, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 10)
    )


def adam_trainer(model: torch.nn.Module, lr: float = 1e-2, **kwargs):  # -> corolux.Trainer
    """``model`` on the CPU with cross-entropy, Adam(lr) and accuracy, no progress bar;
    ``kwargs`` go to the Trainer (e.g. ``compile=True``)."""
    import corolux

    return corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=lr),
        metrics=[corolux.metrics.Accuracy()],
        device="cpu",
        progress=False,
        **kwargs,
    )


def digits_mlp_trainer(seed: int = 0, lr: float = 3e-2, **kwargs):  # -> corolux.Trainer
    """A 64-64-10 MLP on the CPU with Adam(lr) and accuracy, initialised from ``seed``;
    ``kwargs`` go to the Trainer (e.g. ``compile=True``)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return adam_trainer(model, lr=lr, **kwargs)
