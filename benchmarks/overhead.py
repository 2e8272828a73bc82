"""Per-step overhead of corolux against a hand-written PyTorch loop (issue 7).

Everything runs in ONE process, on the CPU, with one torch thread. After a warm-up, the
variants are timed in interleaved repetitions (the order rotates every repetition, so no
variant always runs first or last) and each row is the median over the repetitions:

  (a)  hand-written loop: model(x), loss_fn(pred, y), loss.backward(), opt.step(),
       opt.zero_grad(set_to_none=True) -- what corolux's default step does
  (a+) the same, also keeping loss.detach() per batch and taking the epoch mean at the end
       (what corolux's loss tracker does; shown for reference, not a target)
  (b)  corolux Trainer.fit, progress=False
  (c)  corolux defaults with the progress bar on, writing to a file
  (d)  (b) + 20 callbacks that listen to no per-batch stage (on_epoch_end only)
  (e)  (b) + 20 callbacks on on_train_batch_end
  (f)  (b) + a coroutine callback waking at every on_train_batch_end
  (g)  ``for event in trainer.run(...)`` consumed by hand
  and, when importable, Ignite ``Engine`` (no ``.item()``), Ignite
  ``create_supervised_trainer`` (its default ``loss.item()``), Lightning
  ``Trainer(barebones=True)``.

Two workloads: an MLP 32-64-10 on batches of 64 (CrossEntropy, SGD) and a Linear 8->2 on
batches of 8, where the framework overhead dominates. Data is a list of (x, y) batches in
memory (no shuffling), so every variant does the same math on the same batches: each
variant's final weights must equal the hand-written loop's, bit for bit.

A corolux row is the whole ``fit()`` call (setup and teardown included) divided by the
number of steps. A Lightning row is timed from ``on_train_epoch_start`` to
``on_train_epoch_end`` (its ``fit()`` setup, about 0.1-0.3 s, is left out).

Both wall-clock time and the thread's CPU time are measured; on a loaded machine the CPU
time is the steadier of the two (it does not count the time other processes held the core).

Run:
    python benchmarks/overhead.py --quick            # about a minute
    python benchmarks/overhead.py --json out.json    # the full run
"""

from __future__ import annotations

import argparse
import copy
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import corolux

N_CALLBACKS = 20

# -- workloads --------------------------------------------------------------------------------


