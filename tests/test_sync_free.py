"""No host-device sync per step (issue 7).

The conversions that read a tensor's value on the host (``item``, ``float(t)``, ``int(t)``,
``bool(t)``, ``tolist``, ``numpy``, ``__index__``) are wrapped to count their calls. A fit
over 10 batches and one over 40 must make the same number of them: a per-epoch constant
(metrics ``compute()`` once per phase) is fine, anything per step is not.

The progress bar reads the loss on a clock (``refresh_per_second``), so its tests control
the clock the bar reads: frozen, it never comes due and the count is exact; advancing, the
reads are bounded by the elapsed (fake) time, never by the number of batches.

On CUDA, a fit also runs under ``torch.cuda.set_sync_debug_mode("error")`` during the batch
loops, which catches syncs that no Python method shows (e.g. inside C++ ops).
"""

from __future__ import annotations

import io
import math
import time
import traceback
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import corolux
from corolux.callbacks import progress as progress_module
from corolux.metrics import Accuracy

SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


class SyncCounter:
    """Counts the host-reading tensor conversions made while it is active, with where."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.active = False

    def record(self, name: str) -> None:
        if self.active:
            # The frame that called the conversion (skip the wrapper itself).
            frame = traceback.extract_stack(limit=3)[0]
            self.calls.append((name, f"{frame.filename}:{frame.lineno} {frame.line}"))

    def count(self) -> int:
        return len(self.calls)

    def where(self) -> str:
        return "\n".join(f"  {name} at {site}" for name, site in self.calls)


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncCounter]:
    counter = SyncCounter()
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(
            self: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kw: Any
        ) -> Any:
            counter.record(_name)
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    yield counter
    counter.active = False


class FakeClock:
    """A ``perf_counter`` that advances by ``tick`` seconds at each call (0: frozen)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 1000.0
        self.tick = tick
        self.calls = 0

    def __call__(self) -> float:
        self.now += self.tick
        self.calls += 1
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - 1000.0


