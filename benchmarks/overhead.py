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

Three workloads: an MLP 32-64-10 on batches of 64 (CrossEntropy, SGD), the one the targets
are set on; a Linear 8->2 on batches of 8, where the framework overhead dominates; and a
null step (the model returns a parameter, the loss is a constant whose backward does
nothing, the optimizer does nothing), where only the loops' own cost is left, small enough
to measure to a fraction of a microsecond. Data is a list of (x, y) batches in memory (no
shuffling), so every variant does the same math on the same batches: each variant's final
weights must equal the hand-written loop's, bit for bit.

A corolux row is the whole ``fit()`` call (setup and teardown included) divided by the
number of steps. An Ignite row is the whole ``engine.run()``. A Lightning row is timed from
``on_train_epoch_start`` to ``on_train_epoch_end`` (its ``fit()`` setup, about 0.1-0.3 s, is
left out).

"added" is the median over the repetitions of (variant - (a)) within the same repetition,
and "ratio" is 1 + added / median(a): pairs that ran back to back share the machine's slow
spells, so their difference is steadier than a difference of medians. Both the thread's CPU
time and the wall-clock time are measured; the targets are judged on CPU time, which does not
count the time other processes held the core (on a busy 2-core machine this matters).

Run:
    python benchmarks/overhead.py --quick            # ~20 s (~40 s with Ignite and Lightning)
    python benchmarks/overhead.py --json out.json    # the full run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
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


def _no_backward(*args: Any, **kwargs: Any) -> None:
    pass


# The null loss is a plain 0-dim tensor, as a real loss is (so detaching and stacking it
# cost what they cost in the MLP workload), whose backward is an instance attribute that
# does nothing. (A Tensor subclass would do too, but its detach() builds a subclass instance
# and its stack() goes through the torch-function protocol: about 1 us more per step,
# which no real loss pays; measured with corolux fit() on this workload.)
_NULL_LOSS = torch.zeros(())
_NULL_LOSS.backward = _no_backward  # type: ignore[method-assign]


class _NullModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def _null_loss(pred: Any, target: Any) -> torch.Tensor:
    return _NULL_LOSS


