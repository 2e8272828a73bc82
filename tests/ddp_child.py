"""A DDP training script for tests/test_ddp.py: run under torchrun (or alone, for the
single-process reference). Writes the final weights and history to <out>-<rank>.pt.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_child.py OUT MODE
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import warnings

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import corolux

torch.set_num_threads(1)
faulthandler.enable(all_threads=True)  # a crash shows every thread's Python stack
out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("RANK", "0"))

g = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g)
xv, yv = torch.randn(101, 8, generator=g), torch.randint(0, 3, (101,), generator=g)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
trainer = corolux.Trainer(
    model,
    loss_fn=torch.nn.functional.cross_entropy,
    optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    metrics=[corolux.metrics.Accuracy()],
    device="cpu",
    progress=False,
    ddp_timeout=20,
    # "compile": aot_eager traces with dynamo as inductor does; fullgraph: no graph break in the
    # DDP run (DDP's own Python is outside the compiled forward)
    compile={"backend": "aot_eager", "fullgraph": True} if mode == "compile" else False,
)


class StopOnRankOne(corolux.Callback):
    def on_epoch_end(self, ctx):
        if rank == 1 and ctx.epoch == 2:
            ctx.stop_training("early_stopping")


class StopMidEpochOnRankOne(corolux.Callback):
    def on_train_batch_end(self, ctx):
        if rank == 1 and (ctx.epoch, ctx.iter) == (2, 3):
            ctx.stop_training("time_limit")
        ctx.log("stopped_at", float(ctx.iter))


class FailOnRankOne(corolux.Callback):
    def on_train_batch_end(self, ctx):
        if rank == 1 and (ctx.epoch, ctx.iter) == (2, 3):
            raise RuntimeError("rank 1 failed on purpose")


class CountAllReduces(corolux.Callback):
    """Counts the gradient all-reduces of the DDP model (a communication hook)."""

    def __init__(self):
        self.count = 0

    def setup(self, ctx):
        def hook(state, bucket):
            self.count += 1
            return allreduce_hook(None, bucket)

        ctx.model.register_comm_hook(None, hook)


class KillOnce(corolux.Callback):
    weight = float("inf")

    def on_train_batch_end(self, ctx):
        if (ctx.epoch, ctx.iter) == (2, 5) and not os.path.exists(f"{out}.killed"):
            open(f"{out}.killed", "w").close()
            os._exit(3)  # a kill: no cleanup


class SlowAfterReady(corolux.Callback):
    """From batch 2 of epoch 2: says so in a file, then trains slowly (for a Ctrl-C to land),
    each rank pausing at another stage, so that a SIGINT finds them in different batches."""

    def _slow(self, ctx):
        if (ctx.epoch, ctx.iter) >= (2, 2):
            open(f"{out}.ready-{rank}", "w").close()
            time.sleep(0.2)

    def on_train_batch_end(self, ctx):
        ctx.log("stopped_at", float(ctx.iter))
        if rank == 0:
            self._slow(ctx)

    def on_train_batch_after_pred(self, ctx):
        if rank == 1:
            self._slow(ctx)

    def on_interrupt(self, ctx):
        ctx.interrupts = getattr(ctx, "interrupts", 0) + 1
        torch.save({"at": (ctx.epoch, ctx.iter), "interrupts": ctx.interrupts}, f"{out}.interrupt-{rank}.pt")


class SharePerRank:
    """A custom metric without the reduction hook: each rank's share only (with a warning)."""

    name, higher_is_better = "share", False

    def reset(self):
        self.count = 0

    def update(self, pred, target):
        self.count += len(target)

    def compute(self):
        return float(self.count)


counter = CountAllReduces()
callbacks = {
    "train": [],
    "stop": [StopOnRankOne()],
    "midstop": [StopMidEpochOnRankOne()],
    "fail": [FailOnRankOne()],
    "accumulate": [corolux.callbacks.GradientAccumulation(2), counter],
    "interrupt": [SlowAfterReady()],
    "loggers": [  # each rank names its own files: only rank 0's may appear
        corolux.callbacks.CSVLogger(f"{out}-{rank}.csv"),
        corolux.callbacks.TensorBoardLogger(f"{out}-{rank}-tb"),
        corolux.callbacks.ModelCheckpoint(f"{out}-{rank}-ckpt/epoch{{epoch}}.pt"),
        corolux.callbacks.ProgressBar(style="line", file=sys.stdout),
    ],
    "resume": [corolux.callbacks.AutoResume(f"{out}.resume.pt", every_n_steps=3), KillOnce()],
    "compile": [],
}
if mode.startswith("single"):  # the reference: one process, the global batch, the same order of samples
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, shuffle=True, seed=0)
    data, kwargs = DataLoader(TensorDataset(x, y), batch_size=32, sampler=sampler), {}
    mode = mode.removeprefix("single-") if "-" in mode else "train"
    callbacks["accumulate"] = callbacks["accumulate"][:1]
    if mode == "resume":  # continue a DDP run's checkpoint in one process, on the global batch
        callbacks["resume"], kwargs = [], {"resume_from": f"{out}.resume.pt"}
else:
    data, kwargs = (x, y), {"batch_size": 16}  # 16 per process: a global batch of 32
if mode == "loggers":
    trainer.valid_metrics = [*trainer.valid_metrics, SharePerRank()]
before = corolux.compiling.compile_counts()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    history = trainer.fit(data, epochs=3, valid_data=(xv, yv), callbacks=callbacks[mode], **kwargs)
predictions = trainer.predict(xv, batch_size=8)  # 101 samples: 51 on rank 0, 50 on rank 1
compiled = corolux.compiling.compile_counts() - before
torch.save(
    {
        "predictions": predictions,
        "model": trainer.model.state_dict(),
        "history": history.to_dict(),
        "stop_reason": history.stop_reason,
        "interrupted": history.interrupted,
        "world": 1 if trainer.distributed is None else trainer.distributed.world_size,
        "ctx_model_is_ddp": isinstance(trainer._ddp_model, torch.nn.parallel.DistributedDataParallel),
        "all_reduces": counter.count,
        "rng": torch.get_rng_state(),
        "warnings": [str(w.message) for w in caught],
        "compilations": compiled.compilations,
        "graph_breaks": compiled.graph_breaks,
        "forward_left": "forward" in vars(trainer.model),
    },
    f"{out}-{rank}.pt",
)
print(f"rank {rank} done", flush=True)
