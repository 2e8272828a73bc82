"""Context: the live state of one run (``ctx``), its control methods and ``log()``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from corolux._suggest import did_you_mean
from corolux.events import ONE_OFF_STAGES, Stage
from corolux.history import History

_NESTED_STAGES = frozenset(Stage) - ONE_OFF_STAGES

__all__ = ["Context"]


class Context:
    """The live, mutable state of one run; every event carries it as ``event.ctx``.

    What a callback (or the code iterating ``run()``) assigns to ``input``, ``target``,
    ``pred`` or ``loss`` is what the step uses next:

    >>> # at on_train_batch_after_loss: no parameter moves for this batch
    >>> # ctx.loss = ctx.loss * 0

    Control: :meth:`stop_training`, :meth:`skip_batch`, :meth:`skip_validation`,
    :meth:`emit`. Custom steps use :meth:`backward`, :attr:`accumulating` and
    :meth:`step_optimizer` to do what the default step does.

    Its own attributes are slots (the loop reads and writes them on every event), so
    ``dir(ctx)`` lists them while ``vars(ctx)`` holds only the attributes callbacks add.
    """

    # Slots: the loop and the driver read and write these on every event, and a slot is
    # the fastest attribute there is. ``__dict__`` stays, for what callbacks add.
    __slots__ = (
        "model",
        "optimizers",
        "opt_name",
        "opt",
        "loss_fn",
        "device",
        "scaler",
        "hparams",
        "is_main_process",
        "epoch",
        "completed_epochs",
        "min_epochs",
        "max_epochs",
        "max_steps",
        "iter",
        "num_batches",
        "step",
        "training",
        "phase",
        "stage",
        "batch",
        "input",
        "target",
        "pred",
        "loss",
        "losses",
        "skipped",
        "is_last_batch",
        "exception",
        "stop_reason",
        "metrics",
        "history",
        "train_data",
        "valid_data",
        "data",
        "callbacks",
        "accumulate_steps",
        "predictions",
        "autocast",
        "unpack",
        "stages",
        "_check_loss",
        "_params",
        "_in_batch",
        "_skip_validation",
        "_batch_backward",
        "_window_open",
        "_scaler_stepped",
        "_silent",
        "_attention",
        "_emitted",
        "_interrupt_pending",
        "_interrupted",
        "_sigint_count",
        "__dict__",
        "__weakref__",
    )

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizers: Mapping[str, torch.optim.Optimizer],
        loss_fn: Callable[..., torch.Tensor] | None,
        device: torch.device,
        scaler: Any = None,
        hparams: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        stages: frozenset[str] = frozenset(),
        unpack: Callable[[Any], tuple[Any, Any]],
    ) -> None:
        self.model = model
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        first = next(iter(self.optimizers.items()), (None, None))
        self.opt_name: str | None = first[0]
        self.opt: torch.optim.Optimizer | None = first[1]
        self.loss_fn = loss_fn
        self.device = device
        self.scaler = scaler
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.is_main_process = is_main_process
        self.epoch = 0
        self.completed_epochs = 0
        self.min_epochs = 0
        self.max_epochs = 0
        self.max_steps: int | None = None
        self.iter = 0
        self.num_batches: int | None = None
        self.step = 0
        self.training = False
        self.phase: str | None = None
        self.stage: str | None = None
        self.batch: Any = None
        self.input: Any = None
        self.target: Any = None
        self.pred: Any = None
        self.loss: Any = None
        #: Per-optimizer losses of this batch, set by the default step with several optimizers.
        self.losses: dict[str, torch.Tensor] = {}
        self.skipped = False
        self.is_last_batch = False
        self.exception: BaseException | None = None
        self.stop_reason: str | None = None
        #: This epoch's computed metrics, ``{"train_loss": ..., "valid_acc": ...}``; the
        #: record that goes into the history when the epoch ends.
        self.metrics: dict[str, Any] = {}
        self.history = History()
        self.train_data: Any = None
        self.valid_data: Any = None
        self.data: Any = None
        self.callbacks: list[Any] = []
        #: Gradient accumulation: the optimizer steps every ``accumulate_steps`` batches.
        self.accumulate_steps = 1
        #: The predictions of ``predict()``, concatenated, once the run has ended.
        self.predictions: Any = None
        #: Builds the autocast context of the forward, or None at full precision.
        self.autocast: Callable[[], Any] | None = None
        #: Splits a batch into (input, target) (the trainer's ``unpack``).
        self.unpack: Callable[[Any], tuple[Any, Any]] = unpack
        #: Every stage name this run knows: the built-in ones and the trainer's custom ones.
        self.stages = stages
        self._check_loss = True
        self._params: dict[int, list[torch.Tensor]] = {}
        self._in_batch = False
        self._skip_validation = False
        self._batch_backward = False  # this batch ran a backward
        self._window_open = False  # a backward ran since the optimizer last stepped
        self._scaler_stepped = False  # a GradScaler step awaits its once-per-batch update()
        # Stages the loop need not yield, only record in ``stage``: in fit(), the stages inside
        # a batch that nothing watches (see Driver.events).
        self._silent: frozenset[str] = frozenset()
        # The driver looks at these after each event: emitted stages and Ctrl-C requests.
        self._attention = False
        self._emitted: list[str] = []
        self._interrupt_pending = False
        self._interrupted = False
        self._sigint_count = 0

    # -- control ---------------------------------------------------------------------

    def stop_training(self, reason: str = "stopped") -> None:
        """End training: the current batch finishes, open scopes end, then ``on_fit_end``.

        ``reason`` is kept in ``ctx.stop_reason`` (``"early_stopping"``, ``"nan"``, ...).
        """
        if self.stop_reason is None:
            self.stop_reason = reason

    def skip_batch(self) -> None:
        """Skip the rest of this batch's step (no backward or optimizer step after this
        stage); ``on_*_batch_end`` still fires with ``ctx.skipped`` true and the batch is
        not counted in the metrics.

        Raises:
            RuntimeError: outside a batch (valid from ``on_*_batch_begin`` up to the last
                stage before ``on_*_batch_end``).
        """
        if not self._in_batch:
            raise RuntimeError(
                f"skip_batch() at {self.stage!r}: there is no batch to skip here; it is valid "
                "from on_train_batch_begin (or on_valid_batch_begin, on_predict_batch_begin) "
                "up to the stage before the matching *_batch_end"
            )
        self.skipped = True

    def skip_validation(self) -> None:
        """Do not run this epoch's validation loop (a no-op without validation data or
        once validation has started)."""
        self._skip_validation = True

    def emit(self, stage: str) -> None:
        """Ask for a one-off event (``on_early_stopping`` or a custom stage): its
        handlers run, and the consumer receives it, right after the current event."""
        emittable = self.stages - _NESTED_STAGES - {Stage.on_exception, Stage.on_interrupt}
        if stage not in emittable:
            raise ValueError(
                f"ctx.emit({stage!r}): only one-off stages can be emitted: on_early_stopping "
                f"or a custom stage of the trainer;{did_you_mean(str(stage), emittable) or ''} "
                "the stages of the tree are the loop's alone"
            )
        self._emitted.append(stage)
        self._attention = True

    @property
    def _aborting(self) -> bool:
        """A Ctrl-C now aborts: a graceful stop has already begun, or Ctrl-C came twice."""
        return self._interrupted or self._sigint_count >= 2

    def _stop_for_interrupt(self) -> None:
        """Begin the graceful stop of a first Ctrl-C."""
        self._interrupted = True
        self.history.interrupted = True
        self.stop_training("interrupted")

    def request_interrupt(self) -> None:
        """Ask for a graceful stop at the next event, as Ctrl-C does under ``fit()``."""
        self._interrupt_pending = True
        self._attention = True

    # -- custom-step helpers -----------------------------------------------------------

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer | None = None) -> None:
        """Backpropagate ``loss`` as the default step does: scaled by ``1/accumulate_steps``
        and by the GradScaler when there is one.

        With several optimizers the gradients go only to the parameters of ``opt`` (default
        ``ctx.opt``), so one optimizer's loss does not leak into another's gradients.
        """
        if self.accumulate_steps != 1:
            loss = loss / self._window_size()
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self._params:
            # Several optimizers: this loss's gradients go to this optimizer's parameters only.
            opt = self.opt if opt is None else opt
            params = self._params.get(id(opt))
            if params is None:
                raise ValueError(
                    f"backward(): opt={opt!r} is not one of this trainer's optimizers "
                    f"{list(self.optimizers)}; pass one of ctx.optimizers[name]"
                )
            loss.backward(inputs=params)
        else:
            loss.backward()
        self._batch_backward = True
        self._window_open = True

    def _window_size(self) -> int:
        """The number of batches whose gradients this batch's step will sum: ``accumulate_steps``,
        or k for a last window of k < steps batches when the data has a length."""
        steps = self.accumulate_steps
        total = self.num_batches
        if total is not None:
            tail = total % steps
            if tail and self.iter > total - tail:
                return tail
        return steps

    @property
    def gradients_pending(self) -> bool:
        """True when a backward ran since the optimizer last stepped (a gradient-accumulation
        window is open)."""
        return self._window_open

    @property
    def accumulating(self) -> bool:
        """True when this batch only accumulates gradients and the optimizer does not step."""
        n = self.accumulate_steps
        return n > 1 and self.iter % n != 0 and not self.is_last_batch and self.stop_reason is None

    def step_optimizer(self, opt: torch.optim.Optimizer | None = None) -> None:
        """Step ``opt`` (default ``ctx.opt``) through the GradScaler when there is one,
        then zero its gradients (``set_to_none=True``). The scaler's ``update()`` runs once
        per batch, after every optimizer has stepped."""
        opt = self.opt if opt is None else opt
        if opt is None:
            raise RuntimeError(
                "step_optimizer(): this trainer has no optimizer (optimizer=None): a step that "
                "updates the parameters by hand does so between on_train_batch_before_step and "
                "on_train_batch_after_step, without step_optimizer()"
            )
        if self.scaler is not None:
            self.scaler.step(opt)
            self._scaler_stepped = True  # the loop calls scaler.update() once, at the batch's end
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self._window_open = False

    def zero_grad(self) -> None:
        """Drop the gradients of every optimizer (after a batch skipped after its backward, and
        at the end of each train phase, so an accumulation window cut short leaks into nothing)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self._window_open = False

    # -- records -----------------------------------------------------------------------

    def log(self, name: str, value: Any) -> None:
        """Record a custom value in this epoch's history (``history[name]``).

        A one-element tensor reads back from the history as a float.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"log(): name must be a non-empty string, got {name!r}")
        if name == "epoch":
            raise ValueError("log(): 'epoch' is reserved for the epoch number; pick another name")
        self.metrics[name] = value.detach() if isinstance(value, torch.Tensor) else value

    def commit_epoch(self) -> None:
        """Write this epoch's metrics into the history (called once per epoch, at its end)."""
        record = {"epoch": self.epoch}
        record.update(self.metrics)
        self.metrics = record
        self.history.append(record)

    def __repr__(self) -> str:
        return (
            f"<Context stage={self.stage!r} epoch={self.epoch}/{self.max_epochs} "
            f"phase={self.phase!r} iter={self.iter} step={self.step}>"
        )
