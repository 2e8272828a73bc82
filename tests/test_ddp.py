"""DDP through a real torchrun launch (2 processes, gloo on the CPU), against one process
training on the global batch."""

from __future__ import annotations

import shutil
import signal
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


def alone(out: Path, mode: str) -> dict:
    """Run the child in one process (no torchrun) and load what it wrote."""
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(out), mode], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(f"{out}-0.pt", weights_only=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return alone(tmp_path_factory.mktemp("single") / "run", "single")


def test_two_processes_train_as_one_on_the_global_batch(tmp_path, single):
    proc = torchrun(tmp_path / "run", "train")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
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
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(r["history"]["epoch"]) for r in ranks] == [2, 2]
    assert [r["stop_reason"] for r in ranks] == ["early_stopping", "early_stopping"]


def test_a_stop_inside_an_epoch_on_one_rank_stops_every_rank_after_the_same_batch(tmp_path):
    proc = torchrun(tmp_path / "run", "midstop", timeout=90)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["stop_reason"] for r in ranks] == ["time_limit", "time_limit"]
    assert repr(ranks[0]["history"]) == repr(ranks[1]["history"])  # (nan, as no validation ran)
    # given after batch 3 of epoch 2 on rank 1: shared at batch 8 (the flags go every 8), the
    # epoch's last; both ranks trained the same batches
    assert ranks[0]["history"]["stopped_at"] == [8.0, 8.0]
    assert all(torch.equal(v, ranks[1]["model"][k]) for k, v in ranks[0]["model"].items())


def test_ctrl_c_given_to_torchrun_stops_every_rank_gracefully_after_the_same_batch(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*command, str(CHILD), str(out), "interrupt"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not all(Path(f"{out}.ready-{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C gives torchrun, which forwards it
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["interrupted"], r["stop_reason"]) for r in ranks] == [(True, "interrupted")] * 2, err[-3000:]
    interrupts = [torch.load(tmp_path / f"run.interrupt-{r}.pt", weights_only=True) for r in (0, 1)]
    assert interrupts[0] == interrupts[1] and interrupts[0]["interrupts"] == 1  # the same batch, once
    assert ranks[0]["history"]["stopped_at"] == ranks[1]["history"]["stopped_at"]
    assert len(ranks[0]["history"]["epoch"]) < 3  # it did stop early
    assert all(torch.equal(v, ranks[1]["model"][k]) for k, v in ranks[0]["model"].items())


def test_progress_loggers_and_checkpoints_are_written_by_rank_0_only(tmp_path):
    proc = torchrun(tmp_path / "run", "loggers")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    written = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".pt"))
    assert written == ["run-0-ckpt", "run-0-tb", "run-0.csv"]  # each rank named its own: rank 1's are absent
    saved = sorted(p.name for p in (tmp_path / "run-0-ckpt").iterdir())
    assert saved == ["epoch1.pt", "epoch2.pt", "epoch3.pt"]
    assert len((tmp_path / "run-0.csv").read_text().splitlines()) == 1 + 3 * 2  # a header, one row per phase
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [line.split(" - ")[0] for line in lines if line.startswith("Epoch ")] == [
        "Epoch 1/3",
        "Epoch 2/3",
        "Epoch 3/3",
    ]  # one progress line per epoch, not one per rank
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    # a custom metric without reduce_states: each rank's share (51 + 50 samples), one warning each
    assert [r["history"]["valid_share"] for r in ranks] == [[51.0] * 3, [50.0] * 3]
    for r in ranks:
        assert sum("'share'" in w and "reduce_states" in w for w in r["warnings"]) == 1


def test_an_error_on_one_rank_ends_the_job_with_it_shown_and_no_hang(tmp_path):
    start = time.monotonic()
    proc = torchrun(tmp_path / "run", "fail", timeout=90)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run-0.pt").exists()


def test_accumulation_reduces_only_at_optimizer_steps_and_trains_as_one_process(tmp_path):
    single = alone(tmp_path / "one", "single-accumulate")
    proc = torchrun(tmp_path / "run", "accumulate")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    # 256 samples, 16 per rank and batch: 8 batches an epoch, a step every 2: 4 all-reduces
    # an epoch (one bucket), not 8 (no_sync for the batches that only accumulate)
    assert [r["all_reduces"] for r in ranks] == [12, 12]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key])
        assert torch.allclose(value, single["model"][key], atol=1e-5), key


def test_a_killed_ddp_run_resumes_under_ddp_bit_identically_and_in_one_process(tmp_path, single):
    reference = torchrun(tmp_path / "ref", "train")
    assert reference.returncode == 0, (reference.stdout + reference.stderr)[-6000:]
    first = torchrun(tmp_path / "run", "resume")
    assert first.returncode != 0 and (tmp_path / "run.killed").exists()
    assert (tmp_path / "run.resume.pt").exists()
    saved = torch.load(tmp_path / "run.resume.pt", weights_only=True)
    assert len(saved["rng_ranks"]) == 2  # every rank's RNG states
    shutil.copy(tmp_path / "run.resume.pt", tmp_path / "one.resume.pt")
    again = torchrun(tmp_path / "run", "resume")
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    for r in (0, 1):
        ref = torch.load(tmp_path / f"ref-{r}.pt", weights_only=True)
        got = torch.load(tmp_path / f"run-{r}.pt", weights_only=True)
        assert all(torch.equal(v, got["model"][k]) for k, v in ref["model"].items())
        assert got["history"] == ref["history"]
        assert torch.equal(got["rng"], ref["rng"])
    assert not (tmp_path / "run.resume.pt").exists()
    # the same checkpoint continued in one process on the global batch (saved inside epoch 2):
    # the weights within 1e-5, and the epoch's metrics exact (both ranks' sums combined)
    one = alone(tmp_path / "one", "single-resume")
    for key, value in single["model"].items():
        assert torch.allclose(one["model"][key], value, atol=1e-5), key
    for name, values in single["history"].items():
        assert one["history"][name] == pytest.approx(values, abs=1e-4), name


@pytest.mark.parametrize(
    ("strategy", "says"),
    [("ddp", "torchrun --nproc_per_node=N"), ("fsdp", "not built in yet"), ("dpp", "None or 'ddp'")],
)
def test_a_strategy_it_cannot_run_here_is_a_clear_error(strategy, says, monkeypatch):
    import corolux

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=f"strategy.*{strategy}|{strategy}.*strategy") as info:
        corolux.Trainer(torch.nn.Linear(2, 2), loss_fn=torch.nn.functional.mse_loss, strategy=strategy)
    assert says in str(info.value)


def test_compiled_under_ddp_trains_as_one_process_without_graph_breaks(tmp_path, single):
    """Trainer(compile=...) under DDP: the user's forward is compiled, the DDP wrapper calls it
    (dynamo's DDPOptimizer sees the DDP forward running); fullgraph=True holds."""
    proc = torchrun(tmp_path / "run", "compile")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [torch.load(tmp_path / f"run-{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["compilations"] >= 1 and r["graph_breaks"] == 0 for r in ranks)
    assert not any(r["forward_left"] for r in ranks)
    for key, value in ranks[0]["model"].items():
        assert not key.startswith(("module.", "_orig_mod."))
        assert torch.equal(value, ranks[1]["model"][key])
        assert torch.allclose(value, single["model"][key], atol=1e-5), key
    assert torch.allclose(ranks[0]["predictions"], single["predictions"], atol=1e-5)