def use_clock(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """Make the progress bar read ``clock`` (its module's ``time.perf_counter`` or a
    ``perf_counter`` imported by name); tqdm keeps the real clock."""
    patched = False
    if isinstance(getattr(progress_module, "time", None), types.ModuleType):
        proxy = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
        proxy.perf_counter = clock
        proxy.monotonic = clock
        proxy.time = clock
        monkeypatch.setattr(progress_module, "time", proxy)
        patched = True
    for name in ("perf_counter", "monotonic"):
        if callable(getattr(progress_module, name, None)):
            monkeypatch.setattr(progress_module, name, clock)
            patched = True
    if not patched:
        pytest.fail(
            "corolux.callbacks.progress reads no clock this test knows how to control; update use_clock()"
        )


# -- workloads ---------------------------------------------------------------------------------


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def make_trainer(progress: bool = False, device: str = "cpu") -> corolux.Trainer:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return corolux.Trainer(
        model,
        loss_fn=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        metrics=[Accuracy()],
        device=device,
        progress=progress,
    )


def count_fit(syncs: SyncCounter, n_batches: int, callbacks: list[Any] | None = None, **kw: Any) -> int:
    trainer = make_trainer(**kw)
    train, valid = batches(n_batches), batches(max(1, n_batches // 2), seed=1)
    syncs.calls.clear()
    syncs.active = True
    try:
        trainer.fit(train, epochs=2, valid_data=valid, callbacks=callbacks)
    finally:
        syncs.active = False
    return syncs.count()


def assert_flat(syncs: SyncCounter, few: int, many: int, what: str) -> None:
    assert many == few, (
        f"{what}: {few} host syncs with 10 batches per epoch but {many} with 40, so some run "
        f"per step; the calls of the 40-batch run:\n{syncs.where()}"
    )


# -- the counter itself ------------------------------------------------------------------------


def test_the_counter_sees_a_sync_per_step(syncs: SyncCounter) -> None:
    """A callback that reads the loss every batch is caught: the test is not vacuous."""

    class ReadsLoss(corolux.Callback):
        def on_train_batch_end(self, ctx: corolux.Context) -> None:
            ctx.loss.item()

    few = count_fit(syncs, 10, callbacks=[ReadsLoss()])
    many = count_fit(syncs, 40, callbacks=[ReadsLoss()])
    assert many - few == 2 * 30  # 2 epochs, 30 more batches each
    assert "ctx.loss.item()" in syncs.where()  # and it says where


def test_a_hand_written_loop_makes_no_sync(syncs: SyncCounter) -> None:
    """The baseline: torch itself (forward, loss, backward, SGD step) reads nothing."""
    trainer = make_trainer()
    model, opt, loss_fn = trainer.model, trainer.optimizers["opt"], trainer.loss_fn
    syncs.active = True
    for x, y in batches(20):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    syncs.active = False
    assert syncs.count() == 0, syncs.where()


# -- fit, run, evaluate ------------------------------------------------------------------------


def test_fit_with_progress_off_makes_no_sync_per_step(syncs: SyncCounter) -> None:
    few = count_fit(syncs, 10)
    many = count_fit(syncs, 40)
    assert_flat(syncs, few, many, "fit(progress=False)")
    # Per epoch: the train and valid loss and accuracy, each read once per phase, and the
    # epoch record; a small constant, whatever it is exactly.
    assert many <= 2 * 10, syncs.where()


def test_fit_with_the_default_progress_bar_makes_no_sync_per_step(
    syncs: SyncCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """progress=True with the default bar settings, writing to a StringIO; its clock is
    frozen, so its throttle never comes due and the count is exact."""
    use_clock(monkeypatch, FakeClock(tick=0.0))
    out = io.StringIO()
    few = count_fit(
        syncs, 10, callbacks=[corolux.callbacks.ProgressBar(style="bar", file=out)], progress=True
    )
    many = count_fit(
        syncs, 40, callbacks=[corolux.callbacks.ProgressBar(style="bar", file=out)], progress=True
    )
    assert_flat(syncs, few, many, "fit(progress=True)")
    assert "Epoch 2/2" in out.getvalue()  # the bar did run


def test_the_default_progress_bar_is_shown_by_progress_true(
    syncs: SyncCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ProgressBar itself (not a user one): it writes to stderr; same count."""
    use_clock(monkeypatch, FakeClock(tick=0.0))
    few = count_fit(syncs, 10, progress=True)
    many = count_fit(syncs, 40, progress=True)
    assert_flat(syncs, few, many, "fit(progress=True), default bar")


def test_the_progress_bar_reads_the_loss_by_the_clock_not_by_the_batch(
    syncs: SyncCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a clock that runs, the bar's loss reads are bounded by elapsed time x rate."""
    rate = 4.0
    clock = FakeClock(tick=0.05)  # each reading of the clock: 50 ms later
    use_clock(monkeypatch, clock)
    bar = corolux.callbacks.ProgressBar(style="bar", file=io.StringIO(), refresh_per_second=rate)
    baseline = count_fit(syncs, 40, progress=False)
    clock.now, clock.calls = 1000.0, 0
    with_bar = count_fit(syncs, 40, callbacks=[bar], progress=True)
    reads = with_bar - baseline
    phases = 2 * 2  # train and valid, 2 epochs
    assert reads <= clock.elapsed * rate + phases, (
        f"{reads} loss reads over {clock.elapsed:.1f} s of fake time at {rate}/s:\n{syncs.where()}"
    )
    assert reads > 0  # the clock did come due: the bound above was tested, not skipped


def test_run_consumed_by_hand_makes_no_sync_per_step(syncs: SyncCounter) -> None:
    counts = []
    for n in (10, 40):
        trainer = make_trainer()
        syncs.calls.clear()
        syncs.active = True
        for event in trainer.run(batches(n), epochs=2):
            assert event.ctx is not None
        syncs.active = False
        counts.append(syncs.count())
    assert_flat(syncs, counts[0], counts[1], "run()")


def test_evaluate_makes_no_sync_per_step(syncs: SyncCounter) -> None:
    counts = []
    for n in (10, 40):
        trainer = make_trainer()
        syncs.calls.clear()
        syncs.active = True
        result = trainer.evaluate(batches(n))
        syncs.active = False
        counts.append(syncs.count())
        assert math.isfinite(result["loss"])
    assert_flat(syncs, counts[0], counts[1], "evaluate()")


# -- CUDA: the driver's own check --------------------------------------------------------------


class SyncDebugInBatchLoops(corolux.Callback):
    """Turns ``set_sync_debug_mode("error")`` on for the batch loops only: on after every
    other handler of ``on_*_begin``, off before any handler of ``on_*_end`` (where the
    metrics are computed, one sync per phase by design)."""

    weight = {
        "on_train_begin": math.inf,
        "on_valid_begin": math.inf,
        "on_train_end": -math.inf,
        "on_valid_end": -math.inf,
    }

    def __init__(self) -> None:
        self.phases = 0

    def _on(self, ctx: corolux.Context) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def _off(self, ctx: corolux.Context) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.phases += 1

    on_train_begin = on_valid_begin = _on
    on_train_end = on_valid_end = _off

    def teardown(self, ctx: corolux.Context) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("progress", [False, True])
def test_cuda_fit_under_sync_debug_mode_error(progress: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    use_clock(monkeypatch, FakeClock(tick=0.0))
    trainer = make_trainer(progress=progress, device="cuda")
    to_cuda = [(x.cuda(), y.cuda()) for x, y in batches(20)]
    valid = [(x.cuda(), y.cuda()) for x, y in batches(5, seed=1)]
    guard = SyncDebugInBatchLoops()
    callbacks: list[Any] = [guard]
    if progress:
        callbacks.append(corolux.callbacks.ProgressBar(style="bar", file=io.StringIO()))
    try:
        history = trainer.fit(to_cuda, epochs=2, valid_data=valid, callbacks=callbacks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert guard.phases == 4
    assert len(history["train_loss"]) == 2