def make_workload(name: str, n_batches: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        sizes, batch, classes = (32, 64, 10), 64, 10
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(), torch.nn.Linear(sizes[1], sizes[2])
        )
        features = sizes[0]
        desc = "MLP 32-64-10, batch 64"
    elif name == "linear":
        batch, classes, features = 8, 2, 8
        torch.manual_seed(seed)
        model = torch.nn.Linear(features, classes)
        desc = "Linear 8->2, batch 8"
    else:
        raise ValueError(name)
    data = [
        (torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]
    return {"name": name, "desc": desc, "model": model, "data": data, "batch": batch}


LR = 0.01


def make_opt(params: Any) -> torch.optim.Optimizer:
    # Plain SGD holds no state, so runs that rebuild their optimizer (Lightning) do the same math.
    return torch.optim.SGD(params, lr=LR)


# -- variants ---------------------------------------------------------------------------------
# Each variant is built once per workload with its own copy of the initial model; calling
# it runs one epoch over the data and returns (wall seconds, thread-CPU seconds) of the
# timed part. All variants run the same number of epochs, so their final weights agree.


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t0[0], time.thread_time() - t0[1]


class NoBatchListener(corolux.Callback):
    def on_epoch_end(self, ctx: Any) -> None:
        pass


class BatchEndListener(corolux.Callback):
    def on_train_batch_end(self, ctx: Any) -> None:
        pass


@corolux.coroutine
def wake_every_batch() -> Any:
    while True:
        yield "on_train_batch_end"


def variant_hand(model: torch.nn.Module, data: list[Any]) -> Callable[[], tuple[float, float]]:
    opt = make_opt(model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    def run() -> tuple[float, float]:
        t0 = _clock()
        model.train()
        for x, y in data:
            pred = model(x)
            loss = loss_fn(pred, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _since(t0)

    return run


def variant_hand_losses(model: torch.nn.Module, data: list[Any]) -> Callable[[], tuple[float, float]]:
    opt = make_opt(model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    def run() -> tuple[float, float]:
        t0 = _clock()
        model.train()
        losses = []
        for x, y in data:
            pred = model(x)
            loss = loss_fn(pred, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        float(torch.stack(losses).mean())
        return _since(t0)

    return run


def _trainer(model: torch.nn.Module, progress: bool) -> corolux.Trainer:
    return corolux.Trainer(
        model,
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=make_opt,
        device="cpu",
        progress=progress,
    )


def variant_corolux(kind: str) -> Callable[[torch.nn.Module, list[Any]], Callable[[], tuple[float, float]]]:
    def build(model: torch.nn.Module, data: list[Any]) -> Callable[[], tuple[float, float]]:
        progress = kind == "progress"
        trainer = _trainer(model, progress)
        sink = tempfile.TemporaryFile("w+") if progress else None

        def callbacks() -> list[Any]:
            if kind == "progress":
                sink.seek(0)
                sink.truncate()
                return [corolux.callbacks.ProgressBar(file=sink)]
            if kind == "idle":
                return [NoBatchListener() for _ in range(N_CALLBACKS)]
            if kind == "listening":
                return [BatchEndListener() for _ in range(N_CALLBACKS)]
            if kind == "coroutine":
                return [wake_every_batch()]
            return []

        if kind == "run":

            def run() -> tuple[float, float]:
                t0 = _clock()
                for event in trainer.run(data, epochs=1):
                    pass
                return _since(t0)

            return run

        def run() -> tuple[float, float]:
            cbs = callbacks()
            t0 = _clock()
            trainer.fit(data, epochs=1, callbacks=cbs)
            return _since(t0)

        return run

    return build


def variant_ignite(supervised: bool) -> Callable[[torch.nn.Module, list[Any]], Callable[[], tuple[float, float]]]:
    def build(model: torch.nn.Module, data: list[Any]) -> Callable[[], tuple[float, float]]:
        from ignite.engine import Engine, create_supervised_trainer

        opt = make_opt(model.parameters())
        loss_fn = torch.nn.CrossEntropyLoss()

        if supervised:
            # Its default output_transform calls loss.item() every step (a host sync); its
            # step zeroes the gradients before the forward, which is the same math here.
            engine = create_supervised_trainer(model, opt, loss_fn, device="cpu")
        else:

            def step(engine: Any, batch: Any) -> Any:
                model.train()
                x, y = batch
                pred = model(x)
                loss = loss_fn(pred, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            engine = Engine(step)

        def run() -> tuple[float, float]:
            t0 = _clock()
            engine.run(data, max_epochs=1)
            return _since(t0)

        return run

    return build


def variant_lightning(model: torch.nn.Module, data: list[Any]) -> Callable[[], tuple[float, float]]:
    import logging
    import warnings

    import lightning.pytorch as pl

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.loss_fn = torch.nn.CrossEntropyLoss()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return self.loss_fn(self.model(x), y)

        def configure_optimizers(self) -> Any:
            return make_opt(self.parameters())

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t0 = _clock()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.elapsed = _since(self.t0)

    module = Module()

    def run() -> tuple[float, float]:
        timer = Timer()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=1,
            barebones=True,
            callbacks=[timer],
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train_dataloaders=data)
        return timer.elapsed

    return run


VARIANTS: dict[str, tuple[str, Callable[..., Any]]] = {
    "a": ("hand-written loop", variant_hand),
    "a+": ("hand-written + keep detached losses, epoch mean", variant_hand_losses),
    "b": ("corolux fit, progress=False", variant_corolux("plain")),
    "c": ("corolux fit, progress bar on (to a file)", variant_corolux("progress")),
    "d": (f"corolux + {N_CALLBACKS} callbacks on on_epoch_end only", variant_corolux("idle")),
    "e": (f"corolux + {N_CALLBACKS} callbacks on on_train_batch_end", variant_corolux("listening")),
    "f": ("corolux + coroutine waking every batch", variant_corolux("coroutine")),
    "g": ("corolux `for event in trainer.run()`", variant_corolux("run")),
}


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def add_peer_variants(use_peers: bool) -> list[str]:
    added = []
    if use_peers and _importable("ignite.engine"):
        VARIANTS["ignite"] = ("Ignite Engine(step), no .item()", variant_ignite(False))
        VARIANTS["ignite-sup"] = ("Ignite create_supervised_trainer (loss.item())", variant_ignite(True))
        added += ["ignite", "ignite-sup"]
    if use_peers and _importable("lightning.pytorch"):
        VARIANTS["lightning"] = ("Lightning Trainer(barebones=True), in-epoch time", variant_lightning)
        added.append("lightning")
    return added


# -- measuring --------------------------------------------------------------------------------


def measure(workload: dict[str, Any], keys: list[str], reps: int, warmup: int) -> dict[str, Any]:
    init = workload["model"]
    data = workload["data"]
    models = {k: copy.deepcopy(init) for k in keys}
    runners = {k: VARIANTS[k][1](models[k], data) for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    n = len(data)
    for rep in range(warmup + reps):
        shift = rep % len(keys)
        order = keys[shift:] + keys[:shift]
        for k in order:
            gc.collect()
            w, c = runners[k]()
            if rep >= warmup:
                wall[k].append(w / n * 1e6)
                cpu[k].append(c / n * 1e6)
    reference = models["a"].state_dict()
    same = {
        k: all(torch.equal(reference[name], value) for name, value in models[k].state_dict().items())
        for k in keys
    }
    rows = {}
    for k in keys:
        rows[k] = {
            "label": VARIANTS[k][0],
            "wall_us": statistics.median(wall[k]),
            "cpu_us": statistics.median(cpu[k]),
            "wall_samples": [round(v, 2) for v in wall[k]],
            "cpu_samples": [round(v, 2) for v in cpu[k]],
            "same_weights": same[k],
        }
    for clock in ("wall", "cpu"):
        base = rows["a"][f"{clock}_us"]
        for k in keys:
            rows[k][f"{clock}_added_us"] = rows[k][f"{clock}_us"] - base
            rows[k][f"{clock}_ratio"] = rows[k][f"{clock}_us"] / base
        if "b" in rows and "e" in rows:
            rows["e"][f"{clock}_per_handler_us"] = (rows["e"][f"{clock}_us"] - rows["b"][f"{clock}_us"]) / N_CALLBACKS
    return {"desc": workload["desc"], "batches": n, "reps": reps, "warmup": warmup, "rows": rows}


def targets(result: dict[str, Any], clock: str) -> list[tuple[str, bool, str]]:
    rows = result["rows"]
    a, b, c = (rows[k][f"{clock}_us"] for k in ("a", "b", "c"))
    d, e = rows["d"][f"{clock}_us"], rows["e"][f"{clock}_us"]
    per = (e - b) / N_CALLBACKS
    return [
        ("(b) within 3% of (a)", b <= 1.03 * a, f"{(b / a - 1) * 100:+.1f}%"),
        ("(b) adds < 5 us/step", b - a < 5.0, f"{b - a:+.2f} us"),
        ("(c) within 5% of (a)", c <= 1.05 * a, f"{(c / a - 1) * 100:+.1f}%"),
        ("(d) adds < 1 us/step over (b)", d - b < 1.0, f"{d - b:+.2f} us"),
        ("(e) < 0.5 us per handler call", per < 0.5, f"{per:.3f} us"),
    ]


def print_table(result: dict[str, Any], out: Any = sys.stdout) -> None:
    rows = result["rows"]
    print(
        f"\n## {result['desc']}: {result['batches']} batches/epoch, median of {result['reps']} "
        f"interleaved reps after {result['warmup']} warm-up\n",
        file=out,
    )
    print("| | variant | wall us/step | added | ratio | cpu us/step | added | ratio | weights |", file=out)
    print("|---|---|---:|---:|---:|---:|---:|---:|---|", file=out)
    for k, r in rows.items():
        print(
            f"| {k} | {r['label']} | {r['wall_us']:.1f} | {r['wall_added_us']:+.1f} | "
            f"{r['wall_ratio']:.3f} | {r['cpu_us']:.1f} | {r['cpu_added_us']:+.1f} | "
            f"{r['cpu_ratio']:.3f} | {'same' if r['same_weights'] else 'DIFFERENT'} |",
            file=out,
        )
    if "e" in rows:
        print(
            f"\n(e) per listening handler: wall {rows['e']['wall_per_handler_us']:.3f} us, "
            f"cpu {rows['e']['cpu_per_handler_us']:.3f} us per call",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--reps", type=int, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repetitions first")
    parser.add_argument("--batches", type=int, help="batches per epoch (MLP; Linear gets 2x)")
    parser.add_argument("--workloads", default="mlp,linear", help="comma-separated: mlp,linear")
    parser.add_argument("--no-peers", action="store_true", help="skip the Ignite/Lightning rows")
    parser.add_argument("--only", help="comma-separated variant keys to run (a is always run)")
    parser.add_argument(
        "--check", action="store_true",
        help="exit 1 when a target misses (MLP, CPU-time medians) or weights differ",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    reps = args.reps or (5 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    batches = args.batches or (300 if args.quick else 1000)
    peers = add_peer_variants(not args.no_peers)
    keys = list(VARIANTS)
    if args.only:
        wanted = {"a", *args.only.split(",")}
        keys = [k for k in keys if k in wanted]

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "corolux": getattr(corolux, "__version__", "?"),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "peers": {p: _version(p) for p in peers},
        "argv": sys.argv[1:] if argv is None else argv,
    }
    print(
        f"corolux overhead: Python {info['python']}, torch {info['torch']}, {info['processor']} "
        f"({info['cores']} cores), 1 torch thread; peers: {info['peers'] or 'none importable'}"
    )
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    for name in args.workloads.split(","):
        n = batches if name == "mlp" else 2 * batches
        workload = make_workload(name, n)
        results[name] = measure(workload, keys, reps, warmup)
        print_table(results[name])
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")

    failed = False
    if "mlp" in results and all(k in results["mlp"]["rows"] for k in "abcde"):
        print("\n## Targets (MLP workload, medians)\n")
        status = {}
        for clock in ("cpu", "wall"):
            status[clock] = targets(results["mlp"], clock)
        print("| target | cpu time | wall time |")
        print("|---|---|---|")
        for (label, ok_c, v_c), (_, ok_w, v_w) in zip(status["cpu"], status["wall"], strict=True):
            print(f"| {label} | {'ok' if ok_c else 'MISS'} {v_c} | {'ok' if ok_w else 'MISS'} {v_w} |")
        failed = not all(ok for _, ok, _ in status["cpu"])
        results["targets"] = {
            clock: [{"target": t, "ok": ok, "value": v} for t, ok, v in s] for clock, s in status.items()
        }
    mismatched = [
        f"{w}/{k}" for w, r in results.items() if w != "targets" for k, row in r["rows"].items()
        if not row["same_weights"]
    ]
    if mismatched:
        print(f"\nWEIGHTS DIFFER from the hand-written loop: {', '.join(mismatched)}")
        failed = True
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 1 if (args.check and failed) else 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(module: str) -> str:
    name = {"ignite": "ignite", "lightning": "lightning"}.get(module.split("-")[0], module)
    try:
        return getattr(__import__(name), "__version__", "?")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
