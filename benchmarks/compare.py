"""Overhead of two versions of corolux, measured in one process: before vs after a change.

The "old" version is a git revision of ``corolux/`` (``--baseline REV``, default ``HEAD``),
exported to a temporary directory, or an already-extracted package (``--baseline-dir PATH``,
a directory that contains ``corolux/``); the "new" version is the working tree's
``corolux/``. Both are imported into this process:

1. the old package is imported from its directory (first on ``sys.path``), then every
   ``corolux`` / ``corolux.*`` entry of ``sys.modules`` is moved to ``corolux_baseline`` /
   ``corolux_baseline.*`` (the modules already hold references to each other, so the old
   copy keeps working) and the directory leaves ``sys.path``;
2. the working tree's ``corolux`` is imported normally (the repository root first on
   ``sys.path``), and the two ``Trainer`` classes are checked to be different objects
   whose code comes from different files.

With ``--copies N`` (default 3), each version is imported N times (the further copies by
the same renaming: ``corolux_baseline_1``, ``corolux_new_1``, ...; the working tree's last,
as ``corolux``), and each rebuild (below) draws one copy per row: the same code at another
address runs at a slightly different speed, and one copy per version would make that a
bias of the whole process.

Caveat: an ``import`` that the OLD code runs inside a function (``from corolux.debug import
Stepper`` in ``Trainer.stepper()``, ``from corolux._suggest import did_you_mean`` on an error
path of the loop) looks its module up in ``sys.modules`` by name, so it gets the NEW copy;
third-party lazy imports (``from tqdm.auto import tqdm`` in the progress bar) are shared. None
of these runs on the timed path of ``fit(..., progress=False)``: every ``import`` statement
that corolux code executes during each row's first fits (the weight check, before the
timing) is recorded (through ``builtins.__import__``) and reported, with a warning when old
code imports a corolux module.
Likewise, ``inspect.getfile(cls)`` and pickling resolve an old class through
``cls.__module__`` (``"corolux.trainer"``) to the NEW module; this script reads code
objects' ``co_filename`` instead.

Rows, timed in interleaved repetitions (every repetition runs each row once; the orders
follow a cycle in which every row comes right after every other row equally often and old
runs before new as often as after: see ``schedule()``), CPU time of this thread, one torch
thread:

  (a)   the hand-written loop of ``overhead.py`` (its workloads, too)
  (old) the baseline's ``Trainer(..., progress=False).fit(data, epochs=1)``
  (new) the working tree's, the same call
  with ``--variants``: (old-run) and (new-run), ``for event in trainer.run(data): pass``.

Identical code does not read identical: a fit's cost depends on what ran just before it,
on where its model's tensors, its Trainer and its code lie in memory, and a difference fixed
for the whole process is a bias that no interval shows. In the A/A test (old = new = HEAD)
a plain rotation of the rows and one model and Trainer per row for the whole run read new -
old at -0.3 to -1.0 us/step on the MLP, intervals excluding 0. Hence: the balanced cycle of
orders, model slots that old and new exchange every other half cycle, fresh models and
Trainers before every repetition (``--rebuild``, built in a random order between
allocations of random sizes), and several imported copies of each version (``--copies``).
With all of these, A/A runs read within about +-0.3 us/step on the MLP (their intervals
covering 0) and +-0.05 us/step on the null step. Each timed fit is then a fresh Trainer's
first fit; on the MLP, first fits measured within 0.2 us/step of later ones.

A row is one whole ``fit()`` (setup and teardown included) divided by its steps. The
result is the median over repetitions of the paired difference new - old (the same as
(new - a) - (old - a) within a repetition) with a distribution-free 95% interval (order
statistics). The MLP rows are what count (the same Python costs about 3.5x more among the
MLP's torch ops than on the null step), but the MLP's own step varies by +-10-30 us between
repetitions, hence many short repetitions; the null workload runs the same corolux code
with no math and resolves differences to a fraction of a microsecond. A line "per fit()"
gives the difference of a 1-batch fit (setup and teardown): divided by the batches per
repetition, it is the part of new - old that does not grow with the epoch.

Run:
    python benchmarks/compare.py                        # HEAD vs the working tree, ~95 s
    python benchmarks/compare.py --quick                # ~22 s
    python benchmarks/compare.py --baseline HEAD~3 --variants --json cmp.json
    python benchmarks/compare.py --baseline-dir /tmp/old   # /tmp/old/corolux/__init__.py
"""

