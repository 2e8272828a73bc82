"""Memory stays flat over a long fit, and no autograd graph outlives its step (issue 7).

Each scenario fits an MLP for 20 epochs (CPU, one torch thread) and records, at every
``on_epoch_end``: the process's resident memory (``VmRSS``) and its peak (``VmHWM``) from
``/proc/self/status``, and the tensors alive (found with ``gc``: their count and the bytes
of their distinct storages).

The autograd graphs are watched through ``torch.autograd.graph.saved_tensors_hooks``: every
tensor the forward saves for backward is packed in a small object the graph holds, and a
weak reference to it says whether that graph's saved state is still alive. At each
``on_train_batch_begin`` no saved tensor of an earlier batch may be alive: backward frees
them, and ``ctx`` must not keep a graph that did not run backward (a batch skipped after
its loss) into the next step, where it would double the activation memory of the forward.

Checks (exit status 1 when one fails):
  * the live tensors at each epoch end are the same in count and bytes from epoch 2 on;
  * VmRSS grows by at most ``--max-growth-mib`` from epoch 5 to the last epoch;
  * no saved tensor of an earlier batch is alive at ``on_train_batch_begin``;
  * nothing the run created is alive once ``fit()`` has returned.

Scenarios: ``default`` (fit with validation and an accuracy metric), ``progress`` (the same
with the progress bar on, writing to a file) and ``skip`` (every third batch skipped at
``on_train_batch_after_loss``, so its graph never runs backward).

Run:
    python benchmarks/memory.py                      # about a minute
    python benchmarks/memory.py --json memory.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import warnings
import weakref
from typing import Any

import torch

import corolux


def proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process, in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    return values


def live_tensors() -> tuple[int, int]:
    """(count, bytes of distinct storages) of the tensors Python can see."""
    gc.collect()
    count, storages = 0, {}
    with warnings.catch_warnings():  # isinstance() on every object touches deprecated torch names
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        count += 1
        try:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # sparse, meta, ...: counted, not sized
            pass
    del tensors
    return count, sum(storages.values())


class _Saved:
    """What the graph holds for one saved tensor; weakly referenced to see it die."""

    __slots__ = ("tensor", "batch", "__weakref__")

    def __init__(self, tensor: torch.Tensor, batch: int) -> None:
        self.tensor = tensor
        self.batch = batch


class Watched(torch.nn.Module):
    """Wraps a model: every tensor its forward saves for backward is packed in a _Saved."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.batch = 0
        self.saved: list[weakref.ref[_Saved]] = []
        self.output: weakref.ref[torch.Tensor] | None = None

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        # Detached: an output saved with its grad_fn would make a reference cycle through
        # the graph that only backward breaks (so a graph without backward would leak here
        # because of this probe, not because of corolux).
        packed = _Saved(tensor.detach(), self.batch)
        self.saved.append(weakref.ref(packed))
        return packed

    @staticmethod
    def _unpack(packed: _Saved) -> torch.Tensor:
        return packed.tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch += 1
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.net(x)
        self.output = weakref.ref(out)
        return out

    def alive(self, before_batch: int) -> int:
        """Saved tensors of batches before ``before_batch`` still alive (and forget dead ones)."""
        self.saved = [ref for ref in self.saved if ref() is not None]
        return sum(1 for ref in self.saved if (p := ref()) is not None and p.batch < before_batch)


class Probe(corolux.Callback):
    """Records memory at each epoch end (after every other handler) and the saved tensors of
    earlier batches alive at each batch begin (before every other handler)."""

    weight = {"on_epoch_end": float("inf"), "on_train_batch_begin": -float("inf")}

    def __init__(self, model: Watched) -> None:
        self.model = model
        self.epochs: list[dict[str, Any]] = []
        self.stale = 0  # most saved tensors of earlier batches seen alive at a batch begin
        self.stale_where: tuple[int, int] | None = None
        self.batches = 0
        self.held_outputs = 0  # batch begins where the previous batch's output was still alive
        self.held_bytes = 0

    def on_train_batch_begin(self, ctx: corolux.Context) -> None:
        alive = self.model.alive(before_batch=self.model.batch + 1)
        if alive > self.stale:
            self.stale, self.stale_where = alive, (ctx.epoch, ctx.iter)
        self.batches += 1
        previous = self.model.output() if self.model.output is not None else None
        if previous is not None:
            self.held_outputs += 1
            self.held_bytes = max(self.held_bytes, previous.untyped_storage().nbytes())

    def on_epoch_end(self, ctx: corolux.Context) -> None:
        count, nbytes = live_tensors()
        self.epochs.append(
            {"epoch": ctx.epoch, **proc_status(), "tensors": count, "tensor_mib": nbytes / 2**20}
        )


