"""Built-in callbacks. ``DEFAULTS`` is the table of the default callbacks and their weights.

Default callbacks run in every ``fit``/``run`` (and ``evaluate``/``predict`` where they
apply); a user callback of the same class replaces the default one.

====================  ======  ====================================================
callback              weight  role
====================  ======  ====================================================
MetricsTracker        -100    batches -> epoch metrics -> history (before users)
ProgressBar            100    tqdm bars, or a line per epoch (after users)
====================  ======  ====================================================

The other built-ins, added with ``callbacks=[...]`` (a weight given per stage applies there;
lower runs first):

====================  ===================================  ================================================
callback              weight                               role
====================  ===================================  ================================================
Profile               -inf                                 seconds per phase: data, callbacks, the rest
LRMonitor             -50 at on_epoch_end                  the learning rate each epoch trained with
GradientAccumulation  0 (setup only)                       one optimizer step per ``steps`` batches
MixUp                 0                                    mixes inputs and losses of sample pairs
LRScheduler           0                                    steps a torch LR scheduler
GradientClip          50 at on_train_batch_before_step     clips unscaled gradients before the step
KeepBestModel         0                                    restores the best weights at on_fit_end
ModelCheckpoint       0 (saves after the stage)            checkpoint files per epoch, or the best
Timer                 0                                    stops at a time budget
Breakpoint            0                                    drops into pdb at a stage
CSVLogger             50                                   one CSV row per epoch and phase
TensorBoardLogger     50                                   TensorBoard scalars (and histograms)
TerminateOnNaN        inf at on_train_batch_after_loss     no step on a non-finite loss; stops
CaptureAnomaly        inf at the check; -inf at begin      writes the non-finite batch to replay; stops
EarlyStopping         inf                                  stops when the monitor stops improving
AutoResume            inf (saves after the stage)          saves the training state; resumes from it
====================  ===================================  ================================================
"""

from __future__ import annotations

from types import MappingProxyType

from corolux.callbacks.autoresume import AutoResume as AutoResume
from corolux.callbacks.breakpoint import Breakpoint as Breakpoint
from corolux.callbacks.capture_anomaly import CaptureAnomaly as CaptureAnomaly
from corolux.callbacks.csv_logger import CSVLogger as CSVLogger
from corolux.callbacks.early_stopping import EarlyStopping as EarlyStopping
from corolux.callbacks.gradient_accumulation import GradientAccumulation as GradientAccumulation
from corolux.callbacks.gradient_clip import GradientClip as GradientClip
from corolux.callbacks.keep_best import KeepBestModel as KeepBestModel
from corolux.callbacks.lr_monitor import LRMonitor as LRMonitor
from corolux.callbacks.lr_scheduler import LRScheduler as LRScheduler
from corolux.callbacks.metrics_tracker import MetricsTracker as MetricsTracker
from corolux.callbacks.mixup import MixUp as MixUp
from corolux.callbacks.model_checkpoint import ModelCheckpoint as ModelCheckpoint
from corolux.callbacks.profile import Profile as Profile
from corolux.callbacks.progress import ProgressBar as ProgressBar
from corolux.callbacks.tensorboard_logger import TensorBoardLogger as TensorBoardLogger
from corolux.callbacks.terminate_on_nan import TerminateOnNaN as TerminateOnNaN
from corolux.callbacks.timer import Timer as Timer

#: The default callbacks and their weights, the one place these numbers live.
DEFAULTS = MappingProxyType({MetricsTracker: -100.0, ProgressBar: 100.0})
for _cls, _weight in DEFAULTS.items():
    _cls.weight = _weight  # type: ignore[attr-defined]
del _cls, _weight

__all__ = [
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
]
