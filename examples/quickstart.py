"""Quickstart: train a small classifier on scikit-learn's bundled 8x8 digits (no download).

Run:  python examples/quickstart.py  (seeded: two runs print the same numbers)
"""

import torch
from sklearn.datasets import load_digits

import corolux

digits = load_digits()  # 1,797 real 8x8 images of handwritten digits, shipped with scikit-learn
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
test_x, test_y, train_x, train_y = x[:297], y[:297], x[297:], y[297:]

corolux.seed_everything(0)  # before building the model: the same weights, and numbers, every run
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(128, 10)
)
trainer = corolux.Trainer(
    model,
    loss_fn=torch.nn.CrossEntropyLoss(),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    metrics=[corolux.metrics.Accuracy()],
    seed=0,
)
history = trainer.fit((train_x, train_y), epochs=10, valid_data=0.2, batch_size=64)

print(history)
print("test:", trainer.evaluate((test_x, test_y)))
