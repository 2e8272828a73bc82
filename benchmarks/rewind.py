"""What rewinding costs per training batch (issue 19): a rewindable stepper against a plain one,
and CaptureAnomaly's per-batch cost, in the same process.

Everything runs in ONE process, on the CPU, with one torch thread, interleaved as in
``overhead.py`` (the order rotates every repetition; each figure is the median over the
repetitions of the difference within one repetition, with a distribution-free 95% interval).
Rows, per workload:

  stepper     ``trainer.stepper(data, epochs=1).finish()``
  rewindable  ``trainer.stepper(data, epochs=1, rewindable=True).finish()``: the state at each
              batch's start kept in memory (parameters, buffers, Adam's two moments and step,
              every RNG, counters, the MetricsTracker's accumulators)
  fit         ``trainer.fit(data, epochs=1)``
  capture     ``fit`` with ``CaptureAnomaly(path)``: an RNG snapshot per batch and the check
              (one host read of the loss per batch)

Workloads: the MLP 32-64-10 on batches of 64 of ``overhead.py`` (2,762 parameters), and a
wide MLP 256-1024-1024-10 on batches of 64 (1.32 M parameters, 5.3 MB; Adam's state twice
that), where the copies dominate. Adam, so that the optimizer has state to keep. Every row
trains the same batches from the same weights: their final weights must be equal.

Run:
    python benchmarks/rewind.py            # ~1 min
    python benchmarks/rewind.py --quick    # ~15 s
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import Runner, _clock, _since, interleave, make_workload, paired  # noqa: E402

import corolux  # noqa: E402
from corolux.callbacks import CaptureAnomaly  # noqa: E402


def wide_workload(n_batches: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )
    data = [
        (torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g))
        for _ in range(n_batches)
    ]
    return {"desc": "wide MLP 256-1024-1024-10, batch 64", "model": model, "data": data}


def runner(kind: str, model: torch.nn.Module, data: list[Any], folder: str) -> Runner:
    trainer = corolux.Trainer(
        model,
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        device="cpu",
        progress=False,
    )

    def run() -> tuple[float, float]:
        t0 = _clock()
        if kind == "stepper":
            trainer.stepper(data, epochs=1).finish()
        elif kind == "rewindable":
            trainer.stepper(data, epochs=1, rewindable=True).finish()
        elif kind == "fit":
            trainer.fit(data, epochs=1)
        else:
            trainer.fit(data, epochs=1, callbacks=[CaptureAnomaly(Path(folder) / "never.pt")])
        return _since(t0)

    return run


KINDS = ("stepper", "rewindable", "fit", "capture")


def measure(workload: dict[str, Any], reps: int, warmup: int) -> dict[str, Any]:
    models = {k: copy.deepcopy(workload["model"]) for k in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        runners = {k: runner(k, models[k], workload["data"], folder) for k in KINDS}
        samples = interleave(runners, reps, warmup, len(workload["data"]))["cpu"]
    first = models["stepper"].state_dict()
    same = all(torch.equal(first[n], models[k].state_dict()[n]) for k in KINDS for n in first)
    params = sum(p.numel() for p in workload["model"].parameters())
    result = {"desc": workload["desc"], "params": params, "batches": len(workload["data"]), "same": same}
    for k in KINDS:
        result[k] = statistics.median(samples[k])
    for k, base in (("rewindable", "stepper"), ("capture", "fit")):
        diff = paired(samples[k], samples[base])
        result[f"{k}_added"] = diff["median"]
        result[f"{k}_ci"] = diff["ci"]
        result[f"{k}_ratio"] = 1 + diff["median"] / result[base]
    return result


def show(r: dict[str, Any]) -> None:
    print(f"\n### {r['desc']}: {r['params']:,} parameters, {r['batches']} batches/epoch")
    print("\n| row | us/batch | added us/batch [95% CI] | ratio |")
    print("|---|---:|---:|---:|")
    for k, base in (("stepper", None), ("rewindable", "stepper"), ("fit", None), ("capture", "fit")):
        if base is None:
            print(f"| {k} | {r[k]:.1f} | | |")
        else:
            lo, hi = r[f"{k}_ci"]
            added = f"{r[f'{k}_added']:+.1f} [{lo:+.1f}, {hi:+.1f}] vs {base}"
            print(f"| {k} | {r[k]:.1f} | {added} | {r[f'{k}_ratio']:.3f} |")
    print(f"\nfinal weights of every row equal: {r['same']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batches (~15 s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps, batches, wide = (5, 100, 20) if args.quick else (21, 300, 60)
    print(f"torch {torch.__version__}, Python {sys.version.split()[0]}, 1 thread, CPU time, {reps} reps")
    for workload in (make_workload("mlp", batches), wide_workload(wide)):
        show(measure(workload, reps, warmup=1))


if __name__ == "__main__":
    main()
