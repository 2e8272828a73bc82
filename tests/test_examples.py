"""The examples run as a user runs them: a subprocess, a fresh interpreter."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def quickstart() -> subprocess.CompletedProcess[str]:
    """One run of the quickstart, shared by the tests of this module (it takes seconds)."""
    pytest.importorskip("sklearn")
    proc = run_example("quickstart.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_quickstart_prints_final_metrics_with_good_test_accuracy(quickstart):
    proc = quickstart
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("History(10 epochs") for line in lines), proc.stdout
    (test_line,) = [line for line in lines if line.startswith("test:")]
    results = ast.literal_eval(test_line.removeprefix("test:").strip())
    assert set(results) == {"loss", "acc"}
    assert all(isinstance(v, float) for v in results.values())
    assert results["acc"] > 0.85, results
    assert 0 < results["loss"] < 0.5, results
    history_line = next(line for line in lines if line.startswith("History("))
    valid_acc = float(re.search(r"valid_acc=([0-9.]+)", history_line).group(1))
    assert valid_acc > 0.85
    # progress=None and stderr is not a terminal here: one plain line per epoch, no bars
    epoch_lines = [line for line in proc.stderr.splitlines() if line.startswith("Epoch ")]
    assert len(epoch_lines) == 10 and epoch_lines[-1].startswith("Epoch 10/10 - ")
    assert f"valid_acc: {valid_acc:.4g}"[:15] in epoch_lines[-1] and "\r" not in proc.stderr


def test_quickstart_is_reproducible(quickstart):
    """It calls corolux.seed_everything() before building the model: a second run, in a
    fresh interpreter, prints the same numbers."""
    again = run_example("quickstart.py")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "test:" in again.stdout
    assert again.stdout == quickstart.stdout


def test_the_callbacks_example_trains_logs_and_keeps_the_best_model(tmp_path):
    pytest.importorskip("sklearn")
    import corolux

    proc = run_example("callbacks.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (test_line,) = [line for line in proc.stdout.splitlines() if line.startswith("test:")]
    results = ast.literal_eval(test_line.removeprefix("test:").strip())
    assert results["acc"] > 0.9, results
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,phase,loss,acc"
    epochs = int(rows[-1].split(",")[0])
    assert len(rows) == 1 + 2 * epochs  # a train and a valid row per epoch
    best = corolux.checkpoint.read(tmp_path / "best.pt")
    valid_losses = [float(r.split(",")[2]) for r in rows[1:] if r.split(",")[1] == "valid"]
    assert best["history"]["records"][-1]["valid_loss"] == min(valid_losses)
    assert not (tmp_path / "resume.pt").exists()  # AutoResume's file goes once training is done


def test_the_ddp_example_runs_on_two_processes_with_rank_0_reporting(tmp_path):
    pytest.importorskip("sklearn")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launch, "examples/ddp.py"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    (test_line,) = [line for line in lines if line.startswith("test:")]  # rank 0 only
    assert any(line.startswith("2 process(es): History(8 epochs") for line in lines)
    assert ast.literal_eval(test_line.removeprefix("test:").strip())["acc"] > 0.85