class _NullOptimizer(torch.optim.Optimizer):
    """step() and zero_grad() do nothing; step() runs a closure (Lightning passes one)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        # torch wraps Optimizer.step in a profiling hook (about 10 us here); the instance
        # attribute bypasses it, so the null workload measures the loops alone.
        self.step = self._step  # type: ignore[method-assign]

    def _step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def make_workload(name: str, n_batches: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loss_fn: Callable[..., Any] = torch.nn.CrossEntropyLoss()
    opt: Callable[[Any], torch.optim.Optimizer] = make_opt
    if name == "mlp":
        features, hidden, classes, batch = 32, 64, 10, 64
        model: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes)
        )
        desc = "MLP 32-64-10, batch 64"
    elif name == "linear":
        features, classes, batch = 8, 2, 8
        model = torch.nn.Linear(features, classes)
        desc = "Linear 8->2, batch 8"
    elif name == "null":
        # No math at all: the model returns a parameter, the loss is a constant whose
        # backward does nothing, the optimizer does nothing. What is left is the loop itself.
        features, classes, batch = 1, 1, 1
        model = _NullModel()
        loss_fn, opt = _null_loss, lambda params: _NullOptimizer(params)
        desc = "null step (no math: framework overhead alone)"
    else:
        raise ValueError(f"unknown workload {name!r}; expected mlp, linear or null")
    data = [
        (torch.randn(batch, features, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(n_batches)
    ]
    return {
        "name": name,
        "desc": desc,
        "model": model,
        "data": data,
        "batch": batch,
        "loss_fn": loss_fn,
        "opt": opt,
    }


LR = 0.01


def make_opt(params: Any) -> torch.optim.Optimizer:
    # Plain SGD holds no state, so runs that rebuild their optimizer (Lightning) do the same math.
    return torch.optim.SGD(params, lr=LR)


# -- variants ---------------------------------------------------------------------------------
# Each variant is built once per workload with its own copy of the initial model; calling
# it runs one epoch over the data and returns (wall seconds, thread-CPU seconds) of the
# timed part. All variants run the same number of epochs, so their final weights agree.

Runner = Callable[[], tuple[float, float]]


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


def variant_hand(model: torch.nn.Module, w: dict[str, Any]) -> Runner:
    opt = w["opt"](model.parameters())
    loss_fn = w["loss_fn"]
    data = w["data"]

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


def variant_hand_losses(model: torch.nn.Module, w: dict[str, Any]) -> Runner:
    opt = w["opt"](model.parameters())
    loss_fn = w["loss_fn"]
    data = w["data"]

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


def variant_corolux(kind: str) -> Callable[[torch.nn.Module, dict[str, Any]], Runner]:
    def build(model: torch.nn.Module, w: dict[str, Any]) -> Runner:
        data = w["data"]
        progress = kind == "progress"
        trainer = corolux.Trainer(
            model, loss_fn=w["loss_fn"], optimizer=w["opt"], device="cpu", progress=progress
        )
        sink = tempfile.TemporaryFile("w+") if progress else None  # noqa: SIM115 - lives with the runner

        def callbacks() -> list[Any]:
            if sink is not None:
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
            return timed_runner(trainer, data, "run")
        return timed_runner(trainer, data, "fit", callbacks)

    return build


def timed_runner(
    trainer: Any, data: Any, kind: str = "fit", callbacks: Callable[[], list[Any]] | None = None
) -> Runner:
    """The timed part of a corolux row: ``trainer.fit(data, epochs=1)`` (kind "fit"), with
    ``callbacks=callbacks()`` when given (built before the clock starts), or ``for event in
    trainer.run(data, epochs=1)`` consumed by hand (kind "run"). compare.py times its two
    versions of corolux with it."""
    if kind == "run":

        def run_by_hand() -> tuple[float, float]:
            t0 = _clock()
            for _event in trainer.run(data, epochs=1):
                pass
            return _since(t0)

        return run_by_hand
    if callbacks is None:

        def fit() -> tuple[float, float]:
            t0 = _clock()
            trainer.fit(data, epochs=1)
            return _since(t0)

        return fit

    def fit_with_callbacks() -> tuple[float, float]:
        cbs = callbacks()
        t0 = _clock()
        trainer.fit(data, epochs=1, callbacks=cbs)
        return _since(t0)

    return fit_with_callbacks


def variant_ignite(supervised: bool) -> Callable[[torch.nn.Module, dict[str, Any]], Runner]:
    def build(model: torch.nn.Module, w: dict[str, Any]) -> Runner:
        from ignite.engine import Engine, create_supervised_trainer

        opt = w["opt"](model.parameters())
        loss_fn = w["loss_fn"]
        data = w["data"]
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


def variant_lightning(model: torch.nn.Module, w: dict[str, Any]) -> Runner | None:
    if w["name"] == "null":
        return None  # Lightning transforms the loss, so the no-op backward cannot survive
    import logging
    import warnings

    import lightning.pytorch as pl

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    make, loss_fn, data = w["opt"], w["loss_fn"], w["data"]

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return loss_fn(self.model(x), y)

        def configure_optimizers(self) -> Any:
            return make(self.model.parameters())

    class Timer(pl.Callback):
        elapsed = (math.nan, math.nan)

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.t0 = _clock()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.elapsed = _since(self.t0)

    class Batches:
        """The same list, but not a list: Lightning reads a list as several dataloaders."""

        def __iter__(self) -> Any:
            return iter(data)

        def __len__(self) -> int:
            return len(data)

    module = Module()
    batches = Batches()

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
        trainer.fit(module, train_dataloaders=batches)
        return timer.elapsed

    return run


VARIANTS: dict[str, tuple[str, Callable[[torch.nn.Module, dict[str, Any]], Runner | None]]] = {
    "a": ("hand-written loop", variant_hand),
    "a+": ("hand-written + detached losses kept, epoch mean", variant_hand_losses),
    "b": ("corolux fit, progress=False", variant_corolux("plain")),
    "c": ("corolux fit, progress bar on (to a file)", variant_corolux("progress")),
    "d": (f"corolux + {N_CALLBACKS} callbacks on on_epoch_end only", variant_corolux("idle")),
    "e": (f"corolux + {N_CALLBACKS} callbacks on on_train_batch_end", variant_corolux("listening")),
    "f": ("corolux + a coroutine waking every batch", variant_corolux("coroutine")),
    "g": ("corolux `for event in trainer.run()`", variant_corolux("run")),
}


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:
        return False
    return True


def add_peer_variants(use_peers: bool) -> dict[str, str]:
    """Add the Ignite and Lightning rows when they are importable; return their versions."""
    found: dict[str, str] = {}
    if not use_peers:
        return found
    if _importable("ignite.engine"):
        import ignite

        VARIANTS["ignite"] = ("Ignite Engine(step), no .item()", variant_ignite(False))
        VARIANTS["ignite-sup"] = ("Ignite create_supervised_trainer (loss.item())", variant_ignite(True))
        found["pytorch-ignite"] = ignite.__version__
    if _importable("lightning.pytorch"):
        import lightning

        VARIANTS["lightning"] = ("Lightning Trainer(barebones=True), in-epoch", variant_lightning)
        found["lightning"] = lightning.__version__
    return found


# -- measuring --------------------------------------------------------------------------------


def measure(workload: dict[str, Any], keys: list[str], reps: int, warmup: int) -> dict[str, Any]:
    """Time every variant ``warmup + reps`` times, interleaved, rotating the order."""
    n = len(workload["data"])
    models = {k: copy.deepcopy(workload["model"]) for k in keys}
    built = {k: VARIANTS[k][1](models[k], workload) for k in keys}
    runners = {k: r for k, r in built.items() if r is not None}  # None: not for this workload
    keys = list(runners)
    samples: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in keys}, "cpu": {k: [] for k in keys}}
    # Objects alive now (torch, the data, the models) go to the permanent generation, so
    # the collections below and those the runs trigger do not walk them (a full collection
    # over torch's objects costs ~0.1 s and would land in whichever run triggered it).
    gc.collect()
    gc.freeze()
    for rep in range(warmup + reps):
        shift = rep % len(keys)
        for k in keys[shift:] + keys[:shift]:
            gc.collect()
            wall, cpu = runners[k]()
            if rep >= warmup:
                samples["wall"][k].append(wall / n * 1e6)
                samples["cpu"][k].append(cpu / n * 1e6)
    reference = models["a"].state_dict()
    rows: dict[str, dict[str, Any]] = {}
    for k in keys:
        state = models[k].state_dict()
        rows[k] = {
            "label": VARIANTS[k][0],
            "same_weights": all(torch.equal(reference[name], state[name]) for name in reference),
        }
    summarize(rows, samples)
    gc.unfreeze()
    return {
        "desc": workload["desc"],
        "batches": n,
        "reps": reps,
        "warmup": warmup,
        "rows": rows,
    }


def summarize(rows: dict[str, dict[str, Any]], samples: dict[str, dict[str, list[float]]]) -> None:
    """Fill each row's medians, paired differences to (a) and their intervals, from the
    per-repetition samples (``samples[clock][variant]``, us/step)."""
    keys = list(rows)
    for clock, by_key in samples.items():
        base = by_key["a"]
        median_a = statistics.median(base)
        for k in keys:
            # "added" is the median of the per-repetition differences to (a): each pair ran
            # back to back, so slow spells of the machine cancel out.
            diff = paired(by_key[k], base)
            added = diff["median"]
            rows[k][f"{clock}_us"] = statistics.median(by_key[k])
            rows[k][f"{clock}_added_us"] = added
            rows[k][f"{clock}_added_ci"] = diff["ci"]
            rows[k][f"{clock}_ratio"] = 1 + added / median_a
            rows[k][f"{clock}_samples"] = [round(v, 3) for v in by_key[k]]
        for k in ("d", "e", "f", "c", "g"):
            if k in by_key and "b" in by_key:
                rows[k][f"{clock}_over_b_us"] = statistics.median(
                    v - b for v, b in zip(by_key[k], by_key["b"], strict=True)
                )
        if "e" in rows and "b" in rows:
            rows["e"][f"{clock}_per_handler_us"] = rows["e"][f"{clock}_over_b_us"] / N_CALLBACKS


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median (order statistics)."""
    v = sorted(values)
    n = len(v)
    k = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    return v[k], v[n - 1 - k]