from __future__ import annotations

import argparse
import builtins
import copy
import gc
import importlib
import importlib.util
import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE = "corolux_baseline"

Runner = Callable[[], tuple[float, float]]
Build = Callable[[torch.nn.Module, dict[str, Any]], Runner]
Rows = dict[str, tuple[str, list[Build]]]  # key -> (label, a Build per imported copy)


# -- the two versions -----------------------------------------------------------------------


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=False)


def export_revision(rev: str, dest: Path) -> str:
    """Extract ``corolux/`` of git revision ``rev`` into ``dest``; return the commit hash."""
    found = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found.returncode != 0:
        raise SystemExit(f"compare.py: {rev!r} is not a git revision of {REPO}")
    sha = found.stdout.decode().strip()
    archive = _git("archive", "--format=tar", sha, "corolux")
    if archive.returncode != 0:
        raise SystemExit(
            f"compare.py: git archive {sha[:10]} corolux failed: {archive.stderr.decode().strip()}"
        )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return sha


def _corolux_names() -> list[str]:
    return [n for n in sys.modules if n == "corolux" or n.startswith("corolux.")]


def import_baseline(root: Path, alias: str = BASELINE) -> ModuleType:
    """Import ``root/corolux`` and move its modules to ``<alias>[.*]`` (``corolux_baseline``)."""
    if _corolux_names():
        raise RuntimeError(f"corolux is already imported ({_corolux_names()[:3]}): import the baseline first")
    init = root / "corolux" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"compare.py: {init} does not exist (--baseline-dir must contain corolux/)")
    package = _import_corolux_from(root, "the baseline")
    for name in _corolux_names():
        sys.modules[alias + name[len("corolux") :]] = sys.modules.pop(name)
    importlib.invalidate_caches()
    return package


def import_new() -> ModuleType:
    """Import the working tree's ``corolux`` (the repository root first on ``sys.path``)."""
    return _import_corolux_from(REPO, "the working tree's")


def _import_corolux_from(root: Path, which: str) -> ModuleType:
    """``import corolux`` with ``root`` first on ``sys.path``; check that it is ``root/corolux``
    (``which`` names the import in the error)."""
    init = root / "corolux" / "__init__.py"
    sys.path.insert(0, str(root))
    try:
        package = importlib.import_module("corolux")
    finally:
        sys.path.remove(str(root))
    if Path(package.__file__ or "").resolve() != init.resolve():
        raise RuntimeError(f"{which} import found {package.__file__}, not {init}")
    return package


def _module_files(prefix: str) -> dict[str, Path]:
    return {
        name: Path(m.__file__).resolve()
        for name, m in list(sys.modules.items())
        if (name == prefix or name.startswith(prefix + ".")) and getattr(m, "__file__", None)
    }


def check_versions(
    old: ModuleType, new: ModuleType, old_root: Path, extra: dict[str, Path]
) -> tuple[str, str]:
    """Assert the two versions are distinct and each module comes from its own directory
    (``extra``: the names of further copies, and the directory each must come from)."""
    # co_filename, not inspect.getfile(): the latter goes through cls.__module__, which for
    # the old Trainer ("corolux.trainer") now names the NEW module.
    old_file = old.Trainer.fit.__code__.co_filename
    new_file = new.Trainer.fit.__code__.co_filename
    assert old.Trainer is not new.Trainer, "old and new Trainer are the same class"
    assert Path(old_file).resolve() != Path(new_file).resolve(), f"both Trainers come from {old_file}"
    dirs = {BASELINE: old_root, "corolux": REPO, **extra}
    for prefix, root in dirs.items():
        where = (root / "corolux").resolve()
        files = _module_files(prefix)
        assert files, f"no {prefix} modules"
        for name, path in files.items():
            assert path.is_relative_to(where), f"{name} comes from {path}, not {where}"
    return old_file, new_file


