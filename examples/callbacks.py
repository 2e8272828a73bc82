"""Built-in callbacks on a small CNN over scikit-learn's 8x8 digits: early stopping, the best
model kept and saved, a learning-rate schedule, a CSV log, and a run that resumes after a kill.

Run:  python examples/callbacks.py [output folder]   (default: runs/digits_cnn)
Kill it (Ctrl-C twice, or kill -9) and run it again: it continues where its last save left it.
"""

import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import corolux
from corolux.callbacks import (
    AutoResume,
    CSVLogger,
    EarlyStopping,
    KeepBestModel,
    LRScheduler,
    ModelCheckpoint,
)

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/digits_cnn")

digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
y = torch.tensor(digits.target)
test_x, test_y, train_x, train_y = x[:297], y[:297], x[297:], y[297:]

corolux.seed_everything(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 16 x 4 x 4
    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 32 x 2 x 2
    torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(128, 10),
)  # fmt: skip
trainer = corolux.Trainer(
    model,
    loss_fn=torch.nn.CrossEntropyLoss(),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    metrics=[corolux.metrics.Accuracy()],
    seed=0,
)
history = trainer.fit(
    (train_x, train_y),
    epochs=30,
    valid_data=0.2,
    batch_size=64,
    callbacks=[
        LRScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=8, gamma=0.5)),
        EarlyStopping(monitor="valid_loss", patience=3),
        KeepBestModel(monitor="valid_loss"),  # the model ends with its best epoch's weights
        ModelCheckpoint(out / "best.pt", monitor="valid_loss", save_best_only=True),
        CSVLogger(out / "log.csv"),
        AutoResume(out / "resume.pt", every_n_steps=50),  # deleted once training is done
    ],
)

print(history)
print("test:", trainer.evaluate((test_x, test_y)))
