"""Trainer: resolves the device, optimizers and data; ``run``/``fit``/``evaluate``/``predict``.

Every entry point drives the same loop generator (``corolux.loop``) through a ``Driver``:
``run()`` hands it to you, ``fit()`` consumes it to the end.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from corolux import checkpoint, compiling, distributed, loop
from corolux._suggest import did_you_mean
from corolux.arguments import (
    OptimizerSpec,
    check_loss_fn,
    check_metrics,
    resolve_device,
    resolve_epochs,
    resolve_optimizers,
    seed_everything,
)
from corolux.callbacks import MetricsTracker, ProgressBar
from corolux.context import Context
from corolux.control import graceful_sigint, warn_if_interrupted
from corolux.data import default_unpack, resolve_data, split_validation
from corolux.driver import Driver, MakeLoop
from corolux.events import STEP_STAGES, Event, Stage
from corolux.history import History, plain_value
from corolux.metrics import metric_name
from corolux.precision import Precision

__all__ = ["Trainer", "fit"]

Step = Callable[[Context], Generator[Stage | str, None, None]]


class Trainer:
    """Train, evaluate and predict with a PyTorch model; every run is a generator of events.

    Args:
        model: the ``nn.Module``; moved to ``device``.
        loss_fn: ``loss_fn(pred, target) -> scalar``; None when the output carries its loss
            (``out.loss`` or ``out["loss"]``).
        optimizer: an Optimizer, a factory ``params -> Optimizer``, or a dict name -> either
            (a factory in a dict gets the parameters of the submodule of that name).
        metrics: metrics for both phases; ``train_metrics``/``valid_metrics`` add phase-only ones.
        device: ``"auto"`` (cuda, else mps, else cpu) or any torch device.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (autocast + GradScaler).
        progress: True shows tqdm bars, False nothing; None (the default) bars in a terminal or
            a notebook, one line per epoch elsewhere (a log file, CI).
        seed: when given, each run seeds torch, ``random`` and NumPy at its start.
        unpack: ``fn(batch) -> (input, target)`` for batch layouts other than a pair or a
            dict with ``"input"``/``"target"``.
        train_step, valid_step, predict_step: generator functions ``step(ctx)`` replacing
            the default steps (or override the methods of the same name).
        strategy: None, or ``"ddp"``; under ``torchrun`` (``WORLD_SIZE`` > 1) DDP is used
            either way: the process group is joined here, the model wrapped in
            ``DistributedDataParallel`` for ``fit`` (``ctx.model`` is the wrapper there,
            ``trainer.model`` stays yours), the data sharded, the metrics reduced.
        ddp_timeout: seconds a process waits for the others in a collective before failing
            (a rank that failed or was killed ends the others' run within it).
        compile: False (eager), True (``torch.compile`` the model's forward with its default
            options), or a dict of ``torch.compile``'s keyword arguments, e.g.
            ``{"mode": "max-autotune"}``, ``{"fullgraph": True}``, ``{"backend": "aot_eager"}``.
            Only the forward is compiled (the loop, callbacks, loss and optimizer step stay
            eager: no corolux code is traced); it is installed on the model while a run is
            open, so the default and custom steps calling ``ctx.model(x)`` get it, and
            ``trainer.model``/``ctx.model`` stay your module with an unprefixed
            ``state_dict()``. Compiled once per trainer; train and eval mode get a graph each,
            and a partial last batch one more (dynamic); count them with
            ``corolux.compiling.compile_counts()`` or ``Profile``. A model you compiled
            yourself (``torch.compile(model)``) works with ``compile=False``.
            ``"step"`` (or ``{"step": True, ...}``) compiles the default train and valid
            steps' forward and loss as one graph (``corolux.loop.forward_and_loss``), which
            a callback on ``on_train_batch_after_pred`` or ``on_valid_batch_after_pred``
            could not change, so such a callback, a custom step or DDP is refused.

    Example:
        >>> import torch, corolux
        >>> model = torch.nn.Linear(4, 3)
        >>> trainer = corolux.Trainer(model, loss_fn=torch.nn.functional.cross_entropy,
        ...     optimizer=lambda p: torch.optim.SGD(p, lr=0.1), device="cpu", progress=False,
        ...     metrics=[corolux.metrics.Accuracy()])
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> history = trainer.fit((x, y), epochs=2, valid_data=0.25)
        >>> sorted(history.to_dict())
        ['epoch', 'train_acc', 'train_loss', 'valid_acc', 'valid_loss']
    """

    #: Custom stages a subclass's steps may yield (names start with ``on_``).
    stages: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if isinstance(cls.stages, str) or not all(isinstance(s, str) for s in cls.stages):
            raise TypeError(f"{cls.__name__}.stages must be a tuple of stage names, got {cls.stages!r}")
        for name in cls.stages:
            if not name.startswith("on_") or not name.isidentifier():
                raise ValueError(
                    f"{cls.__name__}.stages: custom stage names start with 'on_' and are "
                    f"identifiers, got {name!r}"
                )

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: OptimizerSpec | None = None,
        metrics: Sequence[Any] | None = None,
        train_metrics: Sequence[Any] | None = None,
        valid_metrics: Sequence[Any] | None = None,
        device: str | torch.device = "auto",
        precision: str = "32",
        progress: bool | None = None,
        seed: int | None = None,
        unpack: Callable[[Any], tuple[Any, Any]] | None = None,
        train_step: Step | None = None,
        valid_step: Step | None = None,
        predict_step: Step | None = None,
        hparams: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        ddp_timeout: float = 1800.0,
        compile: bool | str | Mapping[str, Any] = False,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if unpack is not None and not callable(unpack):
            raise TypeError(f"unpack must be a function batch -> (input, target), got {unpack!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        if progress not in (None, True, False):
            raise TypeError(f"progress must be True, False or None (auto), got {progress!r}")
        if not isinstance(ddp_timeout, (int, float)) or isinstance(ddp_timeout, bool) or ddp_timeout <= 0:
            raise ValueError(f"ddp_timeout must be a number of seconds > 0, got {ddp_timeout!r}")
        compile_options = compiling.options(compile, model)
        #: The process group this trainer trains in (None for a single process).
        self.distributed = distributed.join(strategy, device, float(ddp_timeout))
        if self.distributed is not None:
            device = distributed.device_for(self.distributed, device)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        # DistributedDataParallel over the model (its construction gives every rank rank 0's
        # weights); fit's steps call it, so that the gradients are averaged over the ranks.
        self._ddp_model = None if self.distributed is None else distributed.wrap(self.model, self.device)
        # The compiled forward every run installs on self.model (built once: a second run
        # reuses dynamo's graphs); under DDP the wrapper's forward calls it (corolux.compiling).
        # With compile="step" only predict() runs install it (the steps fuse forward and loss).
        self._compile = compile_options
        self._compiled: compiling.CompiledForward | None = (
            None if compile_options is None else compiling.compile_forward(self.model, compile_options)
        )
        self.loss_fn = check_loss_fn(loss_fn)
        if isinstance(loss_fn, torch.nn.Module):  # a loss with parameters or buffers (e.g. class weights)
            loss_fn.to(self.device)
        extra = loss_fn.parameters() if isinstance(loss_fn, torch.nn.Module) else ()
        self.optimizers = resolve_optimizers(optimizer, checkpoint.unwrap(self.model), extra=extra)
        #: The precision of the steps: autocast, and the GradScaler of "16-mixed".
        self.precision = Precision(precision, self.device)
        self.scaler = self.precision.scaler
        self.metrics = check_metrics(metrics, "metrics")
        self.train_metrics = self.metrics + check_metrics(train_metrics, "train_metrics")
        self.valid_metrics = self.metrics + check_metrics(valid_metrics, "valid_metrics")
        for phase, group in (("train", self.train_metrics), ("valid", self.valid_metrics)):
            names = [metric_name(m) for m in group]
            duplicates = sorted({n for n in names if names.count(n) > 1} | ({"loss"} & set(names)))
            if duplicates:
                raise ValueError(
                    f"two {phase} metrics are named {duplicates[0]!r} ('loss' is taken by the "
                    f"loss); give one another name, e.g. Accuracy(name='top1')"
                )
        self.progress = progress
        self.seed = seed
        self.unpack = unpack or default_unpack
        self.hparams = dict(hparams or {})
        self._steps = {
            "train": self._resolve_step(train_step, "train_step", loop.train_step),
            "valid": self._resolve_step(valid_step, "valid_step", loop.valid_step),
            "predict": self._resolve_step(predict_step, "predict_step", loop.predict_step),
        }
        if compile_options is not None and compile_options.step:  # forward and loss in one graph
            defaults = {"train": loop.train_step, "valid": loop.valid_step}
            fused = compiling.fused_steps(
                compile_options,
                loop.forward_and_loss(self.model, self.loss_fn),
                {phase: (self._steps[phase][1], step) for phase, step in defaults.items()},
                distributed=self.distributed is not None,
            )
            self._steps.update((phase, (step, False)) for phase, step in fused.items())
        self.all_stages = frozenset(Stage) | frozenset(self.stages)
        #: The history of the latest fit/run.
        self.history = History()
        # The training state at the end of the last fit, for resume_from="last" (None before one).
        self._last_state: dict[str, Any] | None = None
        self._last_problem = "this trainer has not run fit() yet"
        self._open_run: weakref.ref[Generator[Event, None, None]] | None = None
        self._open_driver: weakref.ref[Driver] | None = None

    # -- overridable steps ---------------------------------------------------------------------

    def train_step(self, ctx: Context) -> Generator[Stage | str, None, None]:
        """One training batch: a generator yielding the inner stages (override for GANs,
        several optimizers, accumulation by hand). The default is ``corolux.loop.train_step``."""
        return loop.train_step(ctx)

    def valid_step(self, ctx: Context) -> Generator[Stage | str, None, None]:
        """One validation batch; the default is ``corolux.loop.valid_step``."""
        return loop.valid_step(ctx)

    def predict_step(self, ctx: Context) -> Generator[Stage | str, None, None]:
        """One prediction batch; the default is ``corolux.loop.predict_step``."""
        return loop.predict_step(ctx)

    def _resolve_step(self, given: Step | None, method: str, default: Step) -> tuple[Step, bool]:
        """The step to run and whether it is custom (its yields are then checked)."""
        if given is not None:
            if not callable(given):
                raise TypeError(f"{method} must be a generator function step(ctx), got {given!r}")
            return given, True
        if getattr(type(self), method) is getattr(Trainer, method):
            return default, False
        return getattr(self, method), True

    def _allowed(self, phase: str) -> frozenset[str] | None:
        step, custom = self._steps[phase]
        if not custom:
            return None
        return STEP_STAGES[phase] | frozenset(self.stages)

    # -- runs ----------------------------------------------------------------------------------

    def run(
        self,
        train_data: Any,
        epochs: int | tuple[int, int] = 1,
        *,
        valid_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        batch_size: int | None = None,
        max_steps: int | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> Generator[Event, None, None]:
        """Return the training generator: it yields an ``Event`` at every stage.

        Arguments are checked now, before the first event. Assignments to ``event.ctx``
        take effect when the loop resumes; ``break`` (or ``close()``) ends the run cleanly.

        Example:
            >>> for event in trainer.run(data, epochs=3):            # doctest: +SKIP
            ...     if event.stage == "on_train_batch_after_loss":
            ...         event.ctx.loss = event.ctx.loss * 0.5
        """
        driver, make_loop = self._prepare_fit(
            train_data, epochs, valid_data, callbacks, batch_size, max_steps, resume_from
        )
        return self._start(driver, make_loop, finished=self._finished_fit)

    def fit(
        self,
        train_data: Any,
        epochs: int | tuple[int, int] = 1,
        *,
        valid_data: Any = None,
        callbacks: Sequence[Any] | None = None,
        batch_size: int | None = None,
        max_steps: int | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> History:
        """Train to the end and return the ``History``: ``run()`` driven by corolux.

        Ctrl-C stops gracefully (``on_interrupt``, open scopes end, ``on_fit_end``) and
        returns the history with ``history.interrupted = True``; a second Ctrl-C aborts.

        ``resume_from`` continues a run: a checkpoint file (``save_checkpoint``,
        ``AutoResume``, ``corolux.checkpoint.save``), restored after the callbacks' ``setup``
        and before ``on_fit_begin``; or ``"last"``, this trainer's last fit in memory (after
        Ctrl-C, or to train for more epochs). Epoch numbers, ``ctx.step``, the history,
        callbacks' states and the RNG carry on; ``epochs`` is the total, not a number more.

        Example:
            >>> history = trainer.fit(data, epochs=5)                   # doctest: +SKIP
            >>> history = trainer.fit(data, epochs=10, resume_from="last")  # doctest: +SKIP
        """
        driver, make_loop = self._prepare_fit(
            train_data, epochs, valid_data, callbacks, batch_size, max_steps, resume_from
        )
        self._drive(driver, make_loop, finished=self._finished_fit)
        warn_if_interrupted(driver.ctx, "fit()")
        return driver.ctx.history

    def run_evaluate(
        self,
        data: Any,
        *,
        callbacks: Sequence[Any] | None = None,
        metrics: Sequence[Any] | None = None,
        batch_size: int | None = None,
    ) -> Generator[Event, None, None]:
        """The generator form of :meth:`evaluate`: ``on_valid_*`` events only."""
        driver, make_loop = self._prepare_evaluate(data, callbacks, metrics, batch_size)
        return self._start(driver, make_loop)

    def evaluate(
        self,
        data: Any,
        *,
        callbacks: Sequence[Any] | None = None,
        metrics: Sequence[Any] | None = None,
        batch_size: int | None = None,
    ) -> dict[str, float]:
        """Run one validation pass; return ``{"loss": ..., "<metric>": ...}`` as floats.

        ``metrics`` replaces the trainer's validation metrics for this call. The model's
        train/eval mode is restored afterwards.
        """
        driver, make_loop = self._prepare_evaluate(data, callbacks, metrics, batch_size)
        self._drive(driver, make_loop)
        warn_if_interrupted(driver.ctx, "evaluate()")
        return {k.removeprefix("valid_"): plain_value(v) for k, v in driver.ctx.metrics.items()}

    def run_predict(
        self, data: Any, *, callbacks: Sequence[Any] | None = None, batch_size: int | None = None
    ) -> Generator[Event, None, None]:
        """The generator form of :meth:`predict`: ``on_predict_*`` events only."""
        driver, make_loop = self._prepare_predict(data, callbacks, batch_size)
        return self._start(driver, make_loop)

    def predict(
        self, data: Any, *, callbacks: Sequence[Any] | None = None, batch_size: int | None = None
    ) -> Any:
        """Predict on ``data``: the outputs concatenated along the first dimension, on the
        CPU (leaf by leaf for tuple or dict outputs). Targets in the batches are ignored.

        Under DDP every rank predicts its share (every world-size-th sample) and gets all the
        predictions back, in the data's order (``run_predict`` gives a rank its share only)."""
        driver, make_loop = self._prepare_predict(data, callbacks, batch_size)
        self._drive(driver, make_loop)
        warn_if_interrupted(driver.ctx, "predict()")
        if self.distributed is None:
            return driver.ctx.predictions
        return distributed.gather_shares(driver.ctx.predictions)

    # -- preparing a run -----------------------------------------------------------------------

    def _prepare_fit(
        self,
        train_data: Any,
        epochs: int | tuple[int, int],
        valid_data: Any,
        callbacks: Sequence[Any] | None,
        batch_size: int | None,
        max_steps: int | None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> tuple[Driver, MakeLoop]:
        self._check_idle()
        if not self.optimizers and self.scaler is not None:
            raise ValueError(
                "precision='16-mixed' scales the loss for a GradScaler, which unscales and steps "
                "an optimizer; with optimizer=None (a step that updates by hand) use "
                "precision='bf16-mixed' or '32', or give an optimizer"
            )
        if not self.optimizers and not self._steps["train"][1]:
            raise ValueError(
                "fit() needs an optimizer for the default train step: Trainer(model, "
                "optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), ...); a custom "
                "train_step that updates the parameters itself may run with optimizer=None"
            )
        min_epochs, max_epochs = resolve_epochs(epochs)
        if max_steps is not None and (
            not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1
        ):
            raise ValueError(f"max_steps must be an integer >= 1 or None, got {max_steps!r}")
        if isinstance(valid_data, int):  # valid_data=0 or 1 (a bool too): not a fraction
            raise ValueError(
                f"valid_data={valid_data!r}: a number splits off a fraction of the training data, "
                "which must be a float in (0, 1), e.g. valid_data=0.2; pass None for no validation"
            )
        if isinstance(valid_data, float):
            train_data, valid_data = split_validation(
                train_data,
                valid_data,
                seed=0 if self.seed is None else self.seed,
                batch_size=batch_size,
                device=self.device,
            )
        resume = self._resume_source(resume_from)
        ctx = self._context("fit")
        if resume is not None and resume.get("model") is not None:
            checkpoint.check_weights(ctx, resume)  # a checkpoint of another model: refused before any event
        ctx.resume_from = resume
        ctx.min_epochs, ctx.max_epochs, ctx.max_steps = min_epochs, max_epochs, max_steps
        if self._ddp_model is not None:
            ctx.model = self._ddp_model
        shard = self._shard()
        ctx.train_data = resolve_data(
            train_data,
            name="train_data",
            batch_size=batch_size,
            shuffle=True,
            device=self.device,
            epochs=max_epochs,
            shard=shard,
        )
        if valid_data is not None:
            ctx.valid_data = resolve_data(
                valid_data,
                name="valid_data",
                batch_size=batch_size,
                shuffle=False,
                device=self.device,
                epochs=max_epochs,
                shard=shard,
            )
        defaults = [MetricsTracker(self.train_metrics, self.valid_metrics), ProgressBar()]
        if self.distributed is not None:
            defaults.append(distributed.AgreeOnStop())
        driver = Driver(ctx, self._callbacks(defaults, callbacks), self.all_stages)
        compiling.check_listeners(self._compile, driver.listeners)
        self.history = ctx.history
        train, valid = self._steps["train"][0], self._steps["valid"][0]
        allowed = {"train": self._allowed("train"), "valid": self._allowed("valid")}
        return driver, lambda routing: loop.fit_loop(ctx, train, valid, allowed, routing)

    def _shard(self) -> tuple[int, int] | None:
        """This process's share of the data under DDP: (rank, world size)."""
        setup = self.distributed
        return None if setup is None else (setup.rank, setup.world_size)

    def _resume_source(self, resume_from: Any) -> Mapping[str, Any] | None:
        """What ``fit(resume_from=...)`` continues from, read and checked now (so a bad file
        is refused before the run starts)."""
        if resume_from is None:
            return None
        if resume_from == "last":
            if self._last_state is None:
                raise ValueError(
                    f"resume_from='last': {self._last_problem}; 'last' continues this trainer's "
                    "latest fit(), in memory; to continue from a file, pass its path"
                )
            return self._last_state
        if not isinstance(resume_from, (str, os.PathLike)):
            raise TypeError(
                f"resume_from must be a checkpoint path or 'last', got {type(resume_from).__name__}"
            )
        state = checkpoint.read(resume_from)
        if "capture" in state:
            raise checkpoint.CheckpointError(
                f"{str(resume_from)!r} is an anomaly capture (CaptureAnomaly), not a checkpoint to resume "
                f"from: replay its batch with corolux.Stepper.from_capture(trainer, {str(resume_from)!r}); "
                "trainer.load_checkpoint(path) loads its weights (the failing batch's starting weights)"
            )
        return state

    def _finished_fit(self, ctx: Context, in_batch: bool) -> None:
        """At the end of a fit run: keep its training state for ``resume_from="last"``
        (none when it ended inside a batch)."""
        if in_batch:
            self._last_state = None
            self._last_problem = (
                f"the last fit ended inside a batch (at {str(ctx.stage)!r}, epoch {ctx.epoch}, batch "
                f"{ctx.iter}: an error, or a run closed there), which is no point to continue from"
            )
            return
        self._last_state = checkpoint.capture(ctx, weights=False)

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint to ``path`` (atomically; see ``corolux.checkpoint``): the model,
        optimizers and GradScaler, and the training state of the open run (a stepper paused
        between batches) or of the last fit. Returns the path. Under DDP call it on every
        rank: each rank's RNG states and metric sums go into the file, which rank 0 writes.

        Example:
            >>> trainer.fit(data, epochs=3)                             # doctest: +SKIP
            >>> trainer.save_checkpoint("run.pt")                       # doctest: +SKIP
            >>> trainer.fit(data, epochs=6, resume_from="run.pt")       # doctest: +SKIP
        """
        driver = self._open_driver() if self._open_driver is not None else None
        gen: Any = self._open_run() if self._open_run is not None else None
        running = (
            gen is not None and gen.gi_frame is not None and inspect.getgeneratorstate(gen) != "GEN_CREATED"
        )
        if running and driver is not None and driver.ctx.kind == "fit":
            return checkpoint.save(driver.ctx, path)
        ctx = self._bare_context()
        state = checkpoint.capture(ctx) if self._last_state is None else dict(self._last_state)
        state.update(checkpoint.weights_state(ctx))
        return checkpoint.publish(state, path, main=distributed.is_main_process())

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore the model, the optimizers and the GradScaler from a checkpoint at ``path``,
        into this trainer whether it has run or not (the training state, counters, history,
        callbacks and RNG, is what ``fit(..., resume_from=path)`` restores). A checkpoint of
        another model or optimizer is refused, nothing changed, with its first differences."""
        checkpoint.load_weights(self._bare_context(), path)

    @contextlib.contextmanager
    def preserving_state(self) -> Iterator[None]:
        """A block after which this trainer is as it was before it, in every outcome: model
        weights and train/eval modes, optimizers, GradScaler, history, the last fit's state,
        the ``progress`` setting, and every RNG (``lr_finder`` runs in one).

        Example:
            >>> with trainer.preserving_state():                        # doctest: +SKIP
            ...     trainer.fit(data, epochs=1)   # a trial: nothing of it stays
        """
        saved: dict[str, Any] = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizers": {name: copy.deepcopy(opt.state_dict()) for name, opt in self.optimizers.items()},
            "scaler": None if self.scaler is None else copy.deepcopy(self.scaler.state_dict()),
            "rng": checkpoint.rng_state(),
        }
        modes = [(module, module.training) for module in self.model.modules()]
        kept = (self.history, self._last_state, self._last_problem, self.progress)
        try:
            yield
        finally:
            self.close_run()
            self.model.load_state_dict(saved["model"])
            for name, opt in self.optimizers.items():
                opt.load_state_dict(saved["optimizers"][name])
            if self.scaler is not None and saved["scaler"] is not None:
                self.scaler.load_state_dict(saved["scaler"])
            checkpoint.set_rng_state(saved["rng"])
            for module, training in modes:
                module.training = training
            self.history, self._last_state, self._last_problem, self.progress = kept

    def _bare_context(self, kind: str = "fit") -> Context:
        """A context over this trainer's model and optimizers (a run's, or one for a
        checkpoint outside a run)."""
        return Context(
            model=self.model,
            optimizers=self.optimizers,
            loss_fn=self.loss_fn,
            device=self.device,
            precision=self.precision,
            kind=kind,
            hparams=self.hparams,
            is_main_process=distributed.is_main_process(),
            stages=self.all_stages,
            unpack=self.unpack,
        )

    def _prepare_evaluate(
        self,
        data: Any,
        callbacks: Sequence[Any] | None,
        metrics: Sequence[Any] | None,
        batch_size: int | None,
    ) -> tuple[Driver, MakeLoop]:
        self._check_idle()
        ctx = self._context("evaluate")
        ctx.valid_data = resolve_data(
            data, name="data", batch_size=batch_size, shuffle=False, device=self.device, shard=self._shard()
        )
        valid_metrics = self.valid_metrics if metrics is None else check_metrics(metrics, "metrics")
        defaults = [MetricsTracker((), valid_metrics), ProgressBar()]
        driver = Driver(ctx, self._callbacks(defaults, callbacks), self.all_stages)
        compiling.check_listeners(self._compile, driver.listeners)
        step, allowed = self._steps["valid"][0], self._allowed("valid")
        return driver, lambda routing: loop.evaluate_loop(ctx, ctx.valid_data, step, allowed, routing)

    def _prepare_predict(
        self, data: Any, callbacks: Sequence[Any] | None, batch_size: int | None
    ) -> tuple[Driver, MakeLoop]:
        self._check_idle()
        ctx = self._context("predict")
        ctx.data = resolve_data(
            data, name="data", batch_size=batch_size, shuffle=False, device=self.device, shard=self._shard()
        )
        driver = Driver(ctx, self._callbacks([ProgressBar()], callbacks), self.all_stages)
        step, allowed = self._steps["predict"][0], self._allowed("predict")
        data = ctx.data
        return driver, lambda routing: loop.predict_loop(ctx, data, step, allowed, routing)

    def _context(self, kind: str) -> Context:
        if self.seed is not None:
            seed_everything(self.seed)
        return self._bare_context(kind)

    def _callbacks(self, defaults: list[Any], callbacks: Sequence[Any] | None) -> list[Any]:
        """The defaults (minus those a user callback of the same class replaces) + user's."""
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, (list, tuple)):
            raise TypeError(
                f"callbacks must be a list of callbacks, got {type(callbacks).__name__}; "
                "wrap a single one: callbacks=[cb]"
            )
        kept = [
            ProgressBar(style="bar") if self.progress and isinstance(default, ProgressBar) else default
            for default in defaults
            if not any(isinstance(cb, type(default)) for cb in callbacks)
            and (self.progress is not False or not isinstance(default, ProgressBar))
        ]
        return kept + list(callbacks)

    # -- driving -------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        """A run that was created but never started is discarded; a started one that is
        still open is an error naming how to close it."""
        gen: Any = self._open_run() if self._open_run is not None else None
        if gen is None or gen.gi_frame is None:
            return
        if inspect.getgeneratorstate(gen) == inspect.GEN_CREATED:
            self.close_run()  # never started: its coroutines are closed, nothing else ran
            return
        if gen.gi_running:
            raise RuntimeError(
                "a run of this trainer is executing: evaluate(), predict() or fit() called from "
                "one of its own callbacks cannot start a second run of the same trainer; build "
                "another corolux.Trainer over the same model for it"
            )
        raise RuntimeError(
            "this trainer already has an open run (started, not finished): finish it, or close it "
            "with trainer.close_run() (for a stepper, s.close()) before starting another"
        )

    def close_run(self) -> None:
        """Close this trainer's open run, if any, as ``gen.close()`` would: nothing more is
        yielded, cleanup runs (teardown, progress bars, files). A no-op without one."""
        gen: Any = self._open_run() if self._open_run is not None else None
        driver = self._open_driver() if self._open_driver is not None else None
        self._open_run = self._open_driver = None
        if gen is None:
            return
        if inspect.getgeneratorstate(gen) == inspect.GEN_CREATED and driver is not None:
            driver.discard()  # close() of a generator that never ran runs none of its cleanup
        gen.close()

    def _start(
        self,
        driver: Driver,
        make_loop: MakeLoop,
        *,
        consumer: bool = True,
        finished: Callable[[Context, bool], None] | None = None,
    ) -> Generator[Event, None, None]:
        scope = compiling.run_scope(self._compiled, self.model, driver.ctx.kind)
        gen = driver.start(make_loop, consumer=consumer, finished=finished, scope=scope)
        self._open_run = weakref.ref(gen)
        self._open_driver = weakref.ref(driver)
        return gen

    def _drive(
        self, driver: Driver, make_loop: MakeLoop, finished: Callable[[Context, bool], None] | None = None
    ) -> None:
        gen = self._start(driver, make_loop, consumer=False, finished=finished)  # no per-event suspension
        with graceful_sigint(driver.ctx.signals):
            deque(gen, maxlen=0)

    def stepper(self, *args: Any, rewindable: bool = False, **kwargs: Any) -> Any:
        """Step through ``run(*args, **kwargs)`` in a REPL: ``corolux.Stepper(self.run(...))``.

        ``rewindable=True`` keeps each training batch's starting state, so that
        ``s.rewind()`` can run the batch again (see ``corolux.Stepper.rewind``)."""
        from corolux.debug import Stepper

        return Stepper(self.run(*args, **kwargs), rewindable=rewindable)

    def __repr__(self) -> str:
        return (
            f"Trainer({type(self.model).__name__}, device={str(self.device)!r}, "
            f"optimizers={list(self.optimizers)}, precision={self.precision.name!r})"
        )


_TRAINER_ARGS = frozenset(inspect.signature(Trainer.__init__).parameters) - {"self", "model"}


def fit(model: torch.nn.Module, train_data: Any, **kwargs: Any) -> History:
    """Build a Trainer and fit it in one call; returns the History (the trainer is
    ``history.trainer``).

    Example:
        >>> history = corolux.fit(model, (x, y), loss_fn=F.mse_loss,   # doctest: +SKIP
        ...                       optimizer=lambda p: torch.optim.Adam(p), epochs=5)
    """
    trainer_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _TRAINER_ARGS}
    fit_args = set(inspect.signature(Trainer.fit).parameters) - {"self", "train_data"}
    unknown = [k for k in kwargs if k not in fit_args]
    if unknown:
        known = sorted(_TRAINER_ARGS | fit_args)
        raise TypeError(
            f"corolux.fit() got an unexpected argument {unknown[0]!r};"
            f"{did_you_mean(unknown[0], known) or ''} "
            f"it takes Trainer's and Trainer.fit's: {', '.join(known)}"
        )
    trainer = Trainer(model, **trainer_kwargs)
    history = trainer.fit(train_data, **kwargs)
    history.trainer = trainer  # type: ignore[attr-defined]
    return history