class ImportWatch:
    """Record the ``import`` statements that corolux code runs (old or new copy)."""

    def __init__(self, old_dir: Path, new_dir: Path) -> None:
        self.dirs = {"old": str(old_dir.resolve()) + os.sep, "new": str(new_dir.resolve()) + os.sep}
        self.seen: list[dict[str, Any]] = []

    @contextmanager
    def watching(self) -> Iterator[None]:
        original = builtins.__import__

        def hook(
            name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
        ) -> Any:
            where = (globals or {}).get("__file__") or ""
            for version, prefix in self.dirs.items():
                if where.startswith(prefix):
                    entry = {
                        "version": version,
                        "in": os.path.relpath(where, os.path.dirname(prefix.rstrip(os.sep))),
                        "import": ("." * level) + name,
                        "names": list(fromlist or ()),
                    }
                    if entry not in self.seen:
                        self.seen.append(entry)
            return original(name, globals, locals, fromlist, level)

        builtins.__import__ = hook
        try:
            yield
        finally:
            builtins.__import__ = original

    def crossing(self) -> list[dict[str, Any]]:
        """Imports by the old code that name a corolux module: they get the NEW copy."""
        return [
            e
            for e in self.seen
            if e["version"] == "old"
            and (e["import"] == "corolux" or e["import"].startswith(("corolux.", ".")))
        ]


