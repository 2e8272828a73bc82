"""DDP through a real torchrun launch (2 processes, gloo on the CPU), against one process
training on the global batch."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "ddp_child.py"


def torchrun(out: Path, mode: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, str(CHILD), str(out), mode], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single") / "run"
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(out), "single"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(f"{out}-0.pt", weights_only=True)


def test_two_processes_train_as_one_on_the_global_batch(tmp_path, single):
    proc = torchrun(tmp_path / "run", "train")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world"] == 2 and r["ctx_model_is_ddp"] for r in ranks)
    for key, value in ranks[0]["model"].items():
        assert not key.startswith("module.")
        assert torch.equal(value, ranks[1]["model"][key])  # the ranks agree exactly
        assert torch.allclose(value, single["model"][key], atol=1e-5), key
    assert ranks[0]["history"] == ranks[1]["history"]
    for name, values in single["history"].items():
        assert ranks[0]["history"][name] == pytest.approx(values, abs=1e-4), name
    # 101 validation samples on 2 ranks (51 + 50): each counted once, so the metrics are exact
    # predict(): each rank predicts its share; all of them come back, in order, on every rank
    assert ranks[0]["predictions"].shape == (101, 3)
    assert torch.equal(ranks[0]["predictions"], ranks[1]["predictions"])
    assert torch.allclose(ranks[0]["predictions"], single["predictions"], atol=1e-5)


def test_a_stop_on_one_rank_stops_every_rank_after_the_same_epoch(tmp_path):
    proc = torchrun(tmp_path / "run", "stop")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(r["history"]["epoch"]) for r in ranks] == [2, 2]
    assert [r["stop_reason"] for r in ranks] == ["early_stopping", "early_stopping"]


def test_a_stop_inside_an_epoch_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path):
    proc = torchrun(tmp_path / "run", "midstop", timeout=90)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["stop_reason"] for r in ranks] == ["time_limit", "time_limit"]
    assert repr(ranks[0]["history"]) == repr(ranks[1]["history"])  # (nan, as no validation ran)
    # given after batch 3 of epoch 2 on rank 1: shared at batch 8 (the flags go every 8), the
    # epoch's last; both ranks trained the same batches
    assert ranks[0]["history"]["stopped_at"] == [8.0, 8.0]
    assert all(torch.equal(v, ranks[1]["model"][k]) for k, v in ranks[0]["model"].items())


def test_an_error_on_one_rank_ends_the_job_with_it_shown_and_no_hang(tmp_path):
    start = time.monotonic()
    proc = torchrun(tmp_path / "run", "fail", timeout=90)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run-0.pt").exists()


def test_accumulation_reduces_only_at_optimizer_steps_and_trains_as_one_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path / "one"), "single-accumulate"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = torch.load(tmp_path / "one-0.pt", weights_only=True)
    proc = torchrun(tmp_path / "run", "accumulate")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    # 256 samples, 16 per rank and batch: 8 batches an epoch, a step every 2: 4 all-reduces
    # an epoch (one bucket), not 8 (no_sync for the batches that only accumulate)
    assert [r["all_reduces"] for r in ranks] == [12, 12]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key])
        assert torch.allclose(value, single["model"][key], atol=1e-5), key


def test_a_killed_ddp_run_resumes_under_ddp_bit_identically(tmp_path):
    reference = torchrun(tmp_path / "ref", "train")
    assert reference.returncode == 0, reference.stderr[-4000:]
    first = torchrun(tmp_path / "run", "resume")
    assert first.returncode != 0 and (tmp_path / "run.killed").exists()
    assert (tmp_path / "run.resume.pt").exists()
    saved = torch.load(tmp_path / "run.resume.pt", weights_only=True)
    assert len(saved["rng_ranks"]) == 2  # every rank's RNG states
    again = torchrun(tmp_path / "run", "resume")
    assert again.returncode == 0, again.stderr[-4000:]
    for r in (0, 1):
        ref = torch.load(tmp_path / f"ref-{r}.pt", weights_only=True)
        got = torch.load(tmp_path / f"run-{r}.pt", weights_only=True)
        assert all(torch.equal(v, got["model"][k]) for k, v in ref["model"].items())
        assert got["history"] == ref["history"]
        assert torch.equal(got["rng"], ref["rng"])
    assert not (tmp_path / "run.resume.pt").exists()


def test_compiled_under_ddp_trains_as_one_process_without_graph_breaks(tmp_path, single):
    """Trainer(compile=...) under DDP: the user's forward is compiled, the DDP wrapper calls it
    (dynamo's DDPOptimizer sees the DDP forward running); fullgraph=True holds."""
    proc = torchrun(tmp_path / "run", "compile")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["compilations"] >= 1 and r["graph_breaks"] == 0 for r in ranks)
    assert not any(r["forward_left"] for r in ranks)
    for key, value in ranks[0]["model"].items():
        assert not key.startswith(("module.", "_orig_mod."))
        assert torch.equal(value, ranks[1]["model"][key])
        assert torch.allclose(value, single["model"][key], atol=1e-5), key
    assert torch.allclose(ranks[0]["predictions"], single["predictions"], atol=1e-5)
