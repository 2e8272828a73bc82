"""Per-step instructions and simulated cache misses, counted by Valgrind's cachegrind.

Timing on a shared 2-core machine resolves about 0.5 us/step after 1400 repetitions
(``compare.py``); cachegrind counts the same run the same way every time. It runs each row
in a fresh process under ``valgrind --tool=cachegrind`` twice, for 1 and for 2 timed epochs
after the same warm-up, and reports the difference divided by the epoch's batches: what one
step costs, with the import, the set-up and the warm-up cancelled out.

    python benchmarks/cachegrind.py                       # rows a and b on the MLP, ~3 min
    python benchmarks/cachegrind.py --rows a,b,fxy,eval-hand,eval --functions 25
    python benchmarks/cachegrind.py --baseline HEAD~1     # adds b-old: b with corolux at REV

Rows: ``a`` overhead.py's hand-written loop, ``a+`` it keeping its detached losses, ``b``
``Trainer.fit(list)``, ``fxy`` ``fit((x, y), batch_size=64)`` (shuffled in-memory tensors),
``eval-hand`` a hand ``no_grad`` loop over the list, ``eval`` ``evaluate(list)``. Columns:
instructions (Ir), first-level instruction and data misses (I1, D1), and misses of the
last level (LLi, LLd), simulated with this machine's L1 (32 KiB, 8 ways) and, as the last
level, its per-core L2 (512 KiB, 8 ways): a last-level miss is a trip to the shared L3.
``--functions N`` lists the N C functions whose counts differ most from the first row.

What it says and what it does not: the counts are exact for the simulated caches, not
microseconds. On the MLP, corolux's step adds about 22,000 instructions to the hand loop's
966,000, about 600 misses of each first-level cache and 430 of the last level; some of
those last-level misses fall in torch's own code and kernels, which corolux's Python and
objects push out of the cache (see benchmarks/README.md, "Issue 14, third session"). A
change that cuts instructions but not misses may not show in time. The helper thread of the
BLAS library spins for as long as the process runs, so its function (``blas_thread_server``)
is left out of the sums. Needs ``valgrind`` on the PATH; each process runs about 60 times
slower than natively (the import of torch alone takes about a minute).
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROWS = ("a", "a+", "b", "fxy", "eval-hand", "eval")
EVENTS = ("Ir", "I1mr", "ILmr", "Dr", "D1mr", "DLmr", "Dw", "D1mw", "DLmw")
COLUMNS = {  # shown -> the events summed
    "Ir": ("Ir",),
    "I1 miss": ("I1mr",),
    "LLi miss": ("ILmr",),
    "D1 miss": ("D1mr", "D1mw"),
    "LLd miss": ("DLmr", "DLmw"),
}
BACKGROUND = ("blas_thread_server",)  # other threads' functions, left out of the sums
CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64")
HERE = Path(__file__).resolve().parent


def child(row: str, epochs: int, batches: int) -> None:
    """Build ``row``, run it twice untimed, then ``epochs`` times (inside cachegrind)."""
    sys.path.insert(0, str(HERE))
    import overhead as ob
    import torch

    expected = Path(os.environ["CACHEGRIND_COROLUX"])  # the corolux this row is to run
    if not Path(ob.corolux.__file__).resolve().is_relative_to(expected.resolve()):
        raise SystemExit(f"imported corolux from {ob.corolux.__file__}, expected it under {expected}")

    torch.set_num_threads(1)
    w = ob.in_memory("mlp", batches)
    model = copy.deepcopy(w["model"])
    builds = {
        "a": ob.variant_hand,
        "a+": ob.variant_hand_losses,
        "b": ob.variant_corolux("plain"),
        "fxy": ob.fit_corolux,
        "eval-hand": ob.hand_evaluate("list"),
        "eval": ob.corolux_call("evaluate", "list"),
    }
    run = builds[row](model, w)
    for _ in range(2 + epochs):
        run()


def counts(path: Path) -> dict[str, list[int]]:
    """The events of a cachegrind output file, summed by function."""
    by_function: dict[str, list[int]] = collections.defaultdict(lambda: [0] * len(EVENTS))
    names = EVENTS
    function = "?"
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                names = tuple(line.split()[1:])
                if names != EVENTS:
                    raise SystemExit(f"{path}: unexpected events {names}; expected {EVENTS}")
            elif line.startswith("fn="):
                function = line[3:].strip()
            elif line[:1].isdigit():
                totals = by_function[function]
                for i, value in enumerate(line.split()[1:]):
                    totals[i] += int(value)
    return by_function


def profile(row: str, epochs: int, batches: int, out: Path, pythonpath: str | None) -> Path:
    target = out / f"{row}-{epochs}.out"
    env = dict(os.environ, PYTHONHASHSEED="0", CACHEGRIND_COROLUX=pythonpath or str(HERE.parent))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        *CACHES,
        f"--cachegrind-out-file={target}",
        sys.executable,
        __file__,
        "--child",
        row.removesuffix("-old"),
        str(epochs),
        "--batches",
        str(batches),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{row}: cachegrind failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return target


def per_step(one: dict[str, list[int]], two: dict[str, list[int]], batches: int) -> dict[str, list[float]]:
    return {
        fn: [(b - a) / batches for a, b in zip(one.get(fn, [0] * len(EVENTS)), two[fn], strict=True)]
        for fn in two
    }


def column(values: list[float], name: str) -> float:
    return sum(values[EVENTS.index(event)] for event in COLUMNS[name])


def total(functions: dict[str, list[float]]) -> list[float]:
    sums = [0.0] * len(EVENTS)
    for fn, values in functions.items():
        if not fn.startswith(BACKGROUND):
            sums = [s + v for s, v in zip(sums, values, strict=True)]
    return sums


def weight(diff: list[float]) -> float:
    """How much a function's difference matters, for the listing: misses first, then Ir."""
    return abs(sum(column(diff, c) for c in COLUMNS if "miss" in c)) * 20 + abs(column(diff, "Ir"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--rows", default="a,b", help=f"comma-separated, the first the reference: {','.join(ROWS)}"
    )
    parser.add_argument("--batches", type=int, default=300, help="batches per epoch (MLP 32-64-10, batch 64)")
    parser.add_argument("--baseline", metavar="REV", help="add row b-old: fit(list) with corolux/ at git REV")
    parser.add_argument("--functions", type=int, default=0, help="list the N functions that differ most")
    parser.add_argument(
        "--jobs", type=int, default=2, help="processes at a time (the counts do not depend on it)"
    )
    parser.add_argument("--child", nargs=2, metavar=("ROW", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.batches)
        return 0
    rows = args.rows.split(",")
    if unknown := set(rows) - set(ROWS):
        parser.error(f"unknown rows {sorted(unknown)}; expected {', '.join(ROWS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        paths: dict[str, str | None] = dict.fromkeys(rows)
        if args.baseline:
            old = out / "old"
            old.mkdir()
            archive = subprocess.run(
                ["git", "archive", args.baseline, "corolux"], cwd=HERE.parent, capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            paths["b-old"] = str(old)
        jobs = [(row, epochs) for row in paths for epochs in (1, 2)]
        with ThreadPoolExecutor(args.jobs) as pool:
            files = dict(
                zip(jobs, pool.map(lambda j: profile(*j, args.batches, out, paths[j[0]]), jobs), strict=True)
            )
        steps = {row: per_step(counts(files[row, 1]), counts(files[row, 2]), args.batches) for row in paths}
    reference = rows[0]
    sums = {row: total(functions) for row, functions in steps.items()}
    title = f"Per step, MLP 32-64-10, batch 64 ({args.batches} batches an epoch)"
    print(f'{title}; rows "- {reference}": the difference\n')
    print(f"| row | {' | '.join(COLUMNS)} |")
    print(f"|---|{'---:|' * len(COLUMNS)}")
    for row, values in sums.items():
        print(f"| {row} | {' | '.join(f'{column(values, c):,.0f}' for c in COLUMNS)} |")
        if row != reference:
            diff = [v - r for v, r in zip(values, sums[reference], strict=True)]
            print(f"| {row} - {reference} | {' | '.join(f'{column(diff, c):+,.0f}' for c in COLUMNS)} |")
    for row in list(steps)[1:] if args.functions else ():
        print(f"\n{row} - {reference}, the {args.functions} functions that differ most (by misses, then Ir):")
        names = set(steps[row]) | set(steps[reference])
        zero = [0.0] * len(EVENTS)
        diffs = {
            fn: [v - r for v, r in zip(steps[row].get(fn, zero), steps[reference].get(fn, zero), strict=True)]
            for fn in names
            if not fn.startswith(BACKGROUND)
        }
        for fn in sorted(diffs, key=lambda fn: weight(diffs[fn]), reverse=True)[: args.functions]:
            d = diffs[fn]
            figures = "  ".join(f"{c} {column(d, c):+8,.0f}" for c in COLUMNS)
            print(f"  {figures}  {fn[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
