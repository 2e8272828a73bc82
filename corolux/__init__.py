"""corolux: a PyTorch training loop written as a generator.

``Trainer.run()`` yields an ``Event`` at every stage of training; callbacks (classes with
``on_*`` methods, or ``@coroutine`` generators) run in weight order before each event
reaches you; ``fit()`` drives the same loop to the end.
"""

from corolux import callbacks as callbacks
from corolux import checkpoint as checkpoint
from corolux import compiling as compiling
from corolux import metrics as metrics
from corolux.arguments import seed_everything as seed_everything
from corolux.callback import Callback as Callback
from corolux.callback import callback as callback
from corolux.callback import coroutine as coroutine
from corolux.context import Context as Context
from corolux.control import SkipBatch as SkipBatch
from corolux.control import SkipValidation as SkipValidation
from corolux.control import StopTraining as StopTraining
from corolux.debug import Stepper as Stepper
from corolux.events import Event as Event
from corolux.events import Stage as Stage
from corolux.events import every as every
from corolux.history import History as History
from corolux.lr_finder import lr_finder as lr_finder
from corolux.trainer import Trainer as Trainer
from corolux.trainer import fit as fit

__version__ = "0.1.0"

__all__ = [
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
    "callbacks",
    "checkpoint",
    "compiling",
    "coroutine",
    "every",
    "fit",
    "lr_finder",
    "metrics",
    "seed_everything",
]
