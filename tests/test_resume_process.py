"""Exact resume across real processes: a training run killed with SIGKILL and run again equals,
bit for bit, the run that was never killed (AutoResume, corolux.checkpoint).

The runs are child processes (tests/resume_child.py) on scikit-learn's digits: a shuffled
DataLoader, dropout, Adam, a validation set, a metric, a stateful callback, and draws from
Python's and NumPy's RNGs. The parent reads their progress lines and kills them where it
wants; a child slows down (1 s per batch) from the batch named in RESUME_CHILD_SLOW_FROM
on, so that the kill lands there, and the run that continues is started with the very same
command (without the slowdown). The uninterrupted reference runs once, in the background,
while the first tests run.
"""

from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import corolux
from corolux.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().with_name("resume_child.py")

EPOCHS = 4
BATCHES = 24  # per epoch: 750 training rows in batches of 32 (the last of 14)
TOTAL = EPOCHS * BATCHES
WAIT = 90.0  # seconds: the longest any wait on a child may take (a run takes ~4 s)

_BATCH = re.compile(r"^batch (\d+) (\d+) (\d+)$")
_BEGIN = re.compile(r"^begin (\d+) (\d+)$")


# -- child processes -------------------------------------------------------------------------


class Child:
    """A child process whose output (stdout and stderr) is read by a thread, line by line."""

    def __init__(self, args: list[str], cwd: Path, slow_from: tuple[int, int] | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONHASHSEED"] = "0"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.pop("RESUME_CHILD_SLOW_FROM", None)
        if slow_from is not None:
            env["RESUME_CHILD_SLOW_FROM"] = f"{slow_from[0]} {slow_from[1]}"
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._seen = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _take(self, timeout: float) -> str | None:
        line = self._queue.get(timeout=timeout)
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, line: str, timeout: float = WAIT) -> None:
        """Read until the child prints ``line`` (a line that is, or begins with it and a space);
        fail on its exit or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                got = self._take(max(left, 0.0))
            except queue.Empty:
                pytest.fail(f"no {line!r} from the child in {timeout:.0f} s{self.shown()}")
            if got is None:
                self.proc.wait(timeout=WAIT)
                pytest.fail(f"the child exited ({self.proc.returncode}) before {line!r}{self.shown()}")
            if got == line or got.startswith(line + " "):
                return

    def kill(self) -> None:
        """SIGKILL the child, then read what it printed before it died."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        self._drain()
        assert self.proc.returncode == -signal.SIGKILL, f"the child was not killed{self.shown()}"

    def finish(self, timeout: float = WAIT) -> None:
        """Wait for the child to exit; it must succeed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
            self._drain()
            pytest.fail(f"the child did not finish in {timeout:.0f} s{self.shown()}")
        self._drain()
        assert self.proc.returncode == 0, f"the child failed ({self.proc.returncode}){self.shown()}"

    def _drain(self) -> None:
        self._reader.join(timeout=WAIT)
        while True:
            try:
                if self._take(0) is None:
                    return
            except queue.Empty:
                return

    def stop(self) -> None:
        """Kill the child if it still runs (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        if self.proc.stdout is not None:
            self._reader.join(timeout=WAIT)
            self.proc.stdout.close()

    def batches(self) -> list[tuple[int, int, int]]:
        """The (epoch, iter, step) of every training batch the child reported."""
        return [tuple(map(int, m.groups())) for m in map(_BATCH.match, self.lines) if m]  # type: ignore[misc]

    def begin(self) -> tuple[int, int]:
        """The (step, completed_epochs) the child's fit began with."""
        found = [tuple(map(int, m.groups())) for m in map(_BEGIN.match, self.lines) if m]
        assert len(found) == 1, f"expected one 'begin' line{self.shown()}"
        return found[0]  # type: ignore[return-value]

    def shown(self, last: int = 40) -> str:
        tail = "\n".join(self.lines[-last:])
        return f"\n--- child {' '.join(self.args)}, its last lines:\n{tail}"


@pytest.fixture(scope="module")
def children() -> Iterator[list[Child]]:
    """Every child started in this module; any still running at the end is killed."""
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


@pytest.fixture
def spawn(children: list[Child], tmp_path: Path) -> Any:
    def start(args: list[Any], slow_from: tuple[int, int] | None = None) -> Child:
        child = Child([str(a) for a in args], tmp_path, slow_from)
        children.append(child)
        return child

    return start


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits as tensors, written once for the children (who then do not
    import scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.pt"
    torch.save(
        {"x": torch.tensor(digits.data, dtype=torch.float32) / 16.0, "y": torch.tensor(digits.target)},
        path,
    )
    return path


class Reference:
    """The uninterrupted run, started in the background at its first use."""

    def __init__(self, child: Child, out: Path) -> None:
        self.child, self.out = child, out
        self._result: dict[str, Any] | None = None

    def result(self) -> dict[str, Any]:
        if self._result is None:
            self.child.finish()
            assert [(e, i) for e, i, _ in self.child.batches()] == all_batches()
            self._result = torch.load(self.out, weights_only=True)
        return self._result


@pytest.fixture(scope="module")
def reference(children: list[Child], data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "result.pt"
    child = Child(["train", str(data_file), str(out)], folder)  # no AutoResume
    children.append(child)
    return Reference(child, out)


# -- checks ----------------------------------------------------------------------------------


def all_batches(after_step: int = 0) -> list[tuple[int, int]]:
    """The (epoch, iter) of every training batch after optimizer step ``after_step``."""
    return [(e, i) for e in range(1, EPOCHS + 1) for i in range(1, BATCHES + 1)][after_step:]


def assert_identical(got: Any, want: Any, where: str = "result") -> None:
    """``got`` equals ``want`` exactly: tensors by torch.equal (dtype and shape too), other
    values by type and ``==`` (floats exactly), containers element by element."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}, expected a tensor"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype}{tuple(got.shape)}"
        assert torch.equal(got, want), f"{where}: tensors differ (max |diff| {(got - want).abs().max()})"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
        for key in want:
            assert_identical(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for index, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_identical(a, b, f"{where}[{index}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), f"{where}: {got!r}, expected nan"
    else:
        assert type(got) is type(want) and got == want, f"{where}: {got!r} != {want!r}"


def assert_same_run(out: Path, reference: Reference) -> None:
    got = torch.load(out, weights_only=True)
    want = reference.result()
    assert got["stop_reason"] is None
    assert_identical(got["history"], want["history"], "history")
    assert_identical(got["model"], want["model"], "model")
    assert_identical(got["optimizer"], want["optimizer"], "optimizer")
    assert len(want["optimizer"]["state"]) == 4  # Adam's moments of every parameter were compared


def temporary_files(folder: Path, target: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f".{target}.") and p.name.endswith(".tmp"))


def assert_cleaned_up(ckpt: Path) -> None:
    """A training that completed deleted its AutoResume file and left no temporary file."""
    assert not ckpt.exists(), "AutoResume kept its file after the training completed"
    assert temporary_files(ckpt.parent, ckpt.name) == []


# -- tests -----------------------------------------------------------------------------------


def test_killed_in_epoch_3_resumes_at_epoch_3_bit_identical(
    spawn: Any, tmp_path: Path, data_file: Path, reference: Reference
) -> None:
    ckpt = tmp_path / "ckpt" / "last.pt"  # AutoResume creates the folder
    out = tmp_path / "result.pt"
    command = ["train", data_file, out, "--ckpt", ckpt]

    first = spawn(command, slow_from=(3, 5))
    first.wait_for("batch 3 5")
    first.kill()
    assert first.batches()[-1][0] == 3, f"the kill did not land in epoch 3{first.shown()}"
    assert not out.exists()

    state = corolux.checkpoint.read(ckpt)
    assert state["position"] is None  # saved between epochs
    assert state["counters"] == {"epoch": 2, "completed_epochs": 2, "step": 2 * BATCHES, "stop_reason": None}
    assert state["history"]["completed_epochs"] == 2 and len(state["history"]["records"]) == 2

    second = spawn(command)
    second.finish()
    assert second.begin() == (2 * BATCHES, 2)
    assert [(e, i) for e, i, _ in second.batches()] == all_batches(2 * BATCHES)  # epochs 3 and 4 only
    assert [s for _, _, s in second.batches()] == list(range(2 * BATCHES + 1, TOTAL + 1))
    assert_same_run(out, reference)
    assert_cleaned_up(ckpt)


def test_killed_between_mid_epoch_saves_resumes_at_next_batch_bit_identical(
    spawn: Any, tmp_path: Path, data_file: Path, reference: Reference
) -> None:
    ckpt = tmp_path / "last.pt"
    out = tmp_path / "result.pt"
    command = ["train", data_file, out, "--ckpt", ckpt, "--every", 5]

    # Steps 50, 55, 60 are saved at batches 2, 7, 12 of epoch 3; the kill comes at batch 10.
    first = spawn(command, slow_from=(3, 10))
    first.wait_for("batch 3 10")
    first.kill()
    last = first.batches()[-1][2]  # the last optimizer step the killed run reported

    state = corolux.checkpoint.read(ckpt)
    saved = state["counters"]["step"]
    # It saved at the multiple of 5 at or before its last batch (that batch's own save may
    # not have been reached: it comes after the batch's on_train_batch_end handlers).
    assert saved in {last - last % 5, last - 5 if last % 5 == 0 else -1}, (saved, last)
    assert saved > 2 * BATCHES and last > saved, f"not killed between two mid-epoch saves{first.shown()}"
    position = state["position"]
    assert position is not None and position["epoch"] == 3 and position["phase"] == "train"
    assert position["batches_done"] == saved - 2 * BATCHES
    assert state["counters"]["completed_epochs"] == 2

    second = spawn(command)
    second.finish()
    assert second.begin() == (saved, 2)
    # Only the batches after the save are trained: none replayed, none left out.
    assert len(second.batches()) == TOTAL - saved
    assert [(e, i) for e, i, _ in second.batches()] == all_batches(saved)
    assert [s for _, _, s in second.batches()] == list(range(saved + 1, TOTAL + 1))
    assert_same_run(out, reference)
    assert_cleaned_up(ckpt)


def test_killed_before_the_first_save_starts_from_scratch(
    spawn: Any, tmp_path: Path, data_file: Path, reference: Reference
) -> None:
    ckpt = tmp_path / "last.pt"
    out = tmp_path / "result.pt"
    command = ["train", data_file, out, "--ckpt", ckpt, "--every", 5]

    first = spawn(command, slow_from=(1, 3))
    first.wait_for("batch 1 3")
    first.kill()
    assert first.batches()[-1][2] <= 5, f"killed too late{first.shown()}"
    assert not ckpt.exists(), "a checkpoint was written before step 5"
    assert temporary_files(tmp_path, ckpt.name) == []

    second = spawn(command)
    second.finish()
    assert second.begin() == (0, 0)
    assert [(e, i) for e, i, _ in second.batches()] == all_batches()
    assert_same_run(out, reference)
    assert_cleaned_up(ckpt)


def _is_version(state: dict[str, Any], version: int) -> bool:
    """Whether every parameter in ``state`` is filled with ``float(version)``, as the child
    wrote it."""
    model = state["model"]
    return all(torch.equal(t, torch.full_like(t, float(version))) for t in model.values())


def test_kill_while_writing_leaves_the_previous_checkpoint_whole(spawn: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "big.pt"
    for _attempt in range(3):  # a kill that came just after a write completed is tried again
        for leftover in temporary_files(tmp_path, ckpt.name):
            leftover.unlink()
        child = spawn(["bigsave", ckpt])
        child.wait_for("saved 0")
        full_size = ckpt.stat().st_size
        assert full_size > 70_000_000
        deadline = time.monotonic() + WAIT
        while True:  # wait until a write of a later version has begun, then kill
            partial = [p for p in temporary_files(tmp_path, ckpt.name) if p.stat().st_size > 0]
            if partial:
                break
            assert child.proc.poll() is None, f"the child exited{child.shown()}"
            assert time.monotonic() < deadline, f"no temporary file appeared{child.shown()}"
            time.sleep(0.001)
        child.kill()
        stale = temporary_files(tmp_path, ckpt.name)
        if stale:
            break
    else:
        pytest.fail("three kills all came after a write was complete: none interrupted one")

    assert len(stale) == 1 and stale[0].name.endswith(f"-{child.proc.pid}.tmp"), stale
    written = [int(line.split()[1]) for line in child.lines if line.startswith("saved ")]
    # The checkpoint is whole: the last version reported, or the next (written and renamed,
    # killed before it said so); never a mix, never a torn file.
    state = corolux.checkpoint.read(ckpt)
    assert [k for k in state["model"]] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert state["model"]["0.weight"].shape == (3000, 3000)
    assert _is_version(state, written[-1]) or _is_version(state, written[-1] + 1), written[-1]
    if stale[0].stat().st_size < full_size:  # the kill cut the write itself
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            corolux.checkpoint.read(stale[0])

    # A later write removes the dead process's temporary file, and writes a whole file.
    state["model"] = {k: torch.full_like(t, -1.0) for k, t in state["model"].items()}
    corolux.checkpoint.write(state, ckpt)
    assert temporary_files(tmp_path, ckpt.name) == []
    assert _is_version(corolux.checkpoint.read(ckpt), -1)
