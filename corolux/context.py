"""Context: the live state of one run (``ctx``), its control methods and ``log()``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from corolux._suggest import did_you_mean
from corolux.control import Signals
from corolux.events import BATCH_ENDS, ONE_OFF_STAGES, STEP_STAGES, Stage
from corolux.history import History, plain_value
from corolux.precision import Precision

_NESTED_STAGES = frozenset(Stage) - ONE_OFF_STAGES
_STEP_STAGE_NAMES = frozenset().union(*STEP_STAGES.values())
#: The last stage of each kind of run: nothing is delivered after it.
_LAST_STAGE = {"fit": Stage.on_fit_end, "evaluate": Stage.on_valid_end, "predict": Stage.on_predict_end}
_Tensor = torch.Tensor

__all__ = ["Context"]


class Context:
    """The live, mutable state of one run; every event carries it as ``event.ctx``.

    What a callback (or the code iterating ``run()``) assigns to ``input``, ``target``,
    ``pred`` or ``loss`` is what the step uses next:

    >>> # at on_train_batch_after_loss: no parameter moves for this batch
    >>> # ctx.loss = ctx.loss * 0

    Control: :meth:`stop_training`, :meth:`skip_batch`, :meth:`skip_validation`,
    :meth:`emit`, :meth:`request_interrupt`. Custom steps use :meth:`backward`,
    :attr:`accumulating`, :meth:`step_optimizer` and :meth:`unscale_gradients` to do what
    the default step does.

    Who writes what: the loop (``corolux.loop``) writes the counters and the batch
    (``epoch``, ``iter``, ``step``, ``stage``, ``phase``, ``batch``, ``input``, ``target``,
    ``pred``, ``loss``, ...) directly, and marks epochs, phases and batches through the
    ``begin_*``/``end_*`` methods below, which own the private fields. Read-only
    views: :attr:`in_batch`, :attr:`validation_skipped`, :attr:`gradients_pending`,
    :attr:`step_skipped`. Its own attributes are slots (the loop touches them on every
    event), so ``dir(ctx)`` lists them while ``vars(ctx)`` holds what callbacks add.
    """

    # Invariant (only the methods of this class write the private fields):
    #   _in_batch            set by begin_batch(); cleared by end_batches() (the phase's batches
    #                        are over, the data failed between batches, or a stage is emitted
    #                        after *_batch_end) and by begin_phase()
    #   _backward_iter       the iter of this phase's last backward (begin_phase() clears it)
    #   _validation_skipped  skip_validation() was given this epoch (begin_epoch() clears it)
    #   _epoch_ended         end_epoch() ran: the epoch's values are floats (begin_epoch() clears it)
    #   _params              per optimizer, the parameters its backward reaches (several only)
    #   _scaler              precision.scaler, which a Precision fixes when it is built: backward(),
    #                        step_optimizer() and end_batch() read it without touching the Precision
    __slots__ = (
        "model",
        "optimizers",
        "opt_name",
        "opt",
        "loss_fn",
        "device",
        "precision",
        "hparams",
        "is_main_process",
        "kind",
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
        "unpack",
        "stages",
        "signals",
        "resume_from",
        "data_state",
        "timing",
        "rewinder",
        "_in_batch",
        "_backward_iter",
        "_validation_skipped",
        "_epoch_ended",
        "_params",
        "_scaler",
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
        precision: Precision | None = None,
        kind: str = "fit",
        hparams: Mapping[str, Any] | None = None,
        is_main_process: bool = True,
        stages: frozenset[str] = frozenset(),
        unpack: Callable[[Any], tuple[Any, Any]],
    ) -> None:
        if kind not in ("fit", "evaluate", "predict"):
            raise ValueError(f"kind must be 'fit', 'evaluate' or 'predict', got {kind!r}")
        self.model = model
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        first = next(iter(self.optimizers.items()), (None, None))
        self.opt_name: str | None = first[0]
        self.opt: torch.optim.Optimizer | None = first[1]
        self.loss_fn = loss_fn
        self.device = device
        #: Autocast, loss scaling, unscaling and stepping (``"32"``, ``"bf16-mixed"``, ``"16-mixed"``).
        self.precision = precision if precision is not None else Precision("32", device)
        self._scaler = self.precision.scaler
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.is_main_process = is_main_process
        #: What this run does: ``"fit"``, ``"evaluate"`` or ``"predict"``.
        self.kind = kind
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
        #: Splits a batch into (input, target) (the trainer's ``unpack``).
        self.unpack: Callable[[Any], tuple[Any, Any]] = unpack
        #: Every stage name this run knows: the built-in ones and the trainer's custom ones.
        self.stages = stages
        #: Emitted stages and Ctrl-C, which the loop acts on after each stage.
        self.signals = Signals()
        #: A checkpoint to continue from (a path, or a state from ``corolux.checkpoint``): the
        #: loop restores it after the callbacks' ``setup`` and before ``on_fit_begin``.
        self.resume_from: Any = None
        #: What this epoch's pass over the training data drew its order from
        #: (``corolux.data.pass_state``), and under ``"valid"`` the torch RNG state as its
        #: validation began: for checkpoints taken inside the epoch. None before the pass.
        self.data_state: dict[str, Any] | None = None
        #: When a dict (``Profile`` sets one), the loop adds to ``timing["<phase>_data"]`` the
        #: seconds each phase waits for the data to give its next batch.
        self.timing: dict[str, float] | None = None
        #: A rewindable ``Stepper``'s :class:`corolux.rewind.Rewinder` (None otherwise): the
        #: loop's training passes keep each batch's starting state through it.
        self.rewinder: Any = None
        self._in_batch = False
        self._backward_iter = 0
        self._validation_skipped = False
        self._epoch_ended = False
        # None with one optimizer: backward() tells by identity, without touching a dict.
        self._params: dict[int, list[torch.Tensor]] | None = None
        if len(self.optimizers) > 1:
            self._params = {
                id(opt): [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
                for opt in self.optimizers.values()
            }

    # -- read-only views -------------------------------------------------------------------

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler of ``"16-mixed"``, else None (owned by ``ctx.precision``)."""
        return self._scaler

    @property
    def in_batch(self) -> bool:
        """True at the stages of a batch, from ``on_*_batch_begin`` to ``on_*_batch_end``
        (``ctx.batch``, ``input``, ``target``, ``pred`` and ``loss`` are this batch's). False
        at the phase's stages, at a stage emitted after ``on_*_batch_end``, and where the
        data fails while the next batch is fetched, moved or split."""
        return self._in_batch

    @property
    def validation_skipped(self) -> bool:
        """``skip_validation()`` was given this epoch."""
        return self._validation_skipped

    @property
    def gradients_pending(self) -> bool:
        """True when gradients wait for an optimizer step (a gradient-accumulation window is
        open): a parameter has a ``.grad``, which stepping and zeroing set to None. No sync."""
        if self.optimizers:
            params: Any = (
                p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]
            )
        else:
            params = self.model.parameters()
        return any(p.grad is not None for p in params)

    @property
    def step_skipped(self) -> bool:
        """The GradScaler skipped the last optimizer step because the gradients held inf or
        NaN (always False without one); read it at ``on_train_batch_after_step``."""
        return self.precision.step_skipped

    @property
    def accumulating(self) -> bool:
        """True when this batch only accumulates gradients and the optimizer does not step."""
        n = self.accumulate_steps
        return n > 1 and self.iter % n != 0 and not self.is_last_batch and self.stop_reason is None

    # -- control ---------------------------------------------------------------------------

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
        if not self._in_batch or self.stage in BATCH_ENDS:
            where = (
                ""
                if self._in_batch or self.stage not in _STEP_STAGE_NAMES
                else (
                    ", which here steps the accumulation window left open when the data ended "
                    "(ctx.in_batch is false); to drop that window, call ctx.zero_grad()"
                )
            )
            raise RuntimeError(
                f"skip_batch() at {str(self.stage)!r}{where}: there is no batch to skip here; it "
                "is valid from on_train_batch_begin (or on_valid_batch_begin, "
                "on_predict_batch_begin) up to the stage before the matching *_batch_end"
            )
        self.skipped = True

    def skip_validation(self) -> None:
        """Do not run this epoch's validation loop (a no-op without validation data or
        once validation has started)."""
        self._validation_skipped = True

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
        if self.stage is _LAST_STAGE[self.kind]:
            raise RuntimeError(
                f"ctx.emit({stage!r}) at {str(self.stage)!r}, the run's last stage: no event comes "
                "after it; emit earlier (e.g. at on_epoch_end)"
            )
        self.signals.emit(stage)

    def after_stage(self, fn: Callable[[Context], Any]) -> None:
        """Call ``fn(ctx)`` once the current stage is over: after every handler of it ran
        (weight ``inf`` included) and the consumer had the event, before the loop goes on.
        What a checkpoint callback uses to save the state the stage's handlers left.

        Raises:
            RuntimeError: at the run's last stage or at ``on_exception``: the loop does not go
                on after them (do the work in the handler itself).
        """
        if self.stage is _LAST_STAGE[self.kind] or self.stage == Stage.on_exception:
            raise RuntimeError(
                f"ctx.after_stage() at {str(self.stage)!r}: the loop does not go on after this "
                "stage, so nothing would run the function; do its work in the handler itself"
            )
        self.signals.after_stage(lambda: fn(self))

    def request_interrupt(self) -> None:
        """Ask for a graceful stop at the next stage, as Ctrl-C does under ``fit()``."""
        self.signals.request()

    # -- custom-step helpers -----------------------------------------------------------------

    def backward(self, loss: torch.Tensor, opt: torch.optim.Optimizer | None = None) -> None:
        """Backpropagate ``loss`` as the default step does: scaled by ``1/accumulate_steps``
        (``1/k`` in a last window of k batches) and by the GradScaler when there is one.

        With several optimizers the gradients go only to the parameters of ``opt`` (default
        ``ctx.opt``), so one optimizer's loss does not leak into another's gradients.

        Raises:
            ValueError: ``loss`` is not a scalar tensor (e.g. a float assigned to ``ctx.loss``).
        """
        scaled = loss  # ``loss`` stays what was given, for the error message
        try:
            if self.accumulate_steps != 1:
                scaled = scaled / self._window_size()
            if self._scaler is not None:
                scaled = self.precision.scale(scaled)
            if self._params is not None:
                # Several optimizers: this loss's gradients go to this optimizer's parameters only.
                opt = self.opt if opt is None else opt
                params = self._params.get(id(opt))
                if params is None:
                    raise ValueError(
                        f"backward(): opt={opt!r} is not one of this trainer's optimizers "
                        f"{list(self.optimizers)}; pass one of ctx.optimizers[name]"
                    )
                scaled.backward(inputs=params)
            else:
                scaled.backward()
        except (AttributeError, TypeError, RuntimeError):
            problem = loss_problem(loss)
            if problem is None:
                raise
            where = (
                f"the loss (from loss_fn, or assigned to ctx.loss) backpropagated after {str(self.stage)!r}"
            )
            raise ValueError(f"{problem}; {where}") from None
        self._backward_iter = self.iter

    def _window_size(self) -> int:
        """The number of batches whose gradients this batch's step sums: ``accumulate_steps``,
        or k for a last window of k < steps batches when the data has a length."""
        steps = self.accumulate_steps
        total = self.num_batches
        if total is not None:
            tail = total % steps
            if tail and self.iter > total - tail:
                return tail
        return steps

    def unscale_gradients(self, opt: torch.optim.Optimizer | None = None) -> None:
        """Divide the gradients of ``opt`` (default ``ctx.opt``) by the GradScaler's scale,
        so a callback at ``on_train_batch_before_step`` clips or reads true gradients.

        Idempotent within a step (the step then does not unscale again); a no-op without a
        GradScaler. No host-device sync.
        """
        opt = self.opt if opt is None else opt
        if opt is not None:
            self.precision.unscale(opt)

    def step_optimizer(self, opt: torch.optim.Optimizer | None = None) -> None:
        """Step ``opt`` (default ``ctx.opt``) through the GradScaler when there is one,
        then zero its gradients (``set_to_none=True``). The scaler's ``update()`` runs once
        per batch, after every optimizer has stepped (the loop calls it)."""
        opt = self.opt if opt is None else opt
        if opt is None:
            raise RuntimeError(
                "step_optimizer(): this trainer has no optimizer (optimizer=None): a step that "
                "updates the parameters by hand does so between on_train_batch_before_step and "
                "on_train_batch_after_step, without step_optimizer()"
            )
        if self._scaler is None:
            opt.step()  # what Precision.step does without a GradScaler, without the call
        else:
            self.precision.step(opt)
        opt.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Drop the gradients of every optimizer, or of the model without one (after a batch
        skipped after its backward, and at the end of each train phase, so an accumulation
        window cut short leaks into nothing)."""
        if self.optimizers:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
        else:  # a step that updates by hand (optimizer=None)
            self.model.zero_grad(set_to_none=True)

    # -- the loop's side: corolux.loop opens and closes the scopes through these ----------------

    def begin_epoch(self, epoch: int) -> None:
        """For the loop: epoch ``epoch`` starts, with fresh metrics."""
        self.epoch = epoch
        self.metrics = {}
        self.data_state = None
        self._validation_skipped = False
        self._epoch_ended = False

    def end_epoch(self) -> None:
        """For the loop, before ``on_epoch_end``: the epoch's values become what the history
        holds (a one-element tensor logged with :meth:`log` becomes a float, once)."""
        metrics = self.metrics
        for name, value in metrics.items():
            if isinstance(value, _Tensor):
                metrics[name] = plain_value(value)
        self._epoch_ended = True

    def begin_phase(self, phase: str, data: Any, num_batches: int | None) -> None:
        """For the loop: a pass over ``data`` (``"train"``, ``"valid"``, ``"predict"``) starts."""
        self.phase = phase
        self.training = phase == "train"
        self.data = data
        self.num_batches = num_batches
        self.iter = 0
        self.is_last_batch = False
        self._in_batch = False
        self._backward_iter = 0

    def begin_batch(self, batch: Any, input: Any, target: Any) -> None:
        """For the loop: the next batch (``iter`` + 1) starts; the last one's pred, loss and
        graph are dropped before this forward."""
        self.iter = it = self.iter + 1
        self.is_last_batch = it == self.num_batches
        self.batch = batch
        self.input = input
        self.target = target
        self.pred = self.loss = None
        self.skipped = False
        self._in_batch = True

    def end_batch(self) -> None:
        """For the loop, before ``on_*_batch_end``: drop the gradients of a batch skipped
        after its backward, and update the GradScaler once for the batch. Only those two
        cases have work here: the loop calls it after a skipped batch, or for every batch
        when there is a GradScaler (``ctx.precision.scaler``)."""
        if self.skipped and self._backward_iter == self.iter:
            self.zero_grad()  # this batch's gradients must not reach the next step
        if self._scaler is not None:
            self.precision.update()

    def counters(self) -> tuple[Any, ...]:
        """For a rewind (``corolux.rewind``), taken before a training batch begins: the
        counters, records and control state that the batch may change."""
        history = self.history
        return (
            self.epoch,
            self.iter,
            self.step,
            self.stop_reason,
            dict(self.metrics),
            history.interrupted,
            self._backward_iter,
            self._validation_skipped,
        )

    def restore_counters(self, kept: tuple[Any, ...]) -> None:
        """For a rewind: put back what :meth:`counters` returned; the batch that is abandoned
        leaves no exception, skip or pending signal behind (emitted stages, after-stage work,
        a graceful stop that its ``on_interrupt`` began)."""
        (
            self.epoch,
            self.iter,
            self.step,
            self.stop_reason,
            metrics,
            self.history.interrupted,
            self._backward_iter,
            self._validation_skipped,
        ) = kept
        self.metrics = dict(metrics)
        self.exception = None
        self.skipped = False
        self.signals.rewind()

    def end_batches(self) -> None:
        """For the loop: the phase's batches are over (or the data failed while the next one
        was fetched): ``in_batch`` is false from here."""
        self._in_batch = False

    # -- records -----------------------------------------------------------------------------

    def log(self, name: str, value: Any) -> None:
        """Record a custom value in this epoch's history (``history[name]``).

        A one-element tensor is kept on its device (no sync per call) and becomes a float
        once per epoch, when the epoch ends: at ``on_epoch_end``, ``ctx.metrics`` holds
        floats, as the history does.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"log(): name must be a non-empty string, got {name!r}")
        if name == "epoch":
            raise ValueError("log(): 'epoch' is reserved for the epoch number; pick another name")
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if self._epoch_ended:
                value = plain_value(value)  # at on_epoch_end: as the other values are
        elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
            value = value.item()  # a NumPy scalar (what scikit-learn's metrics return): a float
        self.metrics[name] = value

    def commit_epoch(self) -> None:
        """Write this epoch's metrics into the history (called once per epoch, at its end, by
        the MetricsTracker)."""
        record: dict[str, Any] = {"epoch": self.epoch}
        record.update(self.metrics)
        self.metrics = record
        self.history.append(record)

    def __repr__(self) -> str:
        return (
            f"<Context {self.kind} stage={self.stage!r} epoch={self.epoch}/{self.max_epochs} "
            f"phase={self.phase!r} iter={self.iter} step={self.step}>"
        )


def loss_problem(loss: Any) -> str | None:
    """What is wrong with ``loss`` as a loss: None for a scalar (one-element) tensor, else a
    message that shows it and says how to fix it."""
    if not isinstance(loss, _Tensor):
        shown = repr(loss) if len(repr(loss)) <= 60 else repr(loss)[:57] + "..."
        return (
            f"the loss must be a scalar tensor, got {type(loss).__name__} {shown}; a loss function "
            "returns a tensor, and a value assigned to ctx.loss must be one too (e.g. "
            "ctx.loss = ctx.loss * 0, not 0.0)"
        )
    if loss.numel() != 1:
        return (
            f"the loss must be a scalar tensor, got shape {tuple(loss.shape)} (one value per "
            "sample?); reduce it (reduction='mean' in the loss function, or .mean())"
        )
    return None
