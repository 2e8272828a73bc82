"""The same training script on 1 or N processes: data-parallel (DDP) on the digits.

Run:  python examples/ddp.py                                   (one process)
      torchrun --nproc_per_node=2 examples/ddp.py             (two: each trains on half the data)

Under torchrun the Trainer joins the process group, wraps the model in DistributedDataParallel,
gives each process its share of the data (batch_size is per process) and reduces the metrics
over the processes; only rank 0 prints and writes.
"""

import torch
from sklearn.datasets import load_digits

import corolux

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
test_x, test_y, train_x, train_y = x[:297], y[:297], x[297:], y[297:]

corolux.seed_everything(0)  # every process builds the same model (DDP also copies rank 0's)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
trainer = corolux.Trainer(
    model,
    loss_fn=torch.nn.CrossEntropyLoss(),
    optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    metrics=[corolux.metrics.Accuracy()],
    device="cpu",
    seed=0,
)
history = trainer.fit((train_x, train_y), epochs=8, valid_data=0.2, batch_size=32)
results = trainer.evaluate((test_x, test_y))  # every process evaluates its share; the metrics are reduced

if trainer.distributed is None or trainer.distributed.is_main_process:
    processes = 1 if trainer.distributed is None else trainer.distributed.world_size
    print(f"{processes} process(es):", history)
    print("test:", results)
