"""Built-in callbacks. ``DEFAULTS`` is the table of the default callbacks and their weights.

Default callbacks run in every ``fit``/``run`` (and ``evaluate``/``predict`` where they
apply); a user callback of the same class replaces the default one.

====================  ======  ====================================================
callback              weight  role
====================  ======  ====================================================
MetricsTracker        -100    batches -> epoch metrics -> history (before users)
ProgressBar            100    tqdm bars (after users, so it shows their changes)
====================  ======  ====================================================

Other built-ins (not defaults; add them to ``callbacks=``):

====================  ======  ====================================================
callback              weight  role
====================  ======  ====================================================
Breakpoint              0     drop into pdb at a stage
AutoResume             inf    save the training state as it goes; resume from it
====================  ======  ====================================================
"""

from __future__ import annotations

from types import MappingProxyType

from corolux.callbacks.autoresume import AutoResume as AutoResume
from corolux.callbacks.breakpoint import Breakpoint as Breakpoint
from corolux.callbacks.metrics_tracker import MetricsTracker as MetricsTracker
from corolux.callbacks.progress import ProgressBar as ProgressBar

#: The default callbacks and their weights, the one place these numbers live.
DEFAULTS = MappingProxyType({MetricsTracker: -100.0, ProgressBar: 100.0})
for _cls, _weight in DEFAULTS.items():
    _cls.weight = _weight  # type: ignore[attr-defined]
del _cls, _weight

__all__ = ["DEFAULTS", "AutoResume", "Breakpoint", "MetricsTracker", "ProgressBar"]