def paired(x: list[float], y: list[float]) -> dict[str, Any]:
    """The median of the paired differences ``x - y`` (each pair from one repetition) and its
    ~95% interval."""
    diffs = [a - b for a, b in zip(x, y, strict=True)]
    return {"median": statistics.median(diffs), "ci": median_ci(diffs)}


def per_run_costs(workload: dict[str, Any], runs: int) -> dict[str, float]:
    """What one fit() costs besides its steps (setup, per-epoch work, teardown): a fit of a
    single batch, minus one hand-written step. The 10th percentile of ``runs`` fits, in us."""
    one = dict(workload, data=workload["data"][:1])
    keys = ["a", "b", "c", "d"]
    runners = {k: VARIANTS[k][1](copy.deepcopy(one["model"]), one) for k in keys}
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(runs):
        for k in keys:
            samples[k].append(runners[k]()[1] * 1e6)  # type: ignore[misc]
    p10 = {k: sorted(v)[len(v) // 10] for k, v in samples.items()}
    return {k: p10[k] - p10["a"] for k in keys if k != "a"}


def targets(results: dict[str, Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    """Judge the issue's targets (set on the MLP workload).

    The absolute costs are taken from the null workload when it ran: it runs the same
    corolux code with no math, so they are resolved to a fraction of a microsecond, where
    the MLP's own step varies by +-10 us between repetitions on a busy machine. The ratios
    are those costs over the MLP's hand-written step. Without the null workload, the MLP's
    paired medians are used directly.
    """
    mlp = results["mlp"]["rows"]
    src = results["null"]["rows"] if "null" in results else mlp
    where = "null workload" if "null" in results else "MLP workload"
    step = mlp["a"]["cpu_us"]
    b, c = src["b"]["cpu_added_us"], src["c"]["cpu_added_us"]
    d_over = src["d"]["cpu_over_b_us"]
    per = src["e"]["cpu_per_handler_us"]
    return where, [
        (
            "(b) within 3% of (a)",
            b / step <= 0.03,
            f"{b / step * 100:+.1f}% ({b:+.2f} us over {step:.0f} us)",
        ),
        ("(b) adds < 5 us/step", b < 5.0, f"{b:+.2f} us"),
        ("(c) within 5% of (a)", c / step <= 0.05, f"{c / step * 100:+.1f}% ({c:+.2f} us)"),
        ("(d) adds < 1 us/step over (b)", d_over < 1.0, f"{d_over:+.2f} us"),
        ("(e) < 0.5 us per handler call", per < 0.5, f"{per:.3f} us"),
    ]


def print_table(result: dict[str, Any], out: Any = sys.stdout) -> None:
    rows = result["rows"]
    print(
        f"\n## {result['desc']}: {result['batches']} batches/epoch, median of {result['reps']} "
        f"interleaved reps after {result['warmup']} warm-up\n",
        file=out,
    )
    print(
        "| | variant | us/step | added [95% CI] | ratio | wall us/step | weights |",
        file=out,
    )
    print("|---|---|---:|---:|---:|---:|---|", file=out)
    for k, r in rows.items():
        lo, hi = r["cpu_added_ci"]
        print(
            f"| {k} | {r['label']} | {r['cpu_us']:.1f} | {r['cpu_added_us']:+.1f} "
            f"[{lo:+.1f}, {hi:+.1f}] | {r['cpu_ratio']:.3f} | {r['wall_us']:.1f} | "
            f"{'same' if r['same_weights'] else 'DIFFERENT'} |",
            file=out,
        )
    notes = []
    for k, what in (("d", "(d) - (b)"), ("f", "(f) - (b)"), ("g", "(g) - (b)"), ("c", "(c) - (b)")):
        if k in rows and "cpu_over_b_us" in rows[k]:
            notes.append(f"{what}: {rows[k]['cpu_over_b_us']:+.2f} us/step")
    if "e" in rows and "cpu_per_handler_us" in rows["e"]:
        notes.append(
            f"(e) per listening handler call: ((e) - (b)) / {N_CALLBACKS} = "
            f"{rows['e']['cpu_per_handler_us']:.3f} us (wall {rows['e']['wall_per_handler_us']:.3f})"
        )
    if notes:
        print("\nCPU time, medians of paired differences: " + "; ".join(notes), file=out)
    print(
        "\nus/step: median over the repetitions; added: median of (variant - (a)) within a "
        "repetition, with a 95% interval; ratio: 1 + added / median (a). CPU time of this thread.",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--reps", type=int, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first")
    parser.add_argument("--batches", type=int, help="batches per epoch of the MLP (Linear: 2x, null: 6x)")
    parser.add_argument("--workloads", default="mlp,linear,null", help="comma-separated: mlp,linear,null")
    parser.add_argument("--no-peers", action="store_true", help="leave out the Ignite/Lightning rows")
    parser.add_argument("--only", help="comma-separated variant keys to run ((a) always runs)")
    parser.add_argument("--render", metavar="PATH", help="print the tables of a saved --json run")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target misses or weights differ",
    )
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        for name, result in saved["results"].items():
            if name != "per_run_us":
                rows = result["rows"]
                summarize(rows, {c: {k: r[f"{c}_samples"] for k, r in rows.items()} for c in ("wall", "cpu")})
        return report(saved["info"], saved["results"], None, args.check)

    torch.set_num_threads(1)
    reps = args.reps or (7 if args.quick else 21)
    warmup = args.warmup if args.warmup is not None else 1
    batches = args.batches or (200 if args.quick else 1000)
    peers = add_peer_variants(not args.no_peers)
    keys = list(VARIANTS)
    if args.only:
        wanted = {"a", *args.only.split(",")}
        keys = [k for k in keys if k in wanted]

    info = {
        **machine_info(),
        "peers": peers,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    results: dict[str, Any] = {}
    t_start = time.perf_counter()
    scale = {"mlp": 1, "linear": 2, "null": 6}
    for name in args.workloads.split(","):
        workload = make_workload(name, batches * scale.get(name, 1))
        # The null workload is cheap: more repetitions for the same time.
        n_reps = reps * 2 if name == "null" else reps
        results[name] = measure(workload, keys, n_reps, warmup)
        print(f"measured {workload['desc']} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    if all(k in keys for k in "abcd"):
        results["per_run_us"] = per_run_costs(make_workload("null", 1), runs=30 if args.quick else 100)
    info["seconds"] = round(time.perf_counter() - t_start)
    return report(info, results, args.json, args.check)


def report(info: dict[str, Any], results: dict[str, Any], path: str | None, check: bool) -> int:
    """Print the tables and the targets; write the JSON; the exit status."""
    peers = info.get("peers", {})
    print(
        f"corolux overhead: Python {info['python']}, torch {info['torch']}, {info['cpu']} "
        f"({info['cores']} cores), 1 torch thread; peers: "
        f"{', '.join(f'{k} {v}' for k, v in peers.items()) or 'none importable'}"
    )
    for name, result in results.items():
        if name != "per_run_us":
            print_table(result)
    fixed = results.get("per_run_us")
    if fixed:
        print(
            "\nPer fit() besides its steps (setup, epoch-end work, teardown; a 1-batch fit minus "
            f"a hand-written step, CPU time): (b) {fixed['b']:.0f} us, (c) {fixed['c']:.0f} us, "
            f"(d) {fixed['d']:.0f} us. Spread over an epoch's steps, it is in the rows above."
        )
    if "seconds" in info:
        print(f"\n(measured in {info['seconds']} s)")

    failed = False
    summary: dict[str, Any] = {}
    if "mlp" in results and all(k in results["mlp"]["rows"] for k in "abcde"):
        where, status = targets(results)
        print(f"\n## Targets (MLP workload; absolute costs from the {where}, CPU time)\n")
        print("| target | | measured |")
        print("|---|---|---|")
        for label, ok, value in status:
            print(f"| {label} | {'ok' if ok else 'MISS'} | {value} |")
        failed = not all(ok for _, ok, _ in status)
        summary = {"from": where, "targets": [{"target": t, "ok": ok, "value": v} for t, ok, v in status]}
    mismatched = [
        f"{w}/{k}"
        for w, r in results.items()
        if w != "per_run_us"
        for k, row in r["rows"].items()
        if not row["same_weights"]
    ]
    if mismatched:
        print(f"\nWEIGHTS DIFFER from the hand-written loop: {', '.join(mismatched)}")
        failed = True
    if path:
        with open(path, "w") as f:
            json.dump({"info": info, "results": results, "targets": summary}, f, indent=1)
        print(f"\nwrote {path}")
    return 1 if (check and failed) else 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    """Where a run was measured: Python, torch, the CPU, its cores and torch's threads now."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    sys.exit(main())
