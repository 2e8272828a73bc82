"""The public surface, pinned (as trio's test_exports): what ``corolux``,
``corolux.callbacks`` and ``corolux.metrics`` export, the stage names, the table of default
callbacks, and the doctests of every module.

Changing the surface is a decision: update the sets here in the same change.
"""

from __future__ import annotations

import doctest
import enum
import importlib
import pkgutil
import types

import pytest

import corolux
import corolux.callbacks
import corolux.metrics

CORE = {
    "Callback",
    "Context",
    "Event",
    "History",
    "SkipBatch",
    "SkipValidation",
    "Stage",
    "Stepper",
    "StopTraining",
    "Trainer",
    "__version__",
    "callback",
    "checkpoint",
    "compiling",
    "lr_finder",
    "callbacks",
    "coroutine",
    "every",
    "fit",
    "metrics",
    "seed_everything",
}

CALLBACKS = {
    "DEFAULTS",
    "AutoResume",
    "Breakpoint",
    "CSVLogger",
    "CaptureAnomaly",
    "EarlyStopping",
    "GradientAccumulation",
    "GradientClip",
    "KeepBestModel",
    "LRMonitor",
    "LRScheduler",
    "MetricsTracker",
    "MixUp",
    "ModelCheckpoint",
    "Profile",
    "ProgressBar",
    "TensorBoardLogger",
    "TerminateOnNaN",
    "Timer",
}

METRICS = {
    "Accuracy",
    "BinaryAUROC",
    "BinaryAccuracy",
    "LossTracker",
    "MAE",
    "MSE",
    "Mean",
    "Metric",
    "MulticlassAUROC",
    "RMSE",
    "load_metric_state",
    "merge_metric_states",
    "metric_name",
    "metric_state",
}

# DESIGN §1, in the order of the tree, then predict, then the one-off events.
STAGES = [
    "on_fit_begin",
    "on_epoch_begin",
    "on_train_begin",
    "on_train_batch_begin",
    "on_train_batch_after_pred",
    "on_train_batch_after_loss",
    "on_train_batch_before_backward",
    "on_train_batch_before_step",
    "on_train_batch_after_step",
    "on_train_batch_end",
    "on_train_end",
    "on_valid_begin",
    "on_valid_batch_begin",
    "on_valid_batch_after_pred",
    "on_valid_batch_after_loss",
    "on_valid_batch_end",
    "on_valid_end",
    "on_epoch_end",
    "on_fit_end",
    "on_predict_begin",
    "on_predict_batch_begin",
    "on_predict_batch_after_pred",
    "on_predict_batch_end",
    "on_predict_end",
    "on_exception",
    "on_early_stopping",
    "on_interrupt",
]


# -- exports ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "expected"),
    [(corolux, CORE), (corolux.callbacks, CALLBACKS), (corolux.metrics, METRICS)],
    ids=["corolux", "corolux.callbacks", "corolux.metrics"],
)
def test_all_is_pinned(module, expected):
    assert set(module.__all__) == expected
    assert len(module.__all__) == len(set(module.__all__))  # no duplicates


@pytest.mark.parametrize("module", [corolux, corolux.callbacks, corolux.metrics], ids=lambda m: m.__name__)
def test_every_name_in_all_resolves(module):
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ lists {name!r}, which is missing"


def test_star_import_gives_exactly_all():
    namespace: dict[str, object] = {}
    exec("from corolux import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(corolux.__all__)


def test_package_root_exports_everything_public():
    """``corolux/__init__.py`` only re-exports: every public non-module name is in __all__."""
    public = {
        name
        for name, value in vars(corolux).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public <= set(corolux.__all__), public - set(corolux.__all__)


def test_reexports_are_the_implementations():
    from corolux.arguments import seed_everything
    from corolux.callback import Callback
    from corolux.context import Context
    from corolux.events import Event, Stage
    from corolux.history import History
    from corolux.trainer import Trainer

    assert corolux.Callback is Callback
    assert corolux.Context is Context
    assert corolux.Event is Event
    assert corolux.Stage is Stage
    assert corolux.History is History
    assert corolux.Trainer is Trainer
    assert corolux.seed_everything is seed_everything


def test_version_is_a_string():
    assert isinstance(corolux.__version__, str) and corolux.__version__.count(".") >= 1


def test_control_signals_are_exceptions():
    for cls in (corolux.StopTraining, corolux.SkipBatch, corolux.SkipValidation):
        assert issubclass(cls, Exception)
        assert cls.__doc__  # each says where control goes


# -- stages ----------------------------------------------------------------------------------------


def test_stage_values_are_exactly_the_design_strings():
    assert [s.value for s in corolux.Stage] == STAGES


def test_stage_is_a_str_enum():
    assert issubclass(corolux.Stage, enum.StrEnum)
    for name in STAGES:
        stage = corolux.Stage(name)
        assert stage == name
        assert str(stage) == name
        assert getattr(corolux.Stage, name) is stage
        assert hash(stage) == hash(name)  # usable as a dict key alongside plain strings


# -- default callbacks ---------------------------------------------------------------------------


def test_defaults_table():
    from corolux.callbacks import DEFAULTS, MetricsTracker, ProgressBar

    assert dict(DEFAULTS) == {MetricsTracker: -100, ProgressBar: 100}
    assert MetricsTracker.weight == -100
    assert ProgressBar.weight == 100
    with pytest.raises(TypeError):
        DEFAULTS[ProgressBar] = 0  # type: ignore[index]  # read-only: the one place they live


def test_default_callbacks_are_in_every_fit_in_weight_order():
    import torch

    from corolux.callbacks import MetricsTracker, ProgressBar

    seen = []

    class Look(corolux.Callback):
        def on_fit_begin(self, ctx):
            seen.append([type(cb) for cb in ctx.callbacks])

    x, y = torch.randn(8, 2), torch.randn(8, 1)
    trainer = corolux.Trainer(
        torch.nn.Linear(2, 1),
        loss_fn=torch.nn.functional.mse_loss,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        device="cpu",
        progress=True,
    )
    import io

    trainer.fit((x, y), callbacks=[Look(), ProgressBar(style="bar", file=io.StringIO())])
    assert seen == [[MetricsTracker, Look, ProgressBar]]


# -- doctests --------------------------------------------------------------------------------------


def _modules() -> list[str]:
    names = ["corolux"]
    for info in pkgutil.walk_packages(corolux.__path__, "corolux."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False, report=True
    )
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name}"


def test_doctests_exist():
    """The docstrings carry examples (STYLE 14): the doctest run above checks something."""
    finder = doctest.DocTestFinder()
    total = sum(
        len(test.examples) for name in _modules() for test in finder.find(importlib.import_module(name))
    )
    assert total >= 10