def load_overhead() -> ModuleType:
    """overhead.py, imported by path (after both versions: its ``corolux`` is the new one)."""
    spec = importlib.util.spec_from_file_location("corolux_bench_overhead", HERE / "overhead.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- rows -------------------------------------------------------------------------------------


def corolux_row(overhead: ModuleType, package: ModuleType, kind: str) -> Build:
    """``Trainer(progress=False).fit(data, epochs=1)`` (kind "fit") or ``for event in
    trainer.run(data, epochs=1)`` (kind "run") of the given copy of corolux, timed by
    overhead.py's ``timed_runner()``."""

    def build(model: torch.nn.Module, w: dict[str, Any]) -> Runner:
        trainer = package.Trainer(
            model, loss_fn=w["loss_fn"], optimizer=w["opt"], device="cpu", progress=False
        )
        return overhead.timed_runner(trainer, w["data"], kind)

    return build


def schedule(keys: list[str], swaps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The orders of one cycle of repetitions: every repetition runs each row once, and over
    the cycle every row is preceded by every other row equally often (never by itself), and
    each pair in ``swaps`` runs in both orders equally often.

    A row's cost depends on what ran just before it (caches, the interpreter's state: a fit
    right after another fit is faster than one right after the hand-written loop), so a
    plain rotation, which balances the pairs' orders but not the predecessors, read identical
    code about 0.5-1 us/step apart on the MLP. Here: ``len(keys) - 1`` orders whose joined
    sequence, read cyclically, passes every transition X -> Y (X != Y) once, then the same
    orders with each pair of ``swaps`` exchanged (again every transition once).

    Each entry is (row, model slot). A row's cost also depends on where its model's tensors
    lie in memory: two Trainers of the SAME code on two copies of the model read up to
    ~1 us/step apart on the MLP, consistently within a process. So each row has a model
    slot, and in the second half of the cycle the rows of a pair in ``swaps`` exchange
    their slots: old runs on new's model and vice versa."""
    k = len(keys)
    first = tuple(range(k))
    perms = list(itertools.permutations(range(k)))

    def search(
        chosen: list[tuple[int, ...]], used: frozenset[tuple[int, int]]
    ) -> list[tuple[int, ...]] | None:
        if len(chosen) == k - 1:
            closing = (chosen[-1][-1], chosen[0][0])
            return chosen if closing[0] != closing[1] and closing not in used else None
        for p in perms if chosen else [first]:
            arcs = list(zip(p, p[1:], strict=False))
            if chosen:
                arcs.append((chosen[-1][-1], p[0]))
            if len(set(arcs)) == len(arcs) and all(x != y and (x, y) not in used for x, y in arcs):
                found = search([*chosen, p], used | set(arcs))
                if found:
                    return found
        return None

    found = search([], frozenset())
    assert found is not None, f"no balanced schedule for {k} rows"
    orders = [[keys[i] for i in p] for p in found]
    exchange = {x: y for pair in swaps for x, y in (pair, pair[::-1])}
    return [[(key, key) for key in o] for o in orders] + [
        [(exchange.get(key, key), key) for key in o] for o in orders
    ]


COMPARISONS = {"new - old": ("new", "old"), "new-run - old-run": ("new-run", "old-run")}


def check_weights(
    workload: dict[str, Any], rows: Rows, watch: ImportWatch, epochs: int = 2
) -> dict[str, bool]:
    """Train a fresh copy of the initial model with each row for ``epochs`` epochs (untimed,
    under the import watch: these are each version's first fits); whether the final weights
    equal the hand-written loop's, bit for bit."""
    models = {k: copy.deepcopy(workload["model"]) for k in rows}
    with watch.watching():
        for k, (_, builds) in rows.items():
            run = builds[0](models[k], workload)
            for _ in range(epochs):
                run()
    reference = models["a"].state_dict()
    return {
        k: all(torch.equal(reference[p], state[p]) for p in reference)
        for k, state in ((k, m.state_dict()) for k, m in models.items())
    }


def build_runners(
    workload: dict[str, Any], rows: Rows, cycle: list[list[tuple[str, str]]], rng: Any
) -> tuple[dict[tuple[str, str], Runner], list[Any]]:
    """Fresh model slots (copies of the initial model) and a runner per (row, slot) of the
    cycle, built in a random order with allocations of random sizes in between (kept alive
    with them), so that where they land in memory changes from one build to the next; each
    row draws one of its version's imported copies."""
    padding: list[Any] = []

    def pad() -> None:
        padding.append(bytearray(rng.randrange(1, 1 << 16)))
        padding.append(torch.empty(rng.randrange(1, 1 << 15)))
        padding.append([object() for _ in range(rng.randrange(1, 256))])

    slots: dict[str, torch.nn.Module] = {}
    for k in rng.sample(list(rows), len(rows)):
        pad()
        slots[k] = copy.deepcopy(workload["model"])
    entries = list(dict.fromkeys(e for o in cycle for e in o))
    runners: dict[tuple[str, str], Runner] = {}
    for entry in rng.sample(entries, len(entries)):
        pad()
        builds = rows[entry[0]][1]
        runners[entry] = builds[rng.randrange(len(builds))](slots[entry[1]], workload)
    return runners, padding


def measure(
    overhead: ModuleType,
    workload: dict[str, Any],
    rows: Rows,
    reps: int,
    warmup: int,
    rebuild: int,
    seed: int,
) -> dict[str, Any]:
    """Time every row ``reps`` times (rounded up to whole cycles), interleaved
    (``schedule()``), after ``warmup`` untimed repetitions; us/step.

    Before every ``rebuild``-th repetition (0: only once) the models and Trainers are built
    anew (``build_runners()``): a fit's cost depends on where its objects lie in memory
    (identical code read up to ~1 us/step apart on the MLP, consistently within a process),
    so the layout is drawn again and again and its effect becomes noise that the interval
    covers, rather than a bias that it does not."""
    n = len(workload["data"])
    keys = list(rows)
    cycle = schedule(keys, [pair for pair in COMPARISONS.values() if all(k in rows for k in pair)])
    reps = -(-reps // len(cycle)) * len(cycle)  # whole cycles
    rng = random.Random(seed)
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    wall: dict[str, list[float]] = {k: [] for k in keys}
    runners, padding = build_runners(workload, rows, cycle, rng)
    # As in overhead.py: what is alive now goes to the permanent generation, so that no
    # timed run pays for a full collection over torch's objects.
    gc.collect()
    gc.freeze()
    try:
        for rep in range(-warmup, reps):
            if rebuild and rep > 0 and rep % rebuild == 0:
                runners = padding = None  # type: ignore[assignment]
                runners, padding = build_runners(workload, rows, cycle, rng)
            for entry in cycle[rep % len(cycle)]:
                gc.collect()
                w, c = runners[entry]()
                if rep >= 0:
                    wall[entry[0]].append(w / n * 1e6)
                    cpu[entry[0]].append(c / n * 1e6)
    finally:
        gc.unfreeze()
    result: dict[str, Any] = {
        "desc": workload["desc"],
        "batches": n,
        "reps": reps,
        "warmup": warmup,
        "rebuild": rebuild,
        "cycle": cycle,
        "rows": {},
        "diffs": {},
    }
    for k in keys:
        result["rows"][k] = {
            "label": rows[k][0],
            "cpu_us": statistics.median(cpu[k]),
            "wall_us": statistics.median(wall[k]),
            "cpu_added": overhead.paired(cpu[k], cpu["a"]),
            "wall_added": overhead.paired(wall[k], wall["a"]),
            "cpu_samples": [round(v, 3) for v in cpu[k]],
            "wall_samples": [round(v, 3) for v in wall[k]],
        }
    for name, (x, y) in COMPARISONS.items():
        if x in rows and y in rows:
            result["diffs"][name] = {
                "cpu": overhead.paired(cpu[x], cpu[y]),
                "wall": overhead.paired(wall[x], wall[y]),
            }
    return result


def per_fit(overhead: ModuleType, old: ModuleType, new: ModuleType, runs: int) -> dict[str, Any]:
    """What one fit() costs besides its steps: 1-batch null fits of old and new, interleaved
    (alternating which goes first); CPU us."""
    one = overhead.make_workload("null", 1)
    fits = {
        "old": corolux_row(overhead, old, "fit")(copy.deepcopy(one["model"]), one),
        "new": corolux_row(overhead, new, "fit")(copy.deepcopy(one["model"]), one),
    }
    samples: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(runs + 5):
        for k in ("old", "new") if i % 2 else ("new", "old"):
            c = fits[k]()[1] * 1e6
            if i >= 5:
                samples[k].append(c)
    return {
        "old_us": statistics.median(samples["old"]),
        "new_us": statistics.median(samples["new"]),
        "new - old": overhead.paired(samples["new"], samples["old"]),
        "runs": runs,
    }


# -- report -----------------------------------------------------------------------------------


def verdict(lo: float, hi: float, budget: float) -> str:
    if hi <= budget:
        return f"within the {budget:g} us/step budget (the interval's upper end is below it)"
    if lo > budget:
        return f"OVER the {budget:g} us/step budget (the whole interval is above it)"
    return (
        f"not resolved against the {budget:g} us/step budget (the interval spans it): rerun with more --reps"
    )


def print_workload(result: dict[str, Any], budget: float | None) -> None:
    print(
        f"\n## {result['desc']}: {result['batches']} batches/fit, median of {result['reps']} "
        f"interleaved reps after {result['warmup']} warm-up (CPU time of this thread)\n"
    )
    print("| | row | us/step | added over (a) [95% CI] | wall us/step | weights vs (a) |")
    print("|---|---|---:|---:|---:|---|")
    for k, r in result["rows"].items():
        lo, hi = r["cpu_added"]["ci"]
        weights = "(reference)" if k == "a" else ("same" if r["same_weights"] else "DIFFERENT")
        added = "" if k == "a" else f"{r['cpu_added']['median']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        print(f"| {k} | {r['label']} | {r['cpu_us']:.2f} | {added} | {r['wall_us']:.2f} | {weights} |")
    print()
    for name, d in result["diffs"].items():
        c, w = d["cpu"], d["wall"]
        line = (
            f"**{name}: {c['median']:+.2f} us/step [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]** "
            f"(wall {w['median']:+.2f} [{w['ci'][0]:+.2f}, {w['ci'][1]:+.2f}])"
        )
        if budget is not None:
            line += f": {verdict(*c['ci'], budget)}"
        print(f"- {line}")
    different = [k for k, r in result["rows"].items() if not r["same_weights"]]
    if different:
        print(
            f"\nNOTE: after 2 epochs from the same initial weights, the weights of "
            f"{', '.join(different)} differ from the hand-written loop's (torch.equal). A "
            "version may change the math on purpose; if this one should not, look into it. "
            "The timings are still reported."
        )


def report(info: dict[str, Any], results: dict[str, Any], budget: float) -> None:
    print(
        f"corolux old vs new: Python {info['python']}, torch {info['torch']}, {info['cpu']} "
        f"({info['cores']} cores), 1 torch thread"
    )
    print(f"- old: {info['old']['desc']} ({info['old']['file']})")
    print(f"- new: {info['new']['desc']} ({info['new']['file']})")
    for name, result in results["workloads"].items():
        print_workload(result, budget if name == "mlp" else None)
    fit = results.get("per_fit")
    if fit:
        d = fit["new - old"]
        spread = ", ".join(
            f"{d['median'] / r['batches']:+.3f} us/step at {r['batches']} batches"
            for r in results["workloads"].values()
        )
        print(
            f"\nPer fit() (a 1-batch null fit, median of {fit['runs']}; setup, epoch-end work, "
            f"teardown): old {fit['old_us']:.0f} us, new {fit['new_us']:.0f} us, new - old "
            f"{d['median']:+.1f} us [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}]; spread over the "
            f"steps of the rows above: {spread}."
        )
    print(
        "\nus/step: median over the repetitions; added: median of (row - (a)) within a "
        "repetition; new - old: median of the paired differences within a repetition; "
        "intervals: 95%, distribution-free (order statistics)."
    )
    watch = results["imports"]
    print(
        "\nImports run by corolux code during the first fits of each row (the weight check): "
        + (
            "; ".join(f"{e['version']}: {e['in']}: {e['import']} {e['names']}" for e in watch["seen"])
            or "none"
        )
    )
    if watch["crossing"]:
        print(
            "WARNING: old corolux code imported corolux modules during a fit; they resolve to the "
            "NEW copy, so part of the old row ran new code: "
            + "; ".join(f"{e['in']}: {e['import']}" for e in watch["crossing"])
        )
    print(f"\n(measured in {info['seconds']} s)")


def _working_tree_state() -> str:
    head = _git("rev-parse", "--short", "HEAD").stdout.decode().strip() or "?"
    dirty = _git("status", "--porcelain", "--", "corolux").stdout.decode().strip()
    state = "with uncommitted changes to corolux/ over" if dirty else "clean, same as"
    return f"working tree ({state} HEAD {head})"


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--baseline", default="HEAD", metavar="REV", help="git revision of the old version")
    where.add_argument("--baseline-dir", metavar="PATH", help="a directory containing the old corolux/")
    parser.add_argument("--quick", action="store_true", help="a short run (~22 s: 300 reps)")
    parser.add_argument("--reps", type=int, help="timed repetitions per workload (default 1400, --quick 300)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument(
        "--batches",
        type=int,
        default=50,
        help="batches per fit of the MLP (default 50; linear: 2x, null: 6x)",
    )
    parser.add_argument("--workloads", default="mlp,null", help="comma-separated: mlp,linear,null")
    parser.add_argument(
        "--rebuild",
        type=int,
        default=1,
        help="build fresh models and Trainers every N repetitions (default 1: every one; 0: once)",
    )
    parser.add_argument(
        "--copies",
        type=int,
        default=3,
        help="import each version N times; each rebuild draws one copy per row (default 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the rebuilds' random layout")
    parser.add_argument("--variants", action="store_true", help="add the for-event-in-run() rows")
    parser.add_argument("--budget", type=float, default=0.5, help="us/step allowed on the MLP (default 0.5)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.copies < 1 or args.rebuild < 0 or args.warmup < 0:
        parser.error("--copies must be >= 1, --rebuild and --warmup >= 0")
    workloads = args.workloads.split(",")
    if unknown := set(workloads) - {"mlp", "linear", "null"}:
        parser.error(f"unknown workloads {sorted(unknown)}; expected mlp, linear, null")
    reps = args.reps or (300 if args.quick else 1400)
    batches = args.batches

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corolux-baseline-") as tmp:
        if args.baseline_dir:
            old_root = Path(args.baseline_dir).resolve()
            old_desc = f"--baseline-dir {old_root}"
            sha = None
        else:
            old_root = Path(tmp)
            sha = export_revision(args.baseline, old_root)
            old_desc = f"git {args.baseline} = {sha[:10]}"
        # Further copies of each version (--copies): each rebuild draws one per row.
        olds, news, extra = [import_baseline(old_root)], [], {}
        for i in range(1, args.copies):
            olds.append(import_baseline(old_root, f"{BASELINE}_{i}"))
            news.append(import_baseline(REPO, f"corolux_new_{i}"))
            extra |= {f"{BASELINE}_{i}": old_root, f"corolux_new_{i}": REPO}
        old = olds[0]
        new = import_new()
        news.insert(0, new)
        old_file, new_file = check_versions(old, new, old_root, extra)
        overhead = load_overhead()
        torch.set_num_threads(1)

        def copies(packages: list[ModuleType], kind: str) -> list[Build]:
            return [corolux_row(overhead, package, kind) for package in packages]

        rows: Rows = {
            "a": ("hand-written loop", [overhead.variant_hand]),
            "old": ("old corolux fit, progress=False", copies(olds, "fit")),
            "new": ("new corolux fit, progress=False", copies(news, "fit")),
        }
        if args.variants:
            rows["old-run"] = ("old corolux `for event in trainer.run()`", copies(olds, "run"))
            rows["new-run"] = ("new corolux `for event in trainer.run()`", copies(news, "run"))
        watch = ImportWatch(old_root / "corolux", REPO / "corolux")
        results: dict[str, Any] = {"workloads": {}}
        scale = {"mlp": 1, "linear": 2, "null": 6}
        for name in workloads:
            workload = overhead.make_workload(name, batches * scale[name])
            same = check_weights(workload, rows, watch)
            results["workloads"][name] = measure(
                overhead, workload, rows, reps, args.warmup, args.rebuild, args.seed
            )
            for k, r in results["workloads"][name]["rows"].items():
                r["same_weights"] = same[k]
            print(f"measured {workload['desc']} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
        results["per_fit"] = per_fit(overhead, old, new, 100 if args.quick else 300)
        results["imports"] = {"seen": watch.seen, "crossing": watch.crossing()}

    info = {
        **overhead.machine_info(),
        "old": {"desc": old_desc, "commit": sha, "file": old_file},
        "new": {"desc": _working_tree_state(), "file": new_file},
        "argv": sys.argv[1:] if argv is None else argv,
        "seconds": round(time.perf_counter() - t_start),
    }
    report(info, results, args.budget)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
