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
