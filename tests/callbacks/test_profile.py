"""Profile: seconds per phase, split into waiting for data, callbacks and the rest."""

from __future__ import annotations

import time

import pytest
import torch
from realdata import digits
from torch.utils.data import DataLoader, Dataset

import corolux
from corolux.callbacks.profile import Profile


class SlowData(Dataset):
    def __init__(self, x, y, delay):
        self.x, self.y, self.delay = x, y, delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


class SlowCallback(corolux.Callback):
    def on_train_batch_end(self, ctx):
        time.sleep(0.004)


def trainer():
    torch.manual_seed(0)
    return corolux.Trainer(
        torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)),
        loss_fn=torch.nn.functional.cross_entropy,
        optimizer=lambda p: torch.optim.Adam(p),
        device="cpu",
        progress=False,
    )


def test_slow_data_shows_as_data_time_and_a_slow_callback_by_name_and_stage():
    x, y = digits()
    x, y = x[:256], y[:256]
    loader = DataLoader(SlowData(x, y, 0.0005), batch_size=32, shuffle=True)  # 8 batches, >= 16 ms each
    profile = Profile(detailed=True)
    trainer().fit(loader, epochs=2, valid_data=(x[:64], y[:64]), callbacks=[profile, SlowCallback()])
    summary = profile.summary()
    train = summary["train"]
    assert train["data"] >= 16 * 32 * 0.0005 * 0.9  # 16 batches of 32 samples
    assert train["callbacks"] >= 16 * 0.004 * 0.9
    assert abs(train["seconds"] - (train["data"] + train["callbacks"] + train["other"])) < 1e-9
    assert train["data"] + train["callbacks"] <= train["seconds"]
    assert set(summary) >= {"train", "valid", "callbacks"}
    slowest, stages = next(iter(summary["callbacks"].items()))
    assert slowest == "SlowCallback" and next(iter(stages)) == "on_train_batch_end"
    assert "MetricsTracker" in summary["callbacks"]
    assert "SlowCallback" in str(profile) and "train" in str(profile)


def test_without_detail_no_callback_breakdown_and_runs_do_not_leak_timing():
    x, y = digits()
    profile = Profile()
    t = trainer()
    t.fit((x[:128], y[:128]), epochs=1, callbacks=[profile])
    assert "callbacks" not in profile.summary() and profile.summary()["train"]["seconds"] > 0
    seen = []

    class Look(corolux.Callback):
        def on_train_begin(self, ctx):
            seen.append(ctx.timing)

    t.fit((x[:128], y[:128]), epochs=1, callbacks=[Look()])
    assert seen == [None]  # the next run without Profile times nothing


def test_evaluate_and_predict_are_profiled_and_reset_starts_over():
    x, y = digits()
    profile = Profile()
    t = trainer()
    t.evaluate((x[:128], y[:128]), callbacks=[profile])
    t.predict(x[:128], callbacks=[profile])
    assert set(profile.summary()) == {"valid", "predict"}
    profile.reset()
    assert profile.summary() == {}


def test_bad_detailed_is_refused():
    with pytest.raises(TypeError, match="detailed must be True or False"):
        Profile(detailed="yes")