class SkipEveryThird(corolux.Callback):
    def on_train_batch_after_loss(self, ctx: corolux.Context) -> None:
        if ctx.iter % 3 == 0:
            ctx.skip_batch()


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(args.features, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, 10),
    )
    model = Watched(net)

    def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.randn(args.batch_size, args.features, generator=g),
                torch.randint(0, 10, (args.batch_size,), generator=g),
            )
            for _ in range(n)
        ]

    train, valid = batches(args.batches), batches(max(1, args.batches // 5))
    probe = Probe(model)
    callbacks: list[Any] = [probe]
    progress = name == "progress"
    sink = None
    if progress:
        sink = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed below
        callbacks.append(corolux.callbacks.ProgressBar(file=sink))
    if name == "skip":
        callbacks.append(SkipEveryThird())
    trainer = corolux.Trainer(
        model,
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        metrics=[corolux.metrics.Accuracy()],
        device="cpu",
        progress=progress,
    )
    history = trainer.fit(train, epochs=args.epochs, valid_data=valid, callbacks=callbacks)
    if sink is not None:
        sink.close()
    del history
    gc.collect()
    after_fit = model.alive(before_batch=model.batch + 1)

    epochs = probe.epochs
    first = epochs[1] if len(epochs) > 1 else epochs[0]
    settle = epochs[min(4, len(epochs) - 1)]
    last = epochs[-1]
    growth = last["VmRSS"] - settle["VmRSS"]
    tensor_changes = [
        e["epoch"]
        for e in epochs[1:]
        if (e["tensors"], e["tensor_mib"]) != (first["tensors"], first["tensor_mib"])
    ]
    checks = {
        "live tensors flat from epoch 2": (
            not tensor_changes,
            f"changed at epochs {tensor_changes}"
            if tensor_changes
            else f"{first['tensors']} tensors, {first['tensor_mib']:.2f} MiB",
        ),
        f"VmRSS growth epoch {settle['epoch']}->{last['epoch']} <= {args.max_growth_mib} MiB": (
            growth <= args.max_growth_mib,
            f"{growth:+.2f} MiB",
        ),
        "no graph of an earlier batch alive at on_train_batch_begin": (
            probe.stale == 0,
            "none"
            if probe.stale == 0
            else f"{probe.stale} saved tensors alive at {probe.stale_where} (epoch, batch)",
        ),
        "no saved tensor alive after fit() returned": (after_fit == 0, f"{after_fit} alive"),
    }
    info = {
        "previous batch's output alive at on_train_batch_begin": (
            f"{probe.held_outputs} of {probe.batches} batch begins"
            + (
                f", {probe.held_bytes} bytes (held by ctx.pred until the next forward returns)"
                if probe.held_outputs
                else ""
            )
        ),
    }
    return {"scenario": name, "epochs": epochs, "checks": checks, "info": info}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batches", type=int, default=40, help="training batches per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument(
        "--hidden", type=int, default=512, help="width: 128 KiB of activation per layer and batch"
    )
    parser.add_argument(
        "--max-growth-mib", type=float, default=8.0, help="allowed VmRSS growth after epoch 5"
    )
    parser.add_argument("--scenarios", default="default,progress,skip")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    print(
        f"corolux memory: Python {platform.python_version()}, torch {torch.__version__}, "
        f"{args.epochs} epochs x {args.batches} batches of {args.batch_size}, "
        f"MLP {args.features}-{args.hidden}-{args.hidden}-10"
    )
    results = []
    failed = False
    for name in args.scenarios.split(","):
        result = run_scenario(name, args)
        results.append(result)
        print(f"\n## scenario {name}\n")
        print("| epoch | VmRSS MiB | VmHWM MiB | live tensors | tensor MiB |")
        print("|---:|---:|---:|---:|---:|")
        for e in result["epochs"]:
            print(
                f"| {e['epoch']} | {e['VmRSS']:.1f} | {e['VmHWM']:.1f} | {e['tensors']} "
                f"| {e['tensor_mib']:.2f} |"
            )
        print()
        for label, (ok, detail) in result["checks"].items():
            print(f"{'ok  ' if ok else 'FAIL'} {label}: {detail}")
            failed |= not ok
        for label, detail in result["info"].items():
            print(f"info {label}: {detail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "results": [
                        {**r, "checks": {k: {"ok": ok, "detail": d} for k, (ok, d) in r["checks"].items()}}
                        for r in results
                    ],
                },
                f,
                indent=1,
            )
        print(f"\nwrote {args.json}")
    print("\nFAILED" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
